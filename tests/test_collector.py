"""The collector on real mosquitto and real influxd: ingest, acks, outages of InfluxDB,
crashes, shared subscriptions."""

from __future__ import annotations

import json
import re
import time

import pytest

from agent import wire
from agent.wire import Sample
from tests.collector_harness import (count_points, envelope, start_collector, ups_samples, wait_for)

HUB, HOST = "gilgit-sco-01", "gw01"


def metrics_topic(hub=HUB, host=HOST, kind="metrics"):
    return wire.topic("hubwatch", hub, host, kind)


def test_ingest_writes_points_with_topic_tags_types_and_acks_the_agent(tmp_path, mosquitto, influx):
    collector = start_collector(tmp_path, mosquitto, influx)
    now = time.time_ns()
    samples = [
        Sample("ups", now, {"ups": "hubups", "source": "nut"},
               {"battery_charge_percent": 80.0, "status": "OB DISCHRG", "on_battery": True, "on_line": False}),
        Sample("net", now, {"iface": "eth0"}, {"rx_bytes_total": 2**40, "link_up": True, "speed_mbps": 100.0}),
        Sample("system", now, {}, {"uptime_seconds": 12.5, "clock_synced": False}),
    ]
    with mosquitto.subscriber(metrics_topic(kind="ack")) as acks, mosquitto.client() as agent:
        assert agent.publish(metrics_topic(), envelope(HUB, HOST, 41, samples)).value == 0
        [ack] = acks.messages(timeout=10)
    assert wire.decode_ack(ack.payload) == [(41, 41)]
    [ups] = influx.rows("SELECT * FROM ups", db="hubwatch")
    assert (ups["hub"], ups["host"], ups["ups"], ups["source"]) == (HUB, HOST, "hubups", "nut")
    assert ups["time"] == now and ups["battery_charge_percent"] == 80.0 and ups["status"] == "OB DISCHRG"
    assert ups["on_battery"] is True and ups["on_line"] is False
    [net] = influx.rows("SELECT * FROM net", db="hubwatch")
    assert net["rx_bytes_total"] == 2**40 and net["iface"] == "eth0"
    types = {r["fieldKey"]: r["fieldType"] for r in influx.rows("SHOW FIELD KEYS FROM net", db="hubwatch")}
    assert types == {"rx_bytes_total": "integer", "link_up": "boolean", "speed_mbps": "float"}
    # the collector reports on itself
    wait_for(lambda: count_points(influx, "hubwatch", "hubwatch_collector"), 10, "self-metrics")
    [stats] = influx.rows("SELECT last(written_total) AS written FROM hubwatch_collector WHERE instance='c1'",
                          db="hubwatch")
    assert stats["written"] >= 3
    collector.stop()
    assert collector.proc.returncode == 0, collector.log_tail()


def test_status_messages_become_points(tmp_path, mosquitto, influx):
    start_collector(tmp_path, mosquitto, influx)
    with mosquitto.client() as agent:
        agent.publish(metrics_topic(kind="status"), b"online", retain=True)
        agent.publish(metrics_topic(host="lab07", kind="status"), b"offline", retain=True)
    rows = wait_for(lambda: len(r := influx.rows("SELECT * FROM status GROUP BY host", db="hubwatch")) == 2 and r,
                    10, "two status points")
    states = {r["host"]: (r["state"], r["online"]) for r in rows}
    assert states == {"gw01": ("online", True), "lab07": ("offline", False)}


def test_influxdb_down_mid_stream_loses_nothing(tmp_path, mosquitto, influx):
    collector = start_collector(tmp_path, mosquitto, influx)
    start = time.time_ns() - 10**12
    sent = 0
    with mosquitto.client() as agent:
        for seq in range(10):
            agent.publish(metrics_topic(), envelope(HUB, HOST, seq, ups_samples(500, start + seq * 10**9)))
            sent += 500
        wait_for(lambda: count_points(influx, "hubwatch", "ups") == sent, 20, "first 5,000 points")
        influx.stop()
        for seq in range(10, 60):  # 25,000 samples while InfluxDB is down
            agent.publish(metrics_topic(), envelope(HUB, HOST, seq, ups_samples(500, start + seq * 10**9)))
            sent += 500
        time.sleep(2)
        assert collector.running, collector.log_tail()
        influx.start()
    wait_for(lambda: count_points(influx, "hubwatch", "ups") == sent, 60, f"{sent} points after restart")
    rss_kb = int(next(l for l in open(f"/proc/{collector.proc.pid}/status") if l.startswith("VmRSS")).split()[1])
    assert rss_kb < 200_000, f"collector RSS {rss_kb} kB"
    assert "retrying" in collector.log_path.read_text()


def test_influxdb_down_holds_intake_at_its_own_bound_and_the_broker_keeps_the_rest(tmp_path, mosquitto, influx):
    # A broker that ignores the collector's Receive Maximum (mosquitto 2.0.11 under load) is
    # played by QoS 0 messages, which Receive Maximum does not cover: the broker pushes them
    # all. The collector takes at most its bound (20 messages here) off the socket, keeps the
    # connection alive through an outage of over 3 keepalives, and loses nothing.
    collector = start_collector(tmp_path, mosquitto, influx, mqtt="keepalive: 5s", ingest="receive_maximum: 20")
    start = time.time_ns() - 10**12
    influx.stop()
    sent = 0
    with mosquitto.client() as agent:
        for seq in range(400):  # 40,000 samples while InfluxDB is down
            agent.publish(metrics_topic(), envelope(HUB, HOST, seq, ups_samples(100, start + seq * 10**9)), qos=0)
            sent += 100
    wait_for(lambda: "intake paused" in collector.log_path.read_text(), 10, "intake to pause")
    time.sleep(16)
    assert collector.running, collector.log_tail()
    influx.start()
    wait_for(lambda: count_points(influx, "hubwatch", "ups") == sent, 90, f"{sent} points after restart",
             interval=0.5)
    log_text = collector.log_path.read_text()
    held = [int(n) for n in re.findall(r"(\d+) messages held unacknowledged", log_text)]
    assert held and max(held) <= 21, held
    assert "disconnected from the broker" not in log_text, collector.log_tail()
    assert "intake resumed" in log_text


def test_collector_killed_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path, mosquitto, influx):
    collector = start_collector(tmp_path, mosquitto, influx)
    start = time.time_ns() - 10**12
    with mosquitto.client() as agent:
        for seq in range(40):
            agent.publish(metrics_topic(), envelope(HUB, HOST, seq, ups_samples(250, start + seq * 10**9)))
            if seq == 20:
                collector.kill()
    collector = start_collector(tmp_path, mosquitto, influx)  # same client id: resumes the session
    wait_for(lambda: count_points(influx, "hubwatch", "ups") == 40 * 250, 30, "10,000 points")
    time.sleep(1)
    assert count_points(influx, "hubwatch", "ups") == 40 * 250


def test_three_collectors_share_the_load_exactly_once(tmp_path, mosquitto, influx):
    collectors = [start_collector(tmp_path, mosquitto, influx, instance=f"c{i}") for i in (1, 2, 3)]
    start = time.time_ns() - 10**12
    hosts = [f"lab{i:02d}" for i in range(10)]
    with mosquitto.client() as agent:
        for seq in range(20):
            for host in hosts:
                agent.publish(metrics_topic(host=host), envelope(HUB, host, seq, ups_samples(250, start + seq * 10**9)))
    total = 20 * len(hosts) * 250
    wait_for(lambda: count_points(influx, "hubwatch", "ups") == total, 60, f"{total} points")
    rows = wait_for(lambda: len(r := influx.rows(
        "SELECT last(written_total) AS w FROM hubwatch_collector WHERE reason = '' GROUP BY instance",
        db="hubwatch")) == 3 and sum(x["w"] for x in r) >= total and r, 15, "each instance's final counters")
    shares = {r["instance"]: r["w"] for r in rows}
    assert all(w >= total * 0.15 for w in shares.values()), f"an instance did not take a real share: {shares}"
    for c in collectors:
        c.stop()


def test_api_v2_writes_through_influxdb_client(tmp_path, mosquitto, influx, victoria):
    start_collector(tmp_path, mosquitto, influx, api="v2", influx_url=victoria.url, instance="v2")
    now = time.time_ns() - 5 * 10**9
    samples = [Sample("ups", now, {"ups": "hubups", "source": "snmp"},
                      {"battery_charge_percent": 64.5, "on_battery": True, "status": "OB"}),
               Sample("net", now, {"iface": "wlan0"}, {"rx_bytes_total": 123456789})]
    with mosquitto.subscriber(metrics_topic(kind="ack")) as acks, mosquitto.client() as agent:
        agent.publish(metrics_topic(), envelope(HUB, HOST, 7, samples))
        [ack] = acks.messages(timeout=10)
    assert wire.decode_ack(ack.payload) == [(7, 7)]
    [charge] = victoria.wait_export('{__name__="ups_battery_charge_percent"}')
    assert charge["metric"] == {"__name__": "ups_battery_charge_percent", "hub": HUB, "host": HOST,
                                "ups": "hubups", "source": "snmp"}
    assert charge["values"] == [64.5] and charge["timestamps"] == [now // 10**6]
    [on_battery] = victoria.wait_export('{__name__="ups_on_battery"}')
    assert on_battery["values"] == [1]
    [rx] = victoria.wait_export('{__name__="net_rx_bytes_total"}')
    assert rx["values"] == [123456789] and rx["metric"]["iface"] == "wlan0"
