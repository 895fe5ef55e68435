"""Collector throughput into a real influxd, against writing the same points straight to
influxd in 5,000-line batches, with 1, 2 and 3 collector instances in one share group.

The broker is preloaded: collectors connect once (creating their persistent sessions and
shared subscriptions), stop, the samples are published, then the collectors start and the
clock runs until influxd has accepted every point. So the publisher's speed does not count.
Progress is read from influxd's own write counters (``/debug/vars``), which cost it nothing:
polling ``count(*)`` instead would take influxd CPU, growing with the data, that the direct
write does not pay. Every point is then counted with InfluxQL once the clock has stopped.

    python bench/collector_throughput.py [--samples 600000] [--instances 1,2,3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import progress, table  # noqa: E402  (sets sys.path)

from agent import wire  # noqa: E402
from agent.wire import Envelope, Sample  # noqa: E402
from collector.lineproto import format_line  # noqa: E402
from tests.collector_harness import count_points, start_collector  # noqa: E402
from tests.services.influx import InfluxServer  # noqa: E402
from tests.services.mosquitto import MosquittoBroker, MqttClient  # noqa: E402

SAMPLES_PER_MESSAGE = 500
HOSTS = 50


def realistic_samples(n: int, start_ns: int, host_index: int) -> list[Sample]:
    """A mix like the default probes': ups, net, system, ping."""
    out = []
    for i in range(n):
        t = start_ns + i * 10**7
        kind = i % 4
        if kind == 0:
            out.append(Sample("ups", t, {"ups": "hubups", "source": "nut"},
                              {"battery_charge_percent": 100.0 - i % 50, "battery_runtime_seconds": 1800.0,
                               "input_voltage_volts": 229.5, "load_percent": 23.0, "status": "OL",
                               "on_line": True, "on_battery": False}))
        elif kind == 1:
            out.append(Sample("net", t, {"iface": "eth0"}, {"rx_bytes_total": 10**9 + i * 1500,
                                                             "tx_bytes_total": 10**8 + i * 300, "link_up": True}))
        elif kind == 2:
            out.append(Sample("system", t, {}, {"uptime_seconds": 3600.0 + i, "cpu_percent": 12.5,
                                                 "memory_used_percent": 41.0, "load1": 0.4}))
        else:
            out.append(Sample("ping", t, {"target": "internet", "address": "1.1.1.1"},
                              {"rtt_avg_ms": 41.2, "loss_percent": 0.0, "reachable": True}))
    return out


def build_messages(total: int) -> list[tuple[str, bytes, list[Sample]]]:
    messages, start = [], time.time_ns() - 86400 * 10**9
    for m in range(total // SAMPLES_PER_MESSAGE):
        host = f"lab{m % HOSTS:02d}"
        samples = realistic_samples(SAMPLES_PER_MESSAGE, start + m * 10**10, m % HOSTS)
        payload = wire.encode(Envelope("bench-hub", host, m // HOSTS, time.time(), tuple(samples)))
        messages.append((wire.topic("hubwatch", "bench-hub", host, "metrics"), payload, samples))
    return messages


def publish_all(broker: MosquittoBroker, messages) -> None:
    client = MqttClient(broker, "bench-publisher")
    infos = [client.paho.publish(t, p, qos=1) for t, p, _ in messages]
    for info in infos:
        info.wait_for_publish(60)
    client.close()


TARGET_RATE = 30_000  # samples/s on one core (DESIGN.md, "Performance targets")
TARGET_RATIO = 2.0  # at most this many times slower than the direct write


def total_points(influx: InfluxServer, db: str) -> int:
    return sum(count_points(influx, db, m) for m in ("ups", "net", "system", "ping"))


def accepted_points(influx: InfluxServer, db: str) -> int:
    """Points influxd has written into ``db`` so far, from its counters (cheap to read)."""
    with urllib.request.urlopen(f"{influx.url}/debug/vars", timeout=10) as response:
        stats = json.load(response)
    return sum(v["values"].get("writePointsOk", 0) for k, v in stats.items()
               if k.startswith("shard:") and v.get("tags", {}).get("database") == db)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_collectors(work: Path, instances: int, messages, expected: int) -> tuple[float, float]:
    """Seconds until influxd has every point, and the busiest instance's CPU in cores."""
    broker = MosquittoBroker(work / f"mq{instances}", extra_config=["max_queued_messages 10000000",
                                                                    "max_queued_bytes 0"]).start()
    influx = InfluxServer(work / f"influx{instances}").start()
    try:
        procs = [start_collector(work, broker, influx, instance=f"b{instances}x{i}",
                                 extra="") for i in range(instances)]
        for p in procs:
            p.stop()
        progress(f"{instances} collector(s): preloading the broker with {expected:,} samples")
        publish_all(broker, messages)
        started = time.monotonic()
        procs = [start_collector(work, broker, influx, instance=f"b{instances}x{i}") for i in range(instances)]
        # the collectors also write a few points of their own (self-metrics, outages): the
        # counters may reach the total just before the last sample is in; the count settles it
        while accepted_points(influx, "hubwatch") < expected or total_points(influx, "hubwatch") < expected:
            time.sleep(0.1)
            if time.monotonic() - started > 600:
                raise RuntimeError("collectors did not finish within 10 minutes")
        elapsed = time.monotonic() - started
        cores = max(cpu_seconds(p.proc.pid) for p in procs) / elapsed
        for p in procs:
            p.stop()
        assert total_points(influx, "hubwatch") == expected
        return elapsed, cores
    finally:
        broker.stop()
        influx.stop()


def run_direct(work: Path, messages, expected: int) -> float:
    influx = InfluxServer(work / "influx-direct").start()
    try:
        influx.create_database("direct")
        lines = [format_line(s.measurement, {**s.tags, "hub": "bench-hub", "host": t.split("/")[3]}, s.fields, s.time_ns)
                 for t, _, samples in messages for s in samples]
        conn = http.client.HTTPConnection(influx.host, influx.port, timeout=60)
        started = time.monotonic()
        for i in range(0, len(lines), 5000):
            conn.request("POST", "/write?db=direct&precision=ns", body="\n".join(lines[i:i + 5000]).encode())
            response = conn.getresponse()
            response.read()
            assert response.status == 204, response.status
        elapsed = time.monotonic() - started
        assert total_points(influx, "direct") == expected
        return elapsed
    finally:
        influx.stop()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600_000)
    parser.add_argument("--instances", default="1,2,3")
    args = parser.parse_args(argv)
    progress(f"building {args.samples:,} samples")
    messages = build_messages(args.samples)
    expected = len(messages) * SAMPLES_PER_MESSAGE
    rates: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hubwatch-bench-") as tmp:
        work = Path(tmp)
        progress("direct write, 5,000-line batches")
        direct = expected / run_direct(work, messages, expected)
        rows = [["influxd direct write (5,000-line batches)", f"{direct:,.0f}", "1.00", "–"]]
        for n in [int(x) for x in args.instances.split(",")]:
            elapsed, cores = run_collectors(work, n, messages, expected)
            rate = expected / elapsed
            rates[n] = (rate, direct / rate)
            progress(f"{n} collector(s): {rate:,.0f} samples/s, {direct / rate:.2f}× slower than direct")
            rows.append([f"hubwatch-collector × {n}", f"{rate:,.0f}", f"{direct / rate:.2f}", f"{cores:.2f}"])
    text = (f"{expected:,} samples ({SAMPLES_PER_MESSAGE} a message, ups/net/system/ping mix, {HOSTS} hosts), "
            "broker preloaded; the clock runs from starting the collector processes until influxd has "
            "accepted every point (read from its write counters, then every point counted). The collector "
            "writes gzip-compressed line protocol; the direct write sends it plain.\n\n"
            + table(["writer", "samples/s", "direct ÷ this (lower is better)", "busiest instance's CPU (cores)"],
                    rows)
            + "\n\n" + verdict(rates.get(1)))
    print(text)
    return text


def verdict(one: tuple[float, float] | None) -> str:
    """The target's verdict, from the one-instance run: ``(samples/s, times slower than direct)``."""
    target = (f"≥ {TARGET_RATE:,} samples/s on one core, within {TARGET_RATIO:g}× of the direct write "
              "(DESIGN.md)")
    if one is None:
        return f"**Target {target}: not measured** (no one-instance run)."
    rate, ratio = one
    met = rate >= TARGET_RATE and ratio <= TARGET_RATIO
    return (f"**Target {target}: {'met' if met else 'NOT met'}** — one instance: {rate:,.0f} samples/s, "
            f"{ratio:.2f}× the direct write's time.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
