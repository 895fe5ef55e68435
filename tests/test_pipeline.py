"""The whole chain on real programs: NUT upsd + dummy-ups -> hubwatch-agent -> mosquitto ->
hubwatch-collector -> influxd (and victoria-metrics for the v2 API), then outages, alerts
and the report, with UPS scenarios played through dummy-ups. Intervals are short (1 s) so
the scenarios run in seconds instead of minutes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.catalogue import MEASUREMENTS
from tests.collector_harness import start_agent, start_collector, wait_for
from agent.outbox import read_stats
from tests.services.proxy import TcpProxy
from tests.test_alerts import Webhook, email_notifier, smtp  # noqa: F401  (smtp: a real SMTP server fixture)

REPO = Path(__file__).resolve().parent.parent
DUMP = REPO.parent / "shared" / "data" / "nut-ddl" / "APC" / "APC__Back-UPS_RS_800__usbhid-ups__2.2.2__01.dev"
HUB = "gilgit-sco-01"
INFLUX_TYPES = {"float": "float", "integer": "int", "boolean": "bool", "string": "str"}


def probes(nut_port: int, broker_port: int, extra: str = "") -> str:
    return f"""  system: {{{extra}}}
  network: {{interfaces: [lo]}}
  ping: {{targets: {{internet: 127.0.0.1}}, count: 1, timeout: 0.3s, tcp_port: {broker_port}}}
  nut: [{{name: hubups, port: {nut_port}}}]
"""


def rows(influx, q):
    return influx.rows(q, db="hubwatch")


def test_real_agent_to_influxdb_with_tags_units_and_types(tmp_path, nut_server, mosquitto, influx, emitted):
    nut = nut_server({"hubups": DUMP})
    start_collector(tmp_path, mosquitto, influx)
    start_agent(tmp_path, mosquitto.url, HUB, "gw01", probes(nut.port, mosquitto.port))
    for m in ("ups", "net", "system", "ping", "agent"):
        wait_for(lambda: rows(influx, f'SELECT * FROM "{m}" LIMIT 1'), 20, f"{m} points")
    [ups] = rows(influx, "SELECT * FROM ups ORDER BY time DESC LIMIT 1")
    assert (ups["hub"], ups["host"], ups["ups"], ups["source"]) == (HUB, "gw01", "hubups", "nut")
    # the dump's values, in the catalogue's units
    assert ups["battery_charge_percent"] == 100.0 and ups["battery_runtime_seconds"] == 6922.0
    assert ups["battery_voltage_volts"] == 27.4 and ups["input_voltage_volts"] == 228.0
    assert ups["output_voltage_volts"] == 230.0 and ups["temperature_celsius"] == 29.2
    assert ups["status"] == "OL" and ups["on_line"] is True and ups["on_battery"] is False
    [net] = rows(influx, "SELECT * FROM net ORDER BY time DESC LIMIT 1")
    assert net["iface"] == "lo" and net["rx_bytes_total"] > 0
    [ping] = rows(influx, "SELECT * FROM ping ORDER BY time DESC LIMIT 1")
    assert (ping["target"], ping["address"], ping["reachable"]) == ("internet", "127.0.0.1", True)
    [system] = rows(influx, "SELECT * FROM system ORDER BY time DESC LIMIT 1")
    assert system["uptime_seconds"] > 0 and system["host"] == "gw01"
    # every stored field has the catalogue's type
    for m in ("ups", "net", "system", "ping", "agent"):
        for r in rows(influx, f'SHOW FIELD KEYS FROM "{m}"'):
            spec = MEASUREMENTS[m].fields[r["fieldKey"]]
            assert INFLUX_TYPES[r["fieldType"]] == spec.type, (m, r)


def test_api_v2_end_to_end_through_influxdb_client(tmp_path, nut_server, mosquitto, influx, victoria):
    nut = nut_server({"hubups": DUMP})
    start_collector(tmp_path, mosquitto, influx, api="v2", influx_url=victoria.url, instance="v2",
                    extra="outages: {enabled: false}\nalerts: {enabled: false}\n")
    start_agent(tmp_path, mosquitto.url, HUB, "gw01", probes(nut.port, mosquitto.port))
    [charge] = victoria.wait_export('{__name__="ups_battery_charge_percent"}', timeout=20)
    assert charge["metric"]["hub"] == HUB and charge["metric"]["ups"] == "hubups" and charge["values"][0] == 100.0
    [rx] = victoria.wait_export('{__name__="net_rx_bytes_total"}', timeout=20)
    assert rx["metric"]["iface"] == "lo"
    assert victoria.wait_export('{__name__="system_uptime_seconds"}', timeout=20)
    assert victoria.wait_export('{__name__="ping_rtt_avg_ms", target="internet"}', timeout=20)


# --- scenarios ---------------------------------------------------------------------------------

def scenario_config(webhook: Webhook, smtp=None, secret_dir: Path | None = None, **rules) -> str:
    rule_lines = "\n".join(f"    {name}: {json.dumps(v)}" for name, v in rules.items())
    email = ""
    if smtp is not None:
        email = email_notifier(smtp, secret_dir)
    return f"""outages:
  agent_interval: 1s
  agent_batch_max_age: 0s
  min_power_s: 5s
  recompute_interval: 1s
alerts:
  interval: 0.5s
  rules:
{rule_lines or '    {}'}
  notifiers:
    - type: webhook
      url: {webhook.url}
{email}"""


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def outages(influx, kind=None):
    where = f" WHERE kind = '{kind}'" if kind else ""
    return rows(influx, f"SELECT * FROM outage{where}")


def report_json(tmp_path, collector_config: Path, start: float) -> dict:
    result = subprocess.run([str(Path(sys.executable).parent / "hubwatch-report"), "-c", str(collector_config),
                             "--from", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start - 5)),
                             "--to", "now", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_power_cut_blip_and_drain_alerts(tmp_path, nut_server, mosquitto, influx, webhook, smtp):
    nut = nut_server({"hubups": DUMP})
    started = time.time()
    start_collector(tmp_path, mosquitto, influx, extra=scenario_config(
        webhook, smtp, tmp_path, on_battery={"debounce": "3s"}, runtime_low={"threshold_minutes": 0.5, "window": "30s"},
        battery_aging={"window": "20s"}))
    start_agent(tmp_path, mosquitto.url, HUB, "gw01", probes(nut.port, mosquitto.port))
    wait_for(lambda: rows(influx, "SELECT * FROM ups LIMIT 1"), 20, "first ups point")

    # a blip: 2 s on battery, under min_power_s (5 s) and the on_battery debounce (3 s)
    nut.set_vars("hubups", {"ups.status": "OB DISCHRG"})
    time.sleep(2)
    nut.set_vars("hubups", {"ups.status": "OL CHRG"})
    time.sleep(4)
    assert webhook.calls == []

    # a power cut of 15 s
    nut.set_vars("hubups", {"ups.status": "OB DISCHRG", "battery.charge": "95"})
    time.sleep(15)
    nut.set_vars("hubups", {"ups.status": "OL CHRG"})
    wait_for(lambda: len(webhook.calls) >= 2, 20, "on_battery firing and resolved")
    power = wait_for(lambda: [o for o in outages(influx, "power") if not o["blip"] and not o["ongoing"]], 20,
                     "the power outage")
    assert len(power) == 1 and abs(power[0]["duration_seconds"] - 15) <= 2, power
    assert [(c["rule"], c["state"]) for _, c in webhook.calls] == [("on_battery", "firing"), ("on_battery", "resolved")]
    wait_for(lambda: len(smtp.messages) >= 2, 20, "two emails")
    subjects = [next(l for l in body.splitlines() if l.startswith("Subject:")) for _, body in smtp.messages]
    assert len(subjects) == 2 and "WARNING on_battery" in subjects[0] and f"{HUB}/gw01" in subjects[0]
    assert "RESOLVED on_battery" in subjects[1]

    # a steady drain from 100 % towards 20 %; the UPS's own runtime estimate is twice the
    # truth (an aging battery): runtime_low must fire before LB, and battery_aging must fire.
    # Each step takes as long as upsd needs to serve it, so the true rate is measured as we go.
    webhook.calls.clear()
    lb_at = None
    steps = []  # (when upsd served it, charge)
    charge, rate = 100, 3.0
    while charge > 20:
        low = charge <= 22
        nut.set_vars("hubups", {"ups.status": "OB DISCHRG" + (" LB" if low else ""), "battery.charge": str(charge),
                                "battery.runtime": f"{2 * charge / rate:.0f}"}, timeout=5)
        steps.append((time.time(), charge))
        if low and lb_at is None:
            lb_at = time.time()
        if len(steps) >= 2:  # % per second, as actually played
            rate = (steps[0][1] - steps[-1][1]) / (steps[-1][0] - steps[0][0])
        charge -= 3
    time.sleep(3)
    nut.set_vars("hubups", {"ups.status": "OL CHRG", "battery.charge": "25", "battery.runtime": "60"})
    wait_for(lambda: {c["rule"] for _, c in webhook.calls} >= {"runtime_low", "battery_aging", "battery_low"}, 20,
             f"drain alerts (got {[(c['rule'], c['state'], c['message']) for _, c in webhook.calls]})")
    fired = {}
    for at, c in webhook.calls:
        if c["state"] == "firing":
            fired.setdefault(c["rule"], at)
    assert fired["runtime_low"] < lb_at, "runtime_low must warn before the UPS says LB"
    report = report_json(tmp_path, tmp_path / "collector-c1.yaml", started)
    [hub] = report["hubs"]
    assert hub["blips"] == 1
    assert [o["kind"] for o in hub["outages"]].count("power") == 2  # the cut and the drain


def test_uplink_cut_is_dark_then_reclassified_after_replay(tmp_path, nut_server, mosquitto, influx, webhook):
    nut = nut_server({"hubups": DUMP})
    proxy = TcpProxy(mosquitto.host, mosquitto.port)
    try:
        start_collector(tmp_path, mosquitto, influx, extra=scenario_config(webhook, hub_offline={"debounce": "2s"}))
        start_agent(tmp_path, proxy.url, HUB, "gw01", probes(nut.port, mosquitto.port))
        wait_for(lambda: rows(influx, "SELECT * FROM system LIMIT 1"), 20, "first samples")
        time.sleep(2)
        cut_at = time.time()
        proxy.cut()
        dark = wait_for(lambda: [o for o in outages(influx, "hub_dark") if o["ongoing"]], 20, "an ongoing hub_dark")
        assert dark[0]["cause"] == "unknown"
        time.sleep(max(0.0, 12 - (time.time() - cut_at)))
        proxy.restore()
        back_at = time.time()
        closed = wait_for(lambda: [o for o in outages(influx, "hub_dark") if not o["ongoing"]
                                   and o["cause"] == "uplink"], 30, "hub_dark reclassified as uplink")
        assert len(outages(influx, "hub_dark")) == 1
        assert abs(closed[0]["duration_seconds"] - (back_at - cut_at)) <= 4, closed
        rules = [(c["rule"], c["state"]) for _, c in webhook.calls]
        assert ("hub_offline", "firing") in rules
    finally:
        proxy.close()


def test_a_collector_restarted_while_a_hub_is_dark_still_ends_its_outage(tmp_path, nut_server, mosquitto, influx,
                                                                          webhook):
    """The agent's ``online`` only wakes the engine for hubs with an open outage or alert; a
    collector started while the hub was dark must still end that outage when it returns."""
    nut = nut_server({"hubups": DUMP})
    proxy = TcpProxy(mosquitto.host, mosquitto.port)
    extra = scenario_config(webhook, hub_offline={"debounce": "2s"})
    try:
        collector = start_collector(tmp_path, mosquitto, influx, extra=extra)
        start_agent(tmp_path, proxy.url, HUB, "gw01", probes(nut.port, mosquitto.port))
        wait_for(lambda: rows(influx, "SELECT * FROM system LIMIT 1"), 20, "first samples")
        proxy.cut()
        wait_for(lambda: [o for o in outages(influx, "hub_dark") if o["ongoing"]], 20, "an ongoing hub_dark")
        collector.stop()
        collector = start_collector(tmp_path, mosquitto, influx, extra=extra)
        wait_for(lambda: "is now the leader" in collector.log_path.read_text(), 15, "leadership")
        proxy.restore()
        wait_for(lambda: [o for o in outages(influx, "hub_dark") if not o["ongoing"]], 30, "hub_dark ended")
        assert len(outages(influx, "hub_dark")) == 1
    finally:
        proxy.close()


def test_battery_exhausted_and_reboots(tmp_path, nut_server, mosquitto, influx, webhook):
    nut = nut_server({"hubups": DUMP})
    proc = tmp_path / "proc"
    proc.mkdir()
    for name in ("uptime", "meminfo", "loadavg"):
        shutil.copy(Path("/proc") / name, proc / name)
    stat = Path("/proc/stat").read_text()

    def boot(btime: int) -> None:
        lines = [l if not l.startswith("btime") else f"btime {btime}" for l in stat.splitlines()]
        (proc / "stat").write_text("\n".join(lines) + "\n")
    boot(int(time.time()) - 3600)
    start_collector(tmp_path, mosquitto, influx, extra=scenario_config(webhook))
    agent_probes = probes(nut.port, mosquitto.port, extra=f"proc_root: {proc}")
    agent = start_agent(tmp_path, mosquitto.url, HUB, "gw01", agent_probes)
    wait_for(lambda: rows(influx, "SELECT * FROM system LIMIT 1"), 20, "first samples")

    # the battery runs flat: OB, then OB LB, then the PC dies (kill -9) and comes back later
    nut.set_vars("hubups", {"ups.status": "OB DISCHRG", "battery.charge": "30"})
    time.sleep(3)
    nut.set_vars("hubups", {"ups.status": "OB DISCHRG LB", "battery.charge": "8"})
    time.sleep(3)
    agent.kill()
    time.sleep(8)
    nut.set_vars("hubups", {"ups.status": "OL CHRG", "battery.charge": "10"})
    boot(int(time.time()) - 2)  # it booted again
    agent = start_agent(tmp_path, mosquitto.url, HUB, "gw01", agent_probes)
    dark = wait_for(lambda: [o for o in outages(influx, "hub_dark") if not o["ongoing"]], 30, "the dark period closed")
    assert [o["cause"] for o in dark] == ["battery_exhausted"]
    wait_for(lambda: outages(influx, "reboot"), 20, "a reboot outage")
    [reboot] = outages(influx, "reboot")
    assert reboot["cause"] == "unclean_restart"

    # a clean restart (SIGTERM: the agent says `stopped`) with a new boot time: no reboot outage
    agent.stop()
    boot(int(time.time()))
    start_agent(tmp_path, mosquitto.url, HUB, "gw01", agent_probes)
    time.sleep(6)
    assert len(outages(influx, "reboot")) == 1


# --- delivery through the real collector into influxd ------------------------------------------

DELIVERY_PROBES = "  system: {}\n  network: {interfaces: [lo]}\n"


def stored_samples(influx) -> int:
    """Points of this hub in InfluxDB: each sample is one point (measurement, tags, time)."""
    total = 0
    for measurement, field in (("system", "uptime_seconds"), ("net", "rx_bytes_total"),
                               ("agent", "outbox_samples"), ("agent", "error")):
        got = rows(influx, f'SELECT count("{field}") AS n FROM "{measurement}" WHERE hub = \'{HUB}\'')
        total += got[0]["n"] if got else 0
    return total


def seq_gaps(influx) -> int:
    got = rows(influx, "SELECT last(seq_gaps_total) AS gaps FROM hubwatch_collector WHERE reason = ''")
    return got[0]["gaps"] if got else -1


def assert_stored_or_held(influx, db) -> None:
    """After the agent stopped: every sample it committed is in InfluxDB, or still in its
    outbox for the next start, and InfluxDB holds nothing more."""
    from tests.test_agent_run import ever_committed
    held = read_stats(db).samples
    wait_for(lambda: stored_samples(influx) + held >= ever_committed(db), 30, "stored + held >= committed",
             explain=lambda: f"{stored_samples(influx)} stored + {held} held, {ever_committed(db)} committed")
    assert stored_samples(influx) <= ever_committed(db), "InfluxDB holds points no sample accounts for"


def test_broker_down_and_agent_killed_three_times_every_sample_lands_once(tmp_path, mosquitto_factory, influx):
    from tests.test_agent_run import ever_committed
    broker = mosquitto_factory(extra_config=["max_queued_messages 10000000"])
    start_collector(tmp_path, broker, influx)  # its persistent session exists before the outage
    db = tmp_path / f"{HUB}-gw01.outbox.db"
    broker.stop()
    for _ in range(3):  # the broker is down: the agent is killed at random moments
        agent = start_agent(tmp_path, broker.url, HUB, "gw01", DELIVERY_PROBES, interval="0.2s")
        time.sleep(0.5 + 1.5 * (time.time() % 1))
        agent.kill()
    agent = start_agent(tmp_path, broker.url, HUB, "gw01", DELIVERY_PROBES, interval="0.2s")
    time.sleep(1)
    broker.start()
    wait_for(lambda: stored_samples(influx) >= ever_committed(db) - 10 > 0, 60, "the backlog in InfluxDB",
             explain=lambda: f"{stored_samples(influx)} stored, {ever_committed(db)} committed")
    agent.stop()
    # every committed sample is in InfluxDB exactly once, or still in the outbox for the next start
    # (a message stored just before the stop may still be held: its ack came too late; it is
    # sent again on the next start and overwrites the same points)
    assert_stored_or_held(influx, db)
    wait_for(lambda: seq_gaps(influx) == 0, 15, "the collector's count of seq gaps: none")


def test_broker_killed_mid_stream_loses_nothing(tmp_path, mosquitto_factory, influx):
    from tests.test_agent_run import ever_committed
    broker = mosquitto_factory(extra_config=["max_queued_messages 10000000"])
    start_collector(tmp_path, broker, influx)
    db = tmp_path / f"{HUB}-gw01.outbox.db"
    agent = start_agent(tmp_path, broker.url, HUB, "gw01", DELIVERY_PROBES, interval="0.1s")
    wait_for(lambda: stored_samples(influx) > 50, 20, "samples flowing")
    broker.kill()  # persistence on, but whatever arrived since its last autosave is gone
    time.sleep(2)
    broker.start()
    # the agent resends what was never confirmed (resend_after: 5 s in these tests)
    wait_for(lambda: stored_samples(influx) >= ever_committed(db) - 20, 60, "the agent catching up",
             explain=lambda: f"{stored_samples(influx)} stored, {ever_committed(db)} committed")
    agent.stop()
    # every committed sample is in InfluxDB, or still in the outbox waiting for the next start
    assert_stored_or_held(influx, db)
