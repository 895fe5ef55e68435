"""The ``nut`` probe against a real ``upsd`` with ``dummy-ups`` drivers serving real device
dumps, plus socket servers of our own for what upsd never does (hang, talk nonsense).

Every sample a probe returns goes through the ``emitted`` fixture (catalogue check).
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml

from agent import config as agent_config
from agent.confload import ConfigError
from agent.probes import ProbeContext
from agent.probes.nut import NutProbe, parse_upsc_dump, parse_vars, quote_word, split_words
from agent.wire import Sample
from tests.services.common import LOOPBACK, free_port
from tests.services.nut import NutUser

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nut-ddl"

#: ups boolean field -> the ups.status token that sets it (restated here on purpose)
FLAG_TOKENS = {"on_line": "OL", "on_battery": "OB", "low_battery": "LB", "charging": "CHRG",
               "discharging": "DISCHRG", "replace_battery": "RB", "overload": "OVER"}
#: ups gauge -> NUT variables it is read from, first present wins
GAUGE_VARS = {
    "battery_charge_percent": ("battery.charge",), "battery_charge_low_percent": ("battery.charge.low",),
    "battery_runtime_seconds": ("battery.runtime",), "battery_voltage_volts": ("battery.voltage",),
    "input_voltage_volts": ("input.voltage",), "input_frequency_hz": ("input.frequency",),
    "output_voltage_volts": ("output.voltage",), "load_percent": ("ups.load",),
    "temperature_celsius": ("ups.temperature", "battery.temperature"), "realpower_watts": ("ups.realpower",),
}
#: what any UPS can plausibly show; a dump inside these is compared number for number
PLAUSIBLE = {"battery_charge_percent": 100, "battery_charge_low_percent": 100, "battery_runtime_seconds": 86400,
             "battery_voltage_volts": 600, "input_voltage_volts": 600, "input_frequency_hz": 70,
             "output_voltage_volts": 600, "load_percent": 200, "temperature_celsius": 80, "realpower_watts": 100000}
PLAIN_DECIMAL = re.compile(r"\d+(\.\d+)?")
TRICKY_STATUSES = ("OB DISCHRG", "OL CHRG", "ALARM OL RB", "OL CHRG LB", "OL LB OVER RB BOOST", "OB LB RB",
                   "OL DISCHRG OB", "OB")

GOOD = {"ups.status": "OL CHRG", "battery.charge": "87", "battery.runtime": "1800", "battery.voltage": "27.1",
        "input.voltage": "229.5", "output.voltage": "230.0", "ups.load": "23", "ups.mfr": "hubwatch test"}


# --- helpers ----------------------------------------------------------------------------

@pytest.fixture
def make_probe() -> Iterator:
    """Build NutProbes from config entries, the way the agent does (YAML -> config); closed after."""
    made: list[NutProbe] = []

    def make(entries, **probe_context) -> NutProbe:
        text = yaml.safe_dump({"hub": "test-hub", "host": "gw01", "probes": {"nut": entries}})
        config = agent_config.parse(text, environ={})
        (setting,) = config.probes
        probe = NutProbe(setting.config, ProbeContext(**probe_context))
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def split(samples: list[Sample]) -> tuple[dict[str, Sample], dict[str, Sample]]:
    ups = {s.tags["ups"]: s for s in samples if s.measurement == "ups"}
    errors = {s.tags["target"]: s for s in samples if s.measurement == "agent"}
    assert len(ups) + len(errors) == len(samples), samples
    for sample in ups.values():
        assert sample.tags["source"] == "nut"
    for sample in errors.values():
        assert sample.tags["probe"] == "nut"
    return ups, errors


def collect(probe: NutProbe, emitted) -> tuple[dict[str, Sample], dict[str, Sample]]:
    return split(emitted(probe.collect()))


def connections_to(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


HANG_UP = object()


class RogueServer:
    """A TCP server that is not upsd: it accepts and then never answers (``answer=None``),
    answers each line it receives with ``answer`` (bytes, or a function of the line), or
    hangs up on the first line (``answer=HANG_UP``)."""

    def __init__(self, answer=None, port: int | None = None):
        self.answer = answer
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, port or 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            self.clients.append(client)
            threading.Thread(target=self._talk, args=(client,), daemon=True).start()

    def _talk(self, client: socket.socket) -> None:
        buffer = b""
        client.settimeout(0.05)
        while not self._stop.is_set():
            try:
                chunk = client.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                self.received.append(line)
                if self.answer is HANG_UP:
                    client.close()
                    return
                if self.answer is not None:
                    reply = self.answer(line) if callable(self.answer) else self.answer
                    try:
                        client.sendall(reply)
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for sock in [self.listener, *self.clients]:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def rogue() -> Iterator:
    servers: list[RogueServer] = []

    def start(answer=None, port=None) -> RogueServer:
        servers.append(RogueServer(answer, port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def expected_from_dump(variables: dict[str, str]) -> tuple[dict[str, float], set[str]]:
    """(gauges the sample must carry with these values, gauges it must not carry)."""
    values, absent = {}, set()
    for field, names in GAUGE_VARS.items():
        present = [n for n in names if n in variables]
        if not present:
            absent.add(field)
            continue
        raw = variables[present[0]].strip()
        if PLAIN_DECIMAL.fullmatch(raw) and float(raw) <= PLAUSIBLE[field]:
            values[field] = float(raw)
        elif not re.fullmatch(r"[-+]?[\d.eE+-]+", raw):  # not a number at all
            absent.add(field)
    return values, absent


# --- pure functions -----------------------------------------------------------------------

def test_parse_vars_maps_nut_variables_to_ups_fields():
    gauges, status = parse_vars({
        "battery.charge": "80", "battery.charge.low": "10", "battery.runtime": "1234",
        "battery.voltage": "13.6", "input.voltage": "231.0", "input.frequency": "50.0",
        "output.voltage": "230", "ups.load": "17", "battery.temperature": "25.5",
        "ups.realpower": "120", "ups.status": "  OB   DISCHRG ", "ups.mfr": "APC"})
    assert gauges == {"battery_charge_percent": 80.0, "battery_charge_low_percent": 10.0,
                      "battery_runtime_seconds": 1234.0, "battery_voltage_volts": 13.6,
                      "input_voltage_volts": 231.0, "input_frequency_hz": 50.0, "output_voltage_volts": 230.0,
                      "load_percent": 17.0, "temperature_celsius": 25.5, "realpower_watts": 120.0}
    assert all(type(v) is float for v in gauges.values())
    assert status == "OB DISCHRG"


@pytest.mark.parametrize("raw", ["-1", "unknown", "", "  ", "nan", "NaN", "inf", "-inf", "1e400", "1_000",
                                 "0x10", "12 V", "1:57", "--", "N/A", "120", "-0.5"])
def test_unusable_charge_is_absent_never_zero(raw):
    gauges, _ = parse_vars({"battery.charge": raw, "ups.status": "OL"})
    assert "battery_charge_percent" not in gauges


def test_temperature_prefers_the_ups_and_falls_back_to_the_battery():
    assert parse_vars({"ups.temperature": "31", "battery.temperature": "25"})[0]["temperature_celsius"] == 31.0
    assert parse_vars({"ups.temperature": "-1e999", "battery.temperature": "25"})[0]["temperature_celsius"] == 25.0
    assert parse_vars({"battery.temperature": "-12.5"})[0]["temperature_celsius"] == -12.5  # a Gilgit winter
    assert "temperature_celsius" not in parse_vars({"battery.temperature": "302.0"})[0]  # kelvin, mislabelled


def test_status_absent_or_empty_is_none():
    assert parse_vars({})[1] is None
    assert parse_vars({"ups.status": "   "})[1] is None
    assert parse_vars({"battery.charge": "1"}) == ({"battery_charge_percent": 1.0}, None)


def test_parse_upsc_dump_reads_values_and_drops_comments():
    text = ("# DEVICE:URL:REPORT: https://example.invalid/x#y\n"
            "battery.charge: 51.0\t#BAD: (?) charger resting\n"
            "ups.status: OL CHRG LB #COMMENT: note\n"
            "device.serial: ####\n"
            "ups.model: Back-UPS BR  800\n"
            "ups.mfr:\n"
            "TIMER 60\n"
            "\n")
    assert parse_upsc_dump(text) == {"battery.charge": "51.0", "ups.status": "OL CHRG LB",
                                     "device.serial": "####", "ups.model": "Back-UPS BR  800", "ups.mfr": ""}


def test_protocol_words_round_trip():
    assert split_words('VAR ups1 ups.model "Back-UPS \\"BR\\" \\\\ 800"') == \
        ["VAR", "ups1", "ups.model", 'Back-UPS "BR" \\ 800']
    assert split_words('VAR u x ""') == ["VAR", "u", "x", ""]
    for word in ["plain", "two words", 'a "quote"', "back\\slash", ""]:
        assert split_words(f"PASSWORD {quote_word(word)}") == ["PASSWORD", word]
    with pytest.raises(ValueError):
        split_words('VAR u x "open')


# --- config -------------------------------------------------------------------------------

def parse_config(nut, environ=None):
    text = yaml.safe_dump({"hub": "test-hub", "host": "gw01", "probes": {"nut": nut}})
    (setting,) = agent_config.parse(text, environ=environ or {}).probes
    return setting.config


def config_problems(nut) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(nut)
    return [p.path for p in info.value.problems]


def test_config_defaults_and_single_mapping(tmp_path):
    (secret := tmp_path / "pw").write_text("s3cret\n")
    config = parse_config({"name": "hubups", "username": "mon", "password_file": str(secret)})
    (ups,) = config.ups
    assert (ups.name, ups.ups, ups.host, ups.port, ups.timeout, ups.starttls, ups.login) == \
        ("hubups", "hubups", "127.0.0.1", 3493, 3.0, False, False)
    assert ups.password.reveal() == "s3cret" and "s3cret" not in repr(config)
    config = parse_config([{"name": "a", "ups": "myups", "host": "10.0.0.5", "port": 3494, "timeout": "500ms"},
                           {"name": "b"}])
    assert [(u.name, u.ups, u.host, u.port, u.timeout) for u in config.ups] == \
        [("a", "myups", "10.0.0.5", 3494, 0.5), ("b", "b", "127.0.0.1", 3493, 3.0)]


@pytest.mark.parametrize("entries, paths", [
    ([{"name": "ups1", "port": 99999}], ["probes.nut[0].port"]),
    ([{"name": "ups1"}, {"name": "ups2", "port": "http"}], ["probes.nut[1].port"]),
    ([{"name": "ups1", "prot": 3493}], ["probes.nut[0].prot"]),
    ([{"host": "10.0.0.1"}], ["probes.nut[0].name"]),
    ([{"name": "ups 1"}], ["probes.nut[0].name"]),
    ([{"name": "ups1", "timeout": "soon"}], ["probes.nut[0].timeout"]),
    ([{"name": "ups1", "starttls": "maybe"}], ["probes.nut[0].starttls"]),
    ([{"name": "ups1", "ca_file": "/nonexistent/ca.pem", "starttls": True}], ["probes.nut[0].ca_file"]),
    ([{"name": "ups1", "password": "x"}], ["probes.nut[0].password"]),
    ([{"name": "ups1", "username": "u", "password": "x", "password_file": "/etc/hostname"}],
     ["probes.nut[0].password"]),
    ([{"name": "ups1", "login": True}], ["probes.nut[0].login"]),
    ([{"name": "ups1"}, {"name": "ups1"}], ["probes.nut[1].name"]),
    ({"name": "ups1", "port": 0}, ["probes.nut.port"]),
    ("ups1", ["probes.nut"]),
    ([], ["probes.nut"]),
])
def test_config_problems_name_their_key_path(entries, paths):
    assert config_problems(entries) == paths


def test_secrets_never_appear_in_config_errors():
    with pytest.raises(ConfigError) as info:
        parse_config([{"name": "ups1", "username": "u", "password": "hunter2", "port": -1}])
    assert "hunter2" not in str(info.value)


# --- live: real upsd serving real device dumps --------------------------------------------

def live_selection() -> dict[str, Path]:
    """Dumps to serve, chosen deterministically: per vendor (sorted), the first two whose
    readings are plain numbers a UPS can show; then the first dump of each tricky status and
    the first reporting real power."""
    files = sorted(CORPUS.rglob("*.dev"))
    chosen: list[Path] = []
    per_vendor: dict[str, int] = {}
    for path in files:
        if len(chosen) >= 36:
            break
        variables = parse_upsc_dump(path.read_text(errors="replace"))
        values, absent = expected_from_dump(variables)
        present = {f for f in GAUGE_VARS if any(n in variables for n in GAUGE_VARS[f])}
        if not variables.get("ups.status") or "battery_charge_percent" not in values or set(values) != present:
            continue
        vendor = path.parent.name
        if per_vendor.get(vendor, 0) < 2:
            per_vendor[vendor] = per_vendor.get(vendor, 0) + 1
            chosen.append(path)
    for status in TRICKY_STATUSES:
        for path in files:
            if parse_upsc_dump(path.read_text(errors="replace")).get("ups.status") == status:
                if path not in chosen:
                    chosen.append(path)
                break
    chosen.append(next(p for p in files if "ups.realpower" in parse_upsc_dump(p.read_text(errors="replace"))
                       and p not in chosen))
    return {f"ddl{i:02d}": path for i, path in enumerate(chosen)}


#: UPS the module's server adds to the device dumps; each test that changes one has its own.
SPARE_UPS = ("changing", "steady", "authups")
USERS = {"monitor": NutUser("right horse", "secondary"), "viewer": NutUser("viewpass", None)}


@pytest.fixture(scope="module")
def ddl_server(nut_server_module):
    """One upsd for the module: the chosen device dumps plus a few spare UPS (a server start
    costs dummy-ups about three seconds, so tests share it where they can)."""
    if not CORPUS.is_dir():
        pytest.fail(f"device library not found at {CORPUS} (shared/data/nut-ddl beside the repository)")
    selection = live_selection()
    server = nut_server_module({**selection, **{name: GOOD for name in SPARE_UPS}}, users=USERS)
    return server, selection


@pytest.mark.services
def test_real_device_dumps_served_by_upsd_read_back_exactly(ddl_server, make_probe, emitted):
    server, selection = ddl_server
    vendors = {path.parent.name for path in selection.values()}
    assert len(selection) >= 30 and len(vendors) >= 10, (len(selection), sorted(vendors))
    probe = make_probe([{"name": name, "port": server.port} for name in selection])
    ups, errors = collect(probe, emitted)
    assert not errors, {k: v.fields for k, v in errors.items()}
    assert set(ups) == set(selection)
    compared = 0
    for name, path in selection.items():
        variables = parse_upsc_dump(path.read_text(errors="replace"))
        fields = ups[name].fields
        values, absent = expected_from_dump(variables)
        for field, value in values.items():
            assert fields.get(field) == value, (path.name, field, variables)
            compared += 1
        for field in absent:
            assert field not in fields, (path.name, field, fields[field])
        status = " ".join(variables["ups.status"].split())
        if status:
            tokens = set(status.split())
            assert fields["status"] == status, path.name
            for flag, token in FLAG_TOKENS.items():
                assert fields[flag] is (token in tokens), (path.name, flag, status)
        else:
            assert "status" not in fields and "on_line" not in fields
    assert compared >= 150
    statuses = {ups[n].fields.get("status") for n in selection}
    assert {"OB DISCHRG", "OL CHRG", "ALARM OL RB"} <= statuses


@pytest.mark.services
def test_one_connection_serves_every_ups_and_is_kept_between_cycles(ddl_server, make_probe, emitted):
    server, selection = ddl_server
    names = list(selection)[:5]
    probe = make_probe([{"name": name, "port": server.port} for name in names])

    def local_ends() -> list:
        return [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED]
    assert set(collect(probe, emitted)[0]) == set(names)
    first = local_ends()
    assert len(first) == 1
    assert set(collect(probe, emitted)[0]) == set(names)
    assert local_ends() == first
    probe.close()
    assert local_ends() == []


@pytest.mark.services
def test_status_change_during_the_test_shows_in_the_next_sample(ddl_server, make_probe, emitted):
    server, _ = ddl_server
    probe = make_probe([{"name": "changing", "port": server.port}, {"name": "steady", "port": server.port}])
    before = collect(probe, emitted)[0]["changing"].fields
    assert (before["on_line"], before["charging"], before["on_battery"], before["discharging"]) == \
        (True, True, False, False)
    assert before["battery_charge_percent"] == 87.0

    server.set_vars("changing", {"ups.status": "OB DISCHRG", "battery.charge": "64", "battery.runtime": "900"})
    ups, errors = collect(probe, emitted)
    after = ups["changing"].fields
    assert not errors
    assert after["status"] == "OB DISCHRG"
    assert (after["on_battery"], after["discharging"], after["charging"], after["on_line"]) == \
        (True, True, False, False)
    assert (after["battery_charge_percent"], after["battery_runtime_seconds"]) == (64.0, 900.0)
    assert ups["steady"].fields["on_line"] is True

    server.set_vars("changing", {"ups.status": "OB DISCHRG LB", "battery.charge": "-1", "battery.runtime": "unknown"})
    after = collect(probe, emitted)[0]["changing"].fields
    assert after["low_battery"] is True
    assert "battery_charge_percent" not in after and "battery_runtime_seconds" not in after
    assert after["input_voltage_volts"] == 229.5


@pytest.mark.services
def test_password_is_checked_only_when_login_asks_for_it(ddl_server, make_probe, emitted, tmp_path):
    server, _ = ddl_server
    (secret := tmp_path / "pw").write_text("right horse\n")
    common = {"ups": "authups", "port": server.port}
    probe = make_probe([
        {"name": "right", "username": "monitor", "password_file": str(secret), "login": True, **common},
        {"name": "wrong", "username": "monitor", "password": "badpass123", "login": True, **common},
        {"name": "unchecked", "username": "monitor", "password": "badpass123", **common},
        {"name": "norights", "username": "viewer", "password": "viewpass", "login": True, **common},
    ])
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"right", "unchecked"}  # upsd never checks a password for reading
    assert ups["right"].fields["battery_charge_percent"] == 87.0
    assert {k: e.fields["error_kind"] for k, e in errors.items()} == {"wrong": "auth", "norights": "auth"}
    assert "ACCESS-DENIED" in errors["wrong"].fields["error"]
    assert "badpass123" not in errors["wrong"].fields["error"]

    # Fixed on the server (the viewer gets upsmon rights): a later cycle logs in.
    server.set_users({**USERS, "viewer": NutUser("viewpass", "secondary")})
    try:
        deadline = time.monotonic() + 10
        while True:
            ups, errors = collect(probe, emitted)
            if "norights" in ups or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(ups) == {"right", "unchecked", "norights"} and set(errors) == {"wrong"}
    finally:
        server.set_users(USERS)


@pytest.mark.services
def test_unknown_ups_is_reported_and_does_not_hide_the_good_one(ddl_server, make_probe, emitted):
    server, _ = ddl_server
    probe = make_probe([{"name": "steady", "port": server.port}, {"name": "added", "port": server.port},
                        {"name": "last", "ups": "steady", "port": server.port}])
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"steady", "last"}
    assert errors["added"].fields["error_kind"] == "unknown_ups"
    assert "UNKNOWN-UPS" in errors["added"].fields["error"]
    assert connections_to(server.port) == 1  # an ERR answer leaves the connection usable

    server.add_ups("added", {**GOOD, "ups.status": "OB DISCHRG", "battery.charge": "41"})
    ups, errors = collect(probe, emitted)
    assert not errors and ups["added"].fields["battery_charge_percent"] == 41.0


@pytest.mark.services
def test_starttls_refused_by_upsd_without_a_certificate(ddl_server, make_probe, emitted):
    server, _ = ddl_server
    probe = make_probe([{"name": "steady", "port": server.port, "starttls": True}])
    errors = collect(probe, emitted)[1]
    assert errors["steady"].fields["error_kind"] == "protocol"
    assert "STARTTLS" in errors["steady"].fields["error"]


@pytest.mark.services
def test_dead_and_stale_drivers_are_reported_and_recover(nut_server, make_probe, emitted):
    server = nut_server({"hubups": GOOD, "dead": GOOD, "stale": GOOD}, maxage=3)
    probe = make_probe([{"name": n, "port": server.port} for n in ("hubups", "dead", "stale")])
    assert set(collect(probe, emitted)[0]) == {"hubups", "dead", "stale"}

    server.kill_driver("dead")  # kill -9: upsd loses the driver's socket at once
    server.pause_driver("stale")  # SIGSTOP: no answer to upsd's pings, stale after MAXAGE
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"hubups", "stale"}
    assert errors["dead"].fields["error_kind"] == "data_stale"
    assert "DRIVER-NOT-CONNECTED" in errors["dead"].fields["error"]

    server.start_driver("dead", wait=False)  # comes back while the other goes stale
    deadline = time.monotonic() + 10
    while "stale" in ups and time.monotonic() < deadline:
        time.sleep(0.25)
        ups, errors = collect(probe, emitted)
    assert errors["stale"].fields["error_kind"] == "data_stale"
    assert "DATA-STALE" in errors["stale"].fields["error"]
    assert "hubups" in ups

    server.resume_driver("stale")
    server.wait_served("dead", GOOD)
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"hubups", "dead", "stale"} and not errors


@pytest.mark.services
def test_refused_then_upsd_starts_stops_and_restarts(nut_server, make_probe, emitted):
    port = free_port()
    probe = make_probe([{"name": "hubups", "port": port}, {"name": "second", "port": port}])
    ups, errors = collect(probe, emitted)
    assert not ups
    assert {k: e.fields["error_kind"] for k, e in errors.items()} == \
        {"hubups": "connection_refused", "second": "connection_refused"}

    server = nut_server({"hubups": GOOD, "second": GOOD}, port=port)
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"hubups", "second"} and not errors

    server.stop_upsd()
    server.start_upsd()  # the connection kept from the last cycle is dead: one quiet reconnect
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"hubups", "second"} and not errors

    server.stop_upsd()
    ups, errors = collect(probe, emitted)
    assert {k: e.fields["error_kind"] for k, e in errors.items()} == \
        {"hubups": "connection_refused", "second": "connection_refused"}


GARBAGE = {
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "binary": bytes(range(256)) + b"\n",
    "half-list": b"BEGIN LIST VAR hubups\nVAR hubups battery.charge\nEND LIST VAR hubups\n",
    "other-ups": b"BEGIN LIST VAR hubups\nVAR someone battery.charge \"5\"\nEND LIST VAR hubups\n",
    "open-quote": b"BEGIN LIST VAR hubups\nVAR hubups battery.charge \"5\nEND LIST VAR hubups\n",
    "endless-line": b"X" * 70000,
    "hangs-up": HANG_UP,
}


@pytest.mark.services
@pytest.mark.parametrize("flavour", sorted(GARBAGE))
def test_garbage_answer_is_a_protocol_error(flavour, rogue, make_probe, emitted):
    server = rogue(answer=GARBAGE[flavour])
    probe = make_probe([{"name": "hubups", "port": server.port, "timeout": "1s"}])
    ups, errors = collect(probe, emitted)
    assert not ups
    assert errors["hubups"].fields["error_kind"] == "protocol", errors["hubups"].fields
    assert len(errors["hubups"].fields["error"]) < 1000


@pytest.mark.services
def test_silent_and_lying_servers_then_real_upsd(rogue, ddl_server, nut_server, make_probe, emitted):
    good, _ = ddl_server
    silent = rogue(answer=None)
    liar = rogue(answer=b"OK\n")
    probe = make_probe([{"name": "hung", "port": silent.port, "timeout": "0.5s"},
                        {"name": "hung2", "port": silent.port, "timeout": "0.5s"},
                        {"name": "lied", "port": liar.port, "timeout": "0.5s"},
                        {"name": "steady", "port": good.port}])
    started = time.monotonic()
    ups, errors = collect(probe, emitted)
    elapsed = time.monotonic() - started
    assert set(ups) == {"steady"}
    assert {k: e.fields["error_kind"] for k, e in errors.items()} == \
        {"hung": "timeout", "hung2": "timeout", "lied": "protocol"}
    assert 0.4 < elapsed < 1.5, elapsed  # one timeout for the server, not one per UPS

    # A server that trickles bytes without ever ending a line is held to the same deadline.
    silent_port, liar_port = silent.port, liar.port
    silent.close()
    trickle = rogue(answer=lambda line: b"B", port=silent_port)
    started = time.monotonic()
    errors = collect(probe, emitted)[1]
    assert errors["hung"].fields["error_kind"] == "timeout" and time.monotonic() - started < 1.5
    trickle.close()
    liar.close()

    # Fixed: a real upsd now listens on both ports, and the next cycle reads it.
    nut_server({"hung": GOOD, "hung2": GOOD, "lied": GOOD}, port=silent_port, extra_ports=(liar_port,))
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"hung", "hung2", "lied", "steady"} and not errors


@pytest.mark.services
def test_credentials_are_sent_once_per_connection_and_quoted(rogue, make_probe, emitted):
    def answer(line: bytes) -> bytes:
        if line.startswith(b"LIST VAR"):
            return b'BEGIN LIST VAR hubups\nVAR hubups ups.status "OL"\nEND LIST VAR hubups\n'
        return b"OK\n"
    server = rogue(answer=answer)
    probe = make_probe([{"name": "hubups", "port": server.port, "username": "mon", "password": 'p "w" d'}])
    collect(probe, emitted)
    collect(probe, emitted)
    assert server.received == [b"USERNAME mon", b'PASSWORD "p \\"w\\" d"', b"LIST VAR hubups", b"LIST VAR hubups"]


# --- STARTTLS against upsd built with NSS ---------------------------------------------------

@pytest.mark.services
def test_starttls_with_a_trusted_certificate(nss_cert, nut_server, make_probe, emitted):
    server = nut_server({"hubups": GOOD}, users={"monitor": NutUser("tls pass", "secondary")}, tls=nss_cert)
    probe = make_probe([
        {"name": "secure", "ups": "hubups", "port": server.port, "starttls": True, "ca_file": str(nss_cert.ca_file),
         "username": "monitor", "password": "tls pass", "login": True},
        {"name": "untrusted", "ups": "hubups", "port": server.port, "starttls": True, "timeout": "2s"},
        {"name": "plain", "ups": "hubups", "port": server.port},
    ])
    ups, errors = collect(probe, emitted)
    assert set(ups) == {"secure", "plain"}
    assert ups["secure"].fields["battery_charge_percent"] == 87.0
    assert errors["untrusted"].fields["error_kind"] == "auth"
    assert "certificate" in errors["untrusted"].fields["error"]


def test_values_are_floats_and_finite():
    gauges, _ = parse_vars({k: "1e3" for k in ("battery.runtime", "ups.load")})
    assert all(isinstance(v, float) and math.isfinite(v) for v in gauges.values())
