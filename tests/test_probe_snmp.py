"""``snmp_ups`` against real snmpsim replaying real UPS card recordings.

Expected values are read from each ``.snmprec`` file itself and converted with the units the
MIB texts give (this module's own table, written from the MIBs, not imported from the
probe), so a wrong OID, unit or scale in the probe fails here. A value the card reports as
unknown (-1) or outside what the MIB or physics allows must be absent, never a number.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.confload import ConfigError
from agent.probes import ProbeContext
from agent.probes import snmp_mibs
from agent.probes.snmp_ups import SnmpUpsProbe
from agent.probes.upsfields import status_tokens
from tests.services.common import free_port
from tests.services.snmpsim import (UPS_MIB_RECORDINGS, V3User, local_recording, packaged_recording,
                                    read_recording)

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parent.parent
V3 = V3User("hubwatch", auth_key="auth-pass-phrase", auth_proto="SHA", priv_key="priv-pass-phrase",
            priv_proto="AES")
LOCAL = ("apc-smart-ups", "apc-smart-ups-1000-onbattery", "eaton-xups")


def recordings() -> dict[str, Path]:
    recs = {community: packaged_recording(path) for community, path in UPS_MIB_RECORDINGS.items()}
    recs["eaton-9px"] = packaged_recording("UPS/eaton-9px-partial.snmprec")
    recs.update({name: local_recording(name) for name in LOCAL})
    return recs


@pytest.fixture(scope="module")
def sim(snmpsim_factory):
    return snmpsim_factory(recordings(), v3_user=V3)


@pytest.fixture
def probe_for(sim, tmp_path):
    """Build an snmp_ups probe from config entries (through the real config parser)."""
    made: list[SnmpUpsProbe] = []

    def make(*entries: dict, timeout: float = 5.0) -> SnmpUpsProbe:
        full = [{"host": sim.host, "port": sim.port, **e} for e in entries]
        text = "hub: h1\nprobes:\n  snmp_ups: " + json.dumps(full) + "\n"
        cfg = agent_config.parse(text, {})
        probe = SnmpUpsProbe(cfg.probes[0].config, ProbeContext(timeout=timeout))
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def by_target(samples):
    return {s.tags.get("ups") or s.tags.get("target"): s for s in samples}


# --- expected values, straight from the recordings ----------------------------------------

def parse_snmprec(text: str) -> dict[tuple[int, ...], object]:
    values: dict[tuple[int, ...], object] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        oid_text, tag, value = line.split("|", 2)
        key = tuple(int(p) for p in oid_text.split("."))
        if tag in ("2", "65", "66", "67", "70"):        # INTEGER, Counter32, Gauge32, TimeTicks, Counter64
            values[key] = int(value)
        elif tag == "6":
            values[key] = tuple(int(p) for p in value.split("."))
        elif tag == "4x":
            values[key] = bytes.fromhex(value)
        else:
            values[key] = value
    return values


def rec_values(name: str) -> dict[tuple[int, ...], object]:
    return parse_snmprec(read_recording(recordings()[name]))


def o(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def known(value):
    """A reading the card did not mark unknown (-1, 2^31-1, 2^32-1)."""
    return value if isinstance(value, int) and value not in (-1, 2**31 - 1, 2**32 - 1) else None


def within(value, low, high):
    return value if value is not None and low <= value <= high else None


def rows(rec, column: str) -> list:
    col = o(column)
    return [v for k, v in sorted(rec.items()) if len(k) > len(col) and k[:len(col)] == col]


def div(value, by):
    return None if value is None else value / by


def expected_ups_mib(rec) -> dict:
    """RFC 1628 units: charge %, minutes (PositiveInteger), battery 0.1 V DC, temperature °C,
    input frequency 0.1 Hz, voltages RMS volts (line 1), load % (0..200, worst line), watts."""
    b = "1.3.6.1.2.1.33.1."
    minutes = known(rec.get(o(b + "2.3.0")))
    load = [within(known(v), 0, 200) for v in rows(rec, b + "4.4.1.5")]
    power = [known(v) for v in rows(rec, b + "4.4.1.4")]
    first = lambda col: known(rows(rec, b + col)[0]) if rows(rec, b + col) else None  # noqa: E731
    fields = {
        "battery_charge_percent": within(known(rec.get(o(b + "2.4.0"))), 0, 100),
        "battery_runtime_seconds": within(minutes * 60, 60, 30 * 86400) if minutes else None,
        "battery_voltage_volts": within(div(known(rec.get(o(b + "2.5.0"))), 10), 0, 1000),
        "temperature_celsius": within(known(rec.get(o(b + "2.7.0"))), -50, 150),
        "input_frequency_hz": within(div(first("3.3.1.2"), 10), 0, 100),
        "input_voltage_volts": within(first("3.3.1.3"), 0, 1000),
        "output_voltage_volts": within(first("4.4.1.2"), 0, 1000),
        "load_percent": max((v for v in load if v is not None), default=None),
        "realpower_watts": sum(power) if power and None not in power else None,
    }
    source = {2: ["OFF"], 3: ["OL"], 4: ["OL", "BYPASS"], 5: ["OB", "DISCHRG"], 6: ["OL", "BOOST"],
              7: ["OL", "TRIM"]}.get(rec.get(o(b + "4.1.0")), [])
    battery = {3: ["LB"], 4: ["LB"]}.get(rec.get(o(b + "2.1.0")), [])
    return finish(fields, source + battery)


def expected_apc(rec) -> dict:
    """PowerNet-MIB: upsHighPrec* in tenths preferred, else upsAdv* whole units; runtime in
    TimeTicks (1/100 s); upsBasicOutputStatus and the battery flags give the status."""
    b = "1.3.6.1.4.1.318.1.1.1."

    def pick(high, adv, low, top):
        precise = within(div(known(rec.get(o(b + high))), 10), low, top)
        return precise if precise is not None else within(known(rec.get(o(b + adv))), low, top)

    fields = {
        "battery_charge_percent": pick("2.3.1.0", "2.2.1.0", 0, 100),
        "battery_runtime_seconds": within(div(known(rec.get(o(b + "2.2.3.0"))), 100), 0, 30 * 86400),
        "battery_voltage_volts": pick("2.3.4.0", "2.2.8.0", 0, 1000),
        "temperature_celsius": pick("2.3.2.0", "2.2.2.0", -50, 150),
        "input_voltage_volts": pick("3.3.1.0", "3.2.1.0", 0, 1000),
        "input_frequency_hz": pick("3.3.4.0", "3.2.4.0", 0, 100),
        "output_voltage_volts": pick("4.3.1.0", "4.2.1.0", 0, 1000),
        "load_percent": pick("4.3.3.0", "4.2.3.0", 0, 200),
        "realpower_watts": known(rec.get(o(b + "4.2.8.0"))),
    }
    tokens = {2: ["OL"], 3: ["OB", "DISCHRG"], 4: ["OL", "BOOST"], 12: ["OL", "TRIM"]}[rec[o(b + "4.1.1.0")]]
    tokens += {3: ["LB"], 4: ["RB"]}.get(rec.get(o(b + "2.1.1.0")), [])
    tokens += ["RB"] if rec.get(o(b + "2.2.4.0")) == 2 else []
    return finish(fields, tokens)


def expected_xups(rec) -> dict:
    """XUPS-MIB: seconds, volts DC, %, 0.1 Hz input, RMS volts (phase 1), load %, watts
    summed over phases, ambient °C; xupsOutputSource and xupsBatteryAbmStatus give the status."""
    b = "1.3.6.1.4.1.534.1."
    watts = [known(v) for v in rows(rec, b + "4.4.1.4")]
    first = lambda col: known(rows(rec, b + col)[0]) if rows(rec, b + col) else None  # noqa: E731
    fields = {
        "battery_charge_percent": within(known(rec.get(o(b + "2.4.0"))), 0, 100),
        "battery_runtime_seconds": within(known(rec.get(o(b + "2.1.0"))), 0, 30 * 86400),
        "battery_voltage_volts": within(known(rec.get(o(b + "2.2.0"))), 0, 1000),
        "temperature_celsius": within(known(rec.get(o(b + "6.1.0"))), -50, 150),
        "input_frequency_hz": within(div(known(rec.get(o(b + "3.1.0"))), 10), 0, 100),
        "input_voltage_volts": within(first("3.4.1.2"), 0, 1000),
        "output_voltage_volts": within(first("4.4.1.2"), 0, 1000),
        "load_percent": within(known(rec.get(o(b + "4.1.0"))), 0, 200),
        "realpower_watts": sum(watts) if watts and None not in watts else None,
    }
    tokens = {3: ["OL"], 4: ["OL", "BYPASS"], 5: ["OB", "DISCHRG"]}[rec[o(b + "4.5.0")]]
    tokens += {1: ["CHRG"], 2: ["DISCHRG"], 8: ["RB"]}.get(rec.get(o(b + "2.5.0")), [])
    return finish(fields, tokens)


def finish(fields: dict, tokens: list[str]) -> dict:
    out = {k: float(v) for k, v in fields.items() if v is not None}
    if tokens:
        out["status"] = set(tokens)
    return out


def assert_matches(sample, expected: dict):
    assert sample.measurement == "ups", dict(sample.fields)
    assert sample.tags["source"] == "snmp"
    got = {k: v for k, v in sample.fields.items() if isinstance(v, float)}
    want = {k: v for k, v in expected.items() if k != "status"}
    assert got == pytest.approx(want), f"\n got: {got}\nwant: {want}"
    assert status_tokens(sample.fields["status"]) == expected["status"]
    tokens = status_tokens(sample.fields["status"])
    assert sample.fields["on_line"] is ("OL" in tokens) and sample.fields["on_battery"] is ("OB" in tokens)


# --- values, per recording ----------------------------------------------------------------

@pytest.mark.parametrize("community", sorted(UPS_MIB_RECORDINGS))
def test_ups_mib_recordings_read_as_the_recording_says(probe_for, emitted, community):
    samples = emitted(probe_for({"name": "ups1", "community": community}).collect())
    assert len(samples) == 1
    assert_matches(samples[0], expected_ups_mib(rec_values(community)))


def test_unknown_minus_one_is_absent_not_a_number(probe_for, emitted):
    rec = rec_values("huawei-gse200m")
    assert rec[o("1.3.6.1.2.1.33.1.2.4.0")] == -1      # upsEstimatedChargeRemaining: unknown
    assert rec[o("1.3.6.1.2.1.33.1.2.3.0")] == -1      # upsEstimatedMinutesRemaining: unknown
    assert rec[o("1.3.6.1.2.1.33.1.2.7.0")] == -1      # upsBatteryTemperature: unknown
    fields = emitted(probe_for({"name": "hw", "community": "huawei-gse200m"}).collect())[0].fields
    for name in ("battery_charge_percent", "battery_runtime_seconds", "temperature_celsius"):
        assert name not in fields
    # and a mains voltage of 2369 V (the card reports tenths where RFC 1628 says volts) is no reading
    assert "input_voltage_volts" not in fields and fields["battery_voltage_volts"] == 538.5


@pytest.mark.parametrize("name,expect", [("apc-smart-ups", expected_apc),
                                         ("apc-smart-ups-1000-onbattery", expected_apc),
                                         ("eaton-xups", expected_xups)])
def test_vendor_recordings_are_detected_and_read(probe_for, emitted, name, expect):
    samples = emitted(probe_for({"name": "u", "community": name}).collect())
    assert_matches(samples[0], expect(rec_values(name)))


def test_apc_on_battery_is_reported_as_on_battery(probe_for, emitted):
    fields = emitted(probe_for({"name": "u", "community": "apc-smart-ups-1000-onbattery"}).collect())[0].fields
    assert fields["status"] == "OB DISCHRG" and fields["on_battery"] and fields["discharging"]
    assert fields["input_voltage_volts"] == 0.0  # mains gone: a real 0, kept


def test_mib_can_be_forced_and_auto_falls_back_to_what_answers(probe_for, emitted):
    # Eaton 93E: an MGE card (sysObjectID enterprise 705) answering UPS-MIB and XUPS-MIB
    forced = emitted(probe_for({"name": "u", "community": "eaton-93e", "mib": "eaton-xups"}).collect())
    assert_matches(forced[0], expected_xups(rec_values("eaton-93e")))
    # Eaton 9PX, same card family, recorded without UPS-MIB: auto must find XUPS-MIB itself
    auto = emitted(probe_for({"name": "u", "community": "eaton-9px"}).collect())
    assert_matches(auto[0], expected_xups(rec_values("eaton-9px")))


def test_a_mib_the_card_lacks_is_a_protocol_error(probe_for, emitted):
    samples = emitted(probe_for({"name": "u", "community": "phoenixtec", "mib": "apc"}).collect())
    assert samples[0].measurement == "agent" and samples[0].fields["error_kind"] == "protocol"
    assert "PowerNet" in samples[0].fields["error"]


# --- SNMP versions ------------------------------------------------------------------------

def test_snmp_v1_reads_the_same_as_v2c(probe_for, emitted):
    v1 = emitted(probe_for({"name": "u", "community": "ingrasys", "version": "v1"}).collect())
    v2c = emitted(probe_for({"name": "u", "community": "ingrasys", "version": "v2c"}).collect())
    assert dict(v1[0].fields) == dict(v2c[0].fields)
    assert_matches(v1[0], expected_ups_mib(rec_values("ingrasys")))


def test_snmp_v3_auth_priv_sha_aes(probe_for, emitted, tmp_path):
    priv = tmp_path / "priv.key"
    priv.write_text(V3.priv_key + "\n")
    v3 = {"username": V3.name, "auth_protocol": "sha", "auth_key": V3.auth_key,
          "priv_protocol": "AES", "priv_key_file": str(priv), "context_name": "apc-smart-ups"}
    samples = emitted(probe_for({"name": "u", "version": "v3", "v3": v3}).collect())
    assert_matches(samples[0], expected_apc(rec_values("apc-smart-ups")))


def test_snmp_v3_wrong_key_is_an_auth_error(probe_for, emitted):
    v3 = {"username": V3.name, "auth_key": "not-the-pass-phrase", "priv_key": V3.priv_key,
          "context_name": "apc-smart-ups"}
    samples = emitted(probe_for({"name": "u", "version": "v3", "v3": v3, "timeout": "1s"}).collect())
    assert samples[0].measurement == "agent" and samples[0].fields["error_kind"] == "auth"
    assert V3.name in samples[0].fields["error"] and "not-the-pass-phrase" not in samples[0].fields["error"]


# --- failures -----------------------------------------------------------------------------

def test_wrong_community_fails_alone_and_the_probe_keeps_going(probe_for, emitted):
    probe = probe_for({"name": "good", "community": "eastpower"},
                      {"name": "bad", "community": "no-such-community", "timeout": "0.5s", "retries": 0})
    for _ in range(2):  # and again: one failure does not stick
        started = time.monotonic()
        samples = by_target(emitted(probe.collect()))
        assert time.monotonic() - started < 3.0
        assert samples["good"].measurement == "ups" and samples["good"].fields["status"] == "OL"
        error = samples["bad"]
        assert error.measurement == "agent" and error.tags["probe"] == "snmp_ups"
        assert error.fields["error_kind"] == "timeout"
        assert "no response" in error.fields["error"] and "wrong community?" in error.fields["error"]
        assert "no-such-community" not in error.fields["error"]
    fixed = probe_for({"name": "bad", "community": "eastpower"})
    assert emitted(fixed.collect())[0].measurement == "ups"


def test_nothing_listening_is_an_error_sample_within_the_timeout(probe_for, emitted, sim):
    probe = probe_for({"name": "gone", "port": free_port(socket.SOCK_DGRAM),
                       "timeout": "0.3s", "retries": 1})
    started = time.monotonic()
    samples = emitted(probe.collect())
    assert time.monotonic() - started < 2.0
    assert samples[0].measurement == "agent" and samples[0].tags["target"] == "gone"
    assert samples[0].fields["error_kind"] == "timeout" and "2 tries" in samples[0].fields["error"]


def test_a_slow_cycle_is_cut_at_the_probe_budget(probe_for, emitted):
    # 3 tries of 1 s cannot fit a 0.5 s probe timeout: the cycle ends on time anyway
    probe = probe_for({"name": "slow", "community": "nobody-home", "timeout": "1s", "retries": 2}, timeout=0.5)
    started = time.monotonic()
    samples = emitted(probe.collect())
    assert time.monotonic() - started < 1.5
    assert samples[0].fields["error_kind"] == "timeout"


# --- config -------------------------------------------------------------------------------

def snmp_problems(entries: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        agent_config.parse("hub: h1\nprobes:\n  snmp_ups:\n" + entries, {})
    return [str(p) for p in info.value.problems]


def test_config_problems_are_named_by_key_path():
    problems = snmp_problems(
        "    - {name: Park UPS, host: 10.0.0.5}\n"
        "    - {name: b, host: 10.0.0.6, version: v4}\n"
        "    - {name: c, host: 10.0.0.7, version: v3, v3: {username: mon, auth_key: short}}\n"
        "    - {name: d, host: 10.0.0.8, port: 70000, mib: cyberpower, colour: red}\n"
        "    - {name: e, host: 10.0.0.9, version: v3, community: x}\n"
        "    - {name: f, host: 10.0.0.10, v3: {username: mon}}\n"
        "    - {name: b, host: 10.0.0.11}\n"
        "    - {host: 10.0.0.12, timeout: soon}\n")
    expected = [
        ("probes.snmp_ups[0].name (line 4)", "does not match"),
        ("probes.snmp_ups[1].version (line 5)", "not one of v1, v2c, v3"),
        ("probes.snmp_ups[2].v3.auth_key", "at least 8 characters"),
        ("probes.snmp_ups[3].port", "above the maximum"),
        ("probes.snmp_ups[3].mib", "not one of auto, ups-mib, apc, eaton-xups"),
        ("probes.snmp_ups[3].colour", "unknown key"),
        ("probes.snmp_ups[4].community", "v1/v2c"),
        ("probes.snmp_ups[4].v3", "required with version: v3"),
        ("probes.snmp_ups[5].v3", "only used with version: v3"),
        ("probes.snmp_ups[6].name", "used twice"),
        ("probes.snmp_ups[7].name", "is required"),
        ("probes.snmp_ups[7].timeout", "not a duration"),
    ]
    for where, what in expected:
        assert any(p.startswith(where) and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected), problems


def test_v3_security_level_must_match_the_keys():
    problems = snmp_problems("    - {name: a, host: h, version: v3, v3: {username: u, security_level: authPriv, "
                             "auth_key: 12345678}}\n"
                             "    - {name: b, host: h, version: v3, v3: {username: u, priv_key: 12345678}}\n"
                             "    - {name: c, host: h, version: v3, v3: {username: u, auth_key: 12345678, "
                             "auth_protocol: SHA1024}}\n")
    assert any(p.startswith("probes.snmp_ups[0].v3.priv_key") and "authPriv" in p for p in problems), problems
    assert any(p.startswith("probes.snmp_ups[1].v3.priv_key") and "authentication" in p for p in problems)
    assert any(p.startswith("probes.snmp_ups[2].v3.auth_protocol") and "SHA1024" in p for p in problems)


def test_config_defaults_and_secret_files(tmp_path):
    community = tmp_path / "community"
    community.write_text("s3cret-community\n")
    cfg = agent_config.parse(
        "hub: h1\nprobes:\n  snmp_ups:\n"
        "    - {name: parkups, host: 10.0.0.50}\n"
        f"    - {{name: lab, host: ups.lab, community_file: {community}, version: v1, mib: apc}}\n"
        "    - {name: core, host: 10.0.0.51, version: v3, v3: {username: mon, auth_key: a-pass-phrase}}\n", {})
    first, second, third = cfg.probes[0].config.targets
    assert (first.port, first.version, first.community.reveal(), first.mib, first.timeout, first.retries) == \
        (161, "v2c", "public", "auto", 2.0, 1)
    assert second.community.reveal() == "s3cret-community" and second.version == "v1"
    assert "s3cret-community" not in repr(cfg)
    assert third.v3.security_level == "authNoPriv" and third.v3.auth_protocol == "SHA"
    assert third.v3.priv_key is None and "a-pass-phrase" not in repr(third)


def test_pysnmp_loads_only_for_an_snmp_probe():
    code = r"""
import importlib, sys
from agent import config, probes
config.parse("hub: h1\nprobes:\n  system: {}\n  network: {}\n", {})
for name in probes.REGISTRY:
    module = probes.REGISTRY[name].split(":")[0]
    try:
        probes.probe_class(name)
    except ModuleNotFoundError as exc:
        assert exc.name == module, exc   # a probe not written yet; any other missing module is a bug
# even a config naming snmp_ups is parsed (and --check'ed) without SNMP libraries
config.parse("hub: h1\nprobes:\n  snmp_ups: [{name: u, host: 10.0.0.1}]\n", {})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pysnmp", "pyasn1"))
assert not loaded, loaded
from agent.probes.snmp_ups import SnmpUpsProbe
probe = SnmpUpsProbe(SnmpUpsProbe.Config(), probes.ProbeContext())
assert "pysnmp" in sys.modules   # the check above can see an import when there is one
probe.close()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --- status translation (pure: the recordings above are all on line or on battery) -------

@pytest.mark.parametrize("source,battery,alarms,status", [
    (3, 2, [], "OL"),
    (5, 3, [2, 3], "OB DISCHRG LB"),
    (3, 2, [1, 8], "OL RB OVER"),
    (4, 2, [9], "OL BYPASS"),
    (7, 2, [], "OL TRIM"),
    (3, 4, [18], "OL LB ALARM"),
    (1, 1, [], None),
])
def test_ups_mib_status_tokens(source, battery, alarms, status):
    base = snmp_mibs.UPS_MIB
    values = {base + (4, 1, 0): source, base + (2, 1, 0): battery}
    for i, alarm in enumerate(alarms, 1):
        values[snmp_mibs.UPS_ALARM_DESCR + (i,)] = snmp_mibs.UPS_WELL_KNOWN_ALARMS + (alarm,)
    assert snmp_mibs.ups_mib_status(values) == status
