"""The outage engine on a real influxd: series written as the collector writes them, outages
derived, stored keyed by start time, recomputed idempotently, reclassified after replay."""

from __future__ import annotations

import time

import pytest

from collector.config import InfluxConfig
from collector.influx import V1Writer
from collector.influxql import InfluxQL
from collector.lineproto import format_line
from collector.outages import NS, OutageEngine, OutageParams

HUB = "gilgit-sco-01"
T0 = 1_795_000_000 * NS  # a fixed start, well in the past
STEP = 10 * NS


@pytest.fixture
def engine(influx):
    influx.create_database("hubwatch")
    cfg = InfluxConfig(url=influx.url, database="hubwatch")
    writer = V1Writer(cfg)
    eng = OutageEngine(OutageParams(), InfluxQL(cfg), lambda lines: writer.write(lines), window_s=10 * 86400)
    eng.put = lambda lines: writer.write(lines)  # test helper: write series
    return eng


def ups(t, on_battery, charge, low=False, host="gw01"):
    status = ("OB DISCHRG" if on_battery else "OL") + (" LB" if low else "")
    return format_line("ups", {"hub": HUB, "host": host, "ups": "hubups", "source": "nut"},
                       {"on_battery": on_battery, "on_line": not on_battery, "battery_charge_percent": float(charge),
                        "low_battery": low, "status": status}, t)


def system(t, boot=T0 / NS - 86400, host="gw01"):
    return format_line("system", {"hub": HUB, "host": host}, {"boot_time_seconds": float(boot),
                                                              "uptime_seconds": t / NS - boot}, t)


def status(t, state, host="gw01"):
    return format_line("status", {"hub": HUB, "host": host}, {"state": state, "online": state == "online"}, t)


def ping(t, reachable, target="internet", host="gw01"):
    return format_line("ping", {"hub": HUB, "host": host, "target": target, "address": "1.1.1.1"},
                       {"reachable": reachable, "loss_percent": 0.0 if reachable else 100.0}, t)


def stored(influx, kind=None):
    where = f"WHERE kind = '{kind}'" if kind else ""
    return influx.rows(f"SELECT * FROM outage {where}", db="hubwatch")


def steady(n, start=T0, **kw):
    return [system(start + i * STEP, **kw) for i in range(n)]


def test_power_cut_of_three_minutes(engine, influx):
    lines = steady(60) + [ups(T0 + i * STEP, 20 <= i < 38, 100 - max(0, i - 20) * 2) for i in range(60)]
    engine.put(lines)
    [outage] = engine.recompute(HUB, T0, T0 + 60 * STEP)
    assert (outage.kind, outage.cause, outage.blip) == ("power", "mains_failure", False)
    [row] = stored(influx, "power")
    assert row["time"] == T0 + 20 * STEP and row["duration_seconds"] == 180.0
    assert row["end_seconds"] == (T0 + 38 * STEP) / NS and row["ongoing"] is False
    assert row["min_battery_charge_percent"] == 66.0 and row["ups"] == "hubups" and row["host"] == "gw01"


def test_a_short_blip_is_reported_apart(engine, influx):
    engine.put(steady(10) + [ups(T0 + i * STEP, i == 3, 100) for i in range(10)])
    engine.recompute(HUB, T0, T0 + 10 * STEP)
    [row] = stored(influx, "power")
    assert row["blip"] is True and row["duration_seconds"] == 10.0


def test_ongoing_power_outage_is_closed_later(engine, influx):
    engine.put(steady(10) + [ups(T0 + i * STEP, i >= 5, 100 - i) for i in range(10)])
    engine.recompute(HUB, T0, T0 + 9 * STEP)
    [row] = stored(influx, "power")
    assert row["ongoing"] is True and row.get("end_seconds") is None and row["duration_seconds"] == 40.0
    engine.put(steady(10, start=T0 + 10 * STEP) + [ups(T0 + i * STEP, i < 15, 90) for i in range(10, 20)])
    engine.recompute(HUB, T0 + 15 * STEP, T0 + 19 * STEP)  # a later, narrower recompute still closes it
    [row] = stored(influx, "power")
    assert row["ongoing"] is False and row["duration_seconds"] == 100.0


def test_dark_hub_reclassified_as_uplink_after_replay(engine, influx):
    # measuring until 20, then the broker connection drops (Last Will at 22), back at 50
    engine.put(steady(20) + [status(T0, "online"), status(T0 + 22 * STEP, "offline")])
    [dark] = [o for o in engine.recompute(HUB, T0, T0 + 40 * STEP) if o.kind == "hub_dark"]
    assert dark.ongoing and dark.cause == "unknown"
    # back online at 50 and the outbox replays what was measured meanwhile
    engine.put(steady(40, start=T0 + 20 * STEP) + [status(T0 + 50 * STEP, "online")])
    engine.recompute(HUB, T0, T0 + 60 * STEP)
    [row] = stored(influx, "hub_dark")
    assert row["cause"] == "uplink" and row["ongoing"] is False
    assert row["time"] == T0 + 22 * STEP and row["duration_seconds"] == 280.0


def test_dark_hub_after_battery_ran_flat_is_battery_exhausted(engine, influx):
    lines = steady(30) + [status(T0, "online")]
    lines += [ups(T0 + i * STEP, i >= 10, 100 - (i - 10) * 4 if i >= 10 else 100, low=i >= 28) for i in range(30)]
    lines += [status(T0 + 32 * STEP, "offline"), status(T0 + 200 * STEP, "online")]
    lines += steady(10, start=T0 + 200 * STEP, boot=(T0 + 195 * STEP) / NS)
    lines += [ups(T0 + i * STEP, False, 30) for i in range(200, 210)]
    engine.put(lines)
    outages = engine.recompute(HUB, T0, T0 + 210 * STEP)
    [dark] = [o for o in outages if o.kind == "hub_dark"]
    assert dark.cause == "battery_exhausted" and not dark.ongoing
    assert dark.start_ns == T0 + 30 * STEP  # silence after the last sample (29) + one interval
    [power] = [o for o in outages if o.kind == "power"]
    assert power.start_ns == T0 + 10 * STEP and power.end_ns == T0 + 200 * STEP
    [reboot] = [o for o in outages if o.kind == "reboot"]
    assert reboot.cause == "unclean_restart" and reboot.end_ns == T0 + 195 * STEP


def test_clean_restart_is_not_a_reboot_outage(engine, influx):
    new_boot = (T0 + 12 * STEP) / NS
    engine.put(steady(10) + [status(T0 + 10 * STEP, "stopped"), status(T0 + 13 * STEP, "online")]
               + steady(5, start=T0 + 13 * STEP, boot=new_boot))
    outages = engine.recompute(HUB, T0, T0 + 18 * STEP)
    assert [o for o in outages if o.kind in ("reboot", "hub_dark")] == []


def test_uplink_outage_from_internet_pings_and_lab_host_down(engine, influx):
    lines = steady(30) + [ping(T0 + i * STEP, not 5 <= i < 17) for i in range(30)]
    lines += [ping(T0 + i * STEP, True, target="gateway") for i in range(30)]
    lines += steady(8, host="lab03") + [status(T0 + 9 * STEP, "offline", host="lab03")]
    engine.put(lines)
    engine.recompute(HUB, T0, T0 + 30 * STEP)
    [uplink] = stored(influx, "uplink")
    assert uplink["duration_seconds"] == 120.0 and uplink["cause"] == "internet_unreachable"
    [down] = stored(influx, "host_down")
    assert down["host"] == "lab03" and down["ongoing"] is True


def test_recomputation_is_idempotent(engine, influx):
    engine.put(steady(60) + [ups(T0 + i * STEP, 20 <= i < 38, 90) for i in range(60)]
               + [ping(T0 + i * STEP, i % 20 != 7) for i in range(60)])
    first = engine.recompute(HUB, T0, T0 + 60 * STEP)
    rows_first = stored(influx)
    second = engine.recompute(HUB, T0, T0 + 60 * STEP)
    assert first == second and stored(influx) == rows_first and len(rows_first) == 4


def test_an_outage_no_longer_derived_is_removed_and_a_kept_one_is_overwritten(engine, influx):
    engine.put(steady(30) + [ups(T0 + i * STEP, 5 <= i < 12 or 20 <= i < 25, 90) for i in range(30)])
    assert len(engine.recompute(HUB, T0, T0 + 30 * STEP)) == 2
    # the UPS's readings for the first cut are corrected (rewritten at the same times): on line
    engine.put([ups(T0 + i * STEP, False, 90) for i in range(5, 12)])
    [left] = engine.recompute(HUB, T0, T0 + 30 * STEP)
    assert [r["time"] for r in stored(influx, "power")] == [left.start_ns] == [T0 + 20 * STEP]
    # the second cut ends later than first seen: the same point, its duration updated in place
    engine.put([ups(T0 + i * STEP, True, 90) for i in range(25, 28)])
    engine.recompute(HUB, T0, T0 + 30 * STEP)
    [row] = stored(influx, "power")
    assert row["time"] == T0 + 20 * STEP and row["duration_seconds"] == 80.0
    # ...and, corrected again, still on battery at the end: open, with no end left behind
    engine.put([ups(T0 + i * STEP, True, 90) for i in range(28, 30)])
    engine.recompute(HUB, T0, T0 + 30 * STEP)
    [row] = stored(influx, "power")
    assert row["ongoing"] is True and row.get("end_seconds") is None


@pytest.mark.parametrize("batch_age,offline", [(None, False), ("0s", True)])
def test_silence_allows_for_the_agents_batch_age(influx, batch_age, offline):
    """An agent batching a minute of cycles (the default) is not silent 45 s after its newest
    sample at a 10 s interval; one sending every cycle is."""
    from collector import config as collector_config
    from collector.engine import Cluster, Engine

    influx.create_database("hubwatch")
    extra = f"  agent_batch_max_age: {batch_age}\n" if batch_age else ""
    cfg = collector_config.parse(f"influxdb: {{url: '{influx.url}', database: hubwatch}}\n"
                                 f"outages:\n  agent_interval: 10s\n{extra}", {})
    cluster = Cluster("c1", "hubwatch", settle_s=0)
    cluster.on_member(cluster.my_topic, b"1")
    engine = Engine(cfg, None, cluster)
    engine.poke = lambda poke: None  # no loop runs here
    now = time.time_ns()
    engine._write([system(now - 45 * NS)])
    engine.sweep_silence(now)
    states = [r["state"] for r in influx.rows("SELECT state FROM status", db="hubwatch")]
    assert states == (["offline"] if offline else [])
