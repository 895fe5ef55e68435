"""Alert rules and their state machine (pure), and alerts end to end through the real
collector: webhooks to a real local HTTP server, emails to a real SMTP server (aiosmtpd,
STARTTLS and login), retained states on the broker, exactly once across instances."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent import wire
from agent.wire import Sample
from collector.alerts import (DEFAULT_RULES, NS, AlertState, UpsReading, drain_rate, evaluate_offline,
                              evaluate_ups, rules_with_overrides, step)
from tests.collector_harness import envelope, start_collector, wait_for

T0 = 1_795_000_000 * NS


def drain(minutes: float, start_charge=100.0, end_charge=20.0, aging=1.0, step_s=10, lb_at=20.0):
    """A battery draining linearly; the UPS estimates ``aging`` times the true runtime left."""
    n = int(minutes * 60 / step_s) + 1
    rate = (start_charge - end_charge) / (minutes * 60)  # % per second
    out = []
    for i in range(n):
        charge = start_charge - rate * i * step_s
        true_left = charge / rate
        out.append(UpsReading(T0 + i * step_s * NS, True, round(charge, 1), round(true_left * aging, 0),
                              low_battery=charge <= lb_at))
    return out, rate


def test_predicted_runtime_at_half_charge_is_within_20_percent_of_the_truth():
    readings, rate = drain(16)
    half = [r for r in readings if r.charge >= 50]
    measured = drain_rate(half, 300 * NS, half[-1].t)
    predicted_s = half[-1].charge / measured
    true_s = half[-1].charge / rate
    assert abs(predicted_s - true_s) / true_s < 0.2


def test_runtime_low_fires_before_the_ups_says_low_battery():
    readings, _ = drain(16)
    rules = dict(DEFAULT_RULES)
    first = {}
    for i in range(len(readings)):
        for f in evaluate_ups("h", "gw01", "ups", readings[:i + 1], rules, readings[i].t):
            first.setdefault(f.rule, readings[i])
    assert first["runtime_low"].t < first["battery_low"].t
    assert not first["runtime_low"].low_battery
    assert first["on_battery"].t == T0 + 30 * NS  # the 30 s debounce


def test_message_says_which_estimate_was_lower():
    readings, _ = drain(16, aging=3.0)  # the UPS is optimistic: the measured drain is lower
    f = {x.rule: x for x in evaluate_ups("h", "gw01", "ups", readings[:70], dict(DEFAULT_RULES), readings[69].t)}
    assert "measured drain" in f["runtime_low"].message.split("(")[1].split(";")[0]


def test_a_battery_draining_twice_as_fast_as_its_estimate_is_aging():
    readings, _ = drain(16, aging=2.0)
    findings = evaluate_ups("h", "gw01", "ups", readings[:40], dict(DEFAULT_RULES), readings[39].t)
    [aging] = [f for f in findings if f.rule == "battery_aging"]
    assert 1.8 <= aging.value <= 2.2 and "faster than the UPS's own estimate" in aging.message
    honest, _ = drain(16, aging=1.0)
    assert not [f for f in evaluate_ups("h", "gw01", "ups", honest[:40], dict(DEFAULT_RULES), honest[39].t)
                if f.rule == "battery_aging"]


def test_replace_battery_flag_is_aging_even_on_line():
    r = [UpsReading(T0, False, 100.0, 3000.0, replace_battery=True)]
    assert [f.rule for f in evaluate_ups("h", "gw01", "ups", r, dict(DEFAULT_RULES), T0)] == ["battery_aging"]


def test_hub_offline_after_its_debounce():
    rules = dict(DEFAULT_RULES)
    assert evaluate_offline("h", "gw01", "offline", T0, rules, T0 + 59 * NS) == []
    [f] = evaluate_offline("h", "gw01", "offline", T0, rules, T0 + 61 * NS)
    assert f.rule == "hub_offline"


def test_state_machine_fires_once_renotifies_and_resolves_once():
    rules = rules_with_overrides(dict(DEFAULT_RULES), {"on_battery": {"renotify_s": 600}})
    readings = [UpsReading(T0 + i * 10 * NS, True, 90.0) for i in range(5)]
    active: dict[str, AlertState] = {}
    scope = {("h", r) for r in DEFAULT_RULES}
    sent = []
    for minute in range(0, 25):
        now = T0 + minute * 60 * NS
        findings = [f for f in evaluate_ups("h", "gw01", "ups", readings, rules, now) if f.rule == "on_battery"]
        sent += step(active, findings if minute < 22 else [], scope, lambda hub: rules, now).notify
    assert [(n.state, n.renotify) for n in sent] == [("firing", False), ("firing", True), ("firing", True),
                                                      ("resolved", False)]


# --- end to end ------------------------------------------------------------------------------

class Webhook:
    """A real HTTP server on loopback that records every JSON POST."""

    def __init__(self):
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                calls.append((time.time(), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def smtp(tmp_path):
    """A real SMTP server (aiosmtpd) requiring STARTTLS and login."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    from tests.services.common import free_port
    key, cert = tmp_path / "smtp.key", tmp_path / "smtp.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    messages = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            messages.append((session.authenticated, envelope.content.decode()))
            return "250 OK"

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == b"alerts" and auth_data.password == b"smtp-secret"
        return AuthResult(success=ok)
    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
                            authenticator=authenticate, auth_require_tls=True)
    controller.start()
    controller.messages, controller.cert = messages, cert
    yield controller
    controller.stop()


def email_notifier(smtp, secret_dir) -> str:
    """The ``alerts.notifiers`` entry for the SMTP fixture (STARTTLS, login from a password file)."""
    (secret_dir / "smtp.password").write_text("smtp-secret\n")
    return f"""    - type: email
      host: 127.0.0.1
      port: {smtp.port}
      username: alerts
      password_file: {secret_dir / 'smtp.password'}
      from: hubwatch@example.org
      to: [duty@example.org]
      ca_file: {smtp.cert}
"""


def alerts_config(webhook, smtp=None, debounce="2s", secret_dir=None) -> str:
    text = f"""outages:
  agent_interval: 1s
  agent_batch_max_age: 0s
alerts:
  interval: 0.5s
  rules:
    on_battery: {{debounce: {debounce}, renotify: 1h}}
  notifiers:
    - type: webhook
      url: {webhook.url}
"""
    if smtp is not None:
        text += email_notifier(smtp, secret_dir)
    return text


def ups_event(on_battery: bool, charge: float, t_ns: int) -> Sample:
    return Sample("ups", t_ns, {"ups": "hubups", "source": "nut"},
                  {"on_battery": on_battery, "on_line": not on_battery, "battery_charge_percent": charge,
                   "battery_runtime_seconds": 1800.0, "status": "OB DISCHRG" if on_battery else "OL CHRG"})


def play_power_cut(mosquitto, seconds: float, hub="skardu-01", host="gw01", step=0.5):
    """Publish UPS samples on the events topic, as the agent's fast path does: on battery for
    ``seconds``, then back on line."""
    seq = 0
    with mosquitto.client() as agent:
        started = time.time()
        while time.time() - started < seconds:
            seq += 1
            charge = 100.0 - (time.time() - started)
            agent.publish(wire.topic("hubwatch", hub, host, "events"),
                          envelope(hub, host, seq, [ups_event(True, charge, time.time_ns())]))
            time.sleep(step)
        for _ in range(3):
            seq += 1
            agent.publish(wire.topic("hubwatch", hub, host, "events"),
                          envelope(hub, host, seq, [ups_event(False, 90.0, time.time_ns())]))
            time.sleep(step)


def test_power_cut_fires_once_and_resolves_once_by_webhook_and_email(tmp_path, mosquitto, influx, webhook, smtp):
    collector = start_collector(tmp_path, mosquitto, influx, extra=alerts_config(webhook, smtp, secret_dir=tmp_path))
    wait_for(lambda: "is now the leader" in collector.log_path.read_text(), 15, "leadership")
    with mosquitto.subscriber("hubwatch/alerts/#") as retained:
        play_power_cut(mosquitto, 6)
        states = [json.loads(m.payload) if m.payload else None for m in retained.messages(timeout=5, count=2)]
    wait_for(lambda: len(webhook.calls) >= 2, 15, "two webhook calls")
    time.sleep(2)
    calls = [c for _, c in webhook.calls]
    assert [(c["rule"], c["state"]) for c in calls] == [("on_battery", "firing"), ("on_battery", "resolved")], calls
    assert calls[0]["hub"] == "skardu-01" and calls[0]["host"] == "gw01" and calls[0]["ups"] == "hubups"
    assert calls[0]["severity"] == "warning" and "on battery" in calls[0]["message"]
    assert states[0]["state"] == "firing" and states[-1] is None  # retained while active, then cleared
    wait_for(lambda: len(smtp.messages) >= 2, 15, "two emails")
    time.sleep(1)
    assert len(smtp.messages) == 2 and all(authenticated for authenticated, _ in smtp.messages)
    subjects = [next(l for l in body.splitlines() if l.startswith("Subject:")) for _, body in smtp.messages]
    assert "WARNING on_battery" in subjects[0] and "skardu-01/gw01" in subjects[0]
    assert "RESOLVED on_battery" in subjects[1]
    rows = influx.rows("SELECT * FROM alert", db="hubwatch")
    assert [r["state"] for r in rows] == ["firing", "resolved"] and rows[0]["rule"] == "on_battery"


def test_a_blip_shorter_than_the_debounce_sends_nothing(tmp_path, mosquitto, influx, webhook):
    collector = start_collector(tmp_path, mosquitto, influx, extra=alerts_config(webhook, debounce="5s"))
    wait_for(lambda: "is now the leader" in collector.log_path.read_text(), 15, "leadership")
    play_power_cut(mosquitto, 2)
    time.sleep(4)
    assert webhook.calls == []


def test_exactly_once_with_two_collectors_and_a_restart_mid_alert(tmp_path, mosquitto, influx, webhook):
    extra = alerts_config(webhook)
    c1 = start_collector(tmp_path, mosquitto, influx, instance="c1", extra=extra)
    c2 = start_collector(tmp_path, mosquitto, influx, instance="c2", extra=extra)
    wait_for(lambda: "is now the leader" in c1.log_path.read_text(), 15, "c1 leads")
    done = threading.Event()
    cut = threading.Thread(target=lambda: (play_power_cut(mosquitto, 14), done.set()))
    cut.start()
    wait_for(lambda: len(webhook.calls) >= 1, 15, "the alert fires")
    c1.stop()  # the leader restarts mid-alert: c2 takes over with the retained state
    wait_for(lambda: "is now the leader" in c2.log_path.read_text(), 15, "c2 takes over")
    c1 = start_collector(tmp_path, mosquitto, influx, instance="c1", extra=extra)
    cut.join()
    wait_for(lambda: len(webhook.calls) >= 2, 20, "the resolution")
    time.sleep(3)
    calls = [(c["rule"], c["state"]) for _, c in webhook.calls]
    assert calls == [("on_battery", "firing"), ("on_battery", "resolved")], calls


def test_two_collectors_share_the_hubs_and_each_alert_comes_once_from_its_hub_leader(tmp_path, mosquitto, influx,
                                                                                      webhook):
    from collector.engine import Cluster
    # two hubs that hash to different instances of two ("c1" sorts first: index 0)
    hubs = {}
    for n in range(100):
        hubs.setdefault(Cluster.owner_index(f"hub-{n:02d}", 2), f"hub-{n:02d}")
    extra = alerts_config(webhook)
    c1 = start_collector(tmp_path, mosquitto, influx, instance="c1", extra=extra)
    c2 = start_collector(tmp_path, mosquitto, influx, instance="c2", extra=extra)
    for c in (c1, c2):
        wait_for(lambda c=c: "of the hubs in share" in c.log_path.read_text() and " of 2" in c.log_path.read_text(),
                 15, f"{c.name} leads its share")
    cuts = [threading.Thread(target=play_power_cut, args=(mosquitto, 6), kwargs={"hub": hubs[i]}) for i in (0, 1)]
    for t in cuts:
        t.start()
    for t in cuts:
        t.join()
    wait_for(lambda: len(webhook.calls) >= 4, 20, "firing and resolved for both hubs")
    time.sleep(2)
    calls = sorted((c["hub"], c["state"]) for _, c in webhook.calls)
    assert calls == sorted([(hubs[0], "firing"), (hubs[0], "resolved"), (hubs[1], "firing"), (hubs[1], "resolved")])
    # each hub's alert was raised by the instance that owns it, and only by that one
    for index, collector in ((0, c1), (1, c2)):
        log = collector.log_path.read_text()
        assert f"alert firing on_battery/{hubs[index]}/" in log, log[-2000:]
        assert hubs[1 - index] not in "".join(l for l in log.splitlines(True) if "alert firing" in l)
