"""Wire bytes per hub per day for the default probes at 10 s, counted at an MQTT subscriber
(payload + topic bytes), against collectd's MQTT output for the same metrics and against the
same samples sent as one line-protocol message per sample (Telegraf's MQTT output default).

Real programs, side by side on one mosquitto and one upsd (dummy-ups):

- **hubwatch-agent**, default settings (one message per cycle, zlib when smaller), and a
  second one with ``buffer.batch_max_age`` set to 6 cycles (60 s at a 10 s interval);
  a stand-in collector acknowledges every message, and those acks (collector → hub, on the
  same metered link) are counted too;
- **collectd** with the same probes' plugins and its mqtt write plugin (QoS 1);
- **line protocol, one message per sample**: computed from the very samples hubwatch sent,
  with ``collector.lineproto.format_line`` (plus Telegraf's trailing newline), on Telegraf's
  topic ``telegraf/{host}/{measurement}``.

The size of a cycle's output does not depend on the interval, so the programs run at a
shorter interval (default 1 s, batch age scaled with it) and the bytes per cycle are scaled
to 8,640 cycles a day (10 s).

    python bench/wire_bytes.py [--interval 1] [--cycles 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import progress, table  # noqa: E402  (sets sys.path)

from agent import wire  # noqa: E402
from agent_footprint import (PING_TARGETS, agent_yaml, check_peers_installed, collectd_conf,  # noqa: E402
                             start_agent, start_collectd, start_nut, two_interfaces)
from collector.lineproto import format_line  # noqa: E402
from tests.services.mosquitto import MosquittoBroker, Subscriber  # noqa: E402
from tests.services.nut import NutServers  # noqa: E402
from tests.standin_collector import StandInCollector  # noqa: E402

CYCLES_PER_DAY = 86400 // 10
BATCH_CYCLES = 6  # buffer.batch_max_age: 60s at a 10 s interval
HUB = "gilgit-sco-01"
TARGET_DAY_MB = 2.0
TARGET_SHARE = 0.25


def mqtt_framing(topic: bytes, payload_len: int, v5: bool) -> int:
    """Bytes a QoS 1 PUBLISH adds beyond topic and payload, plus its PUBACK.

    Fixed header (1) + remaining length (1-4) + topic length (2) + packet id (2), and for MQTT 5
    the properties length (1); the PUBACK is 4 bytes. TCP/IP headers are not counted."""
    body = 2 + len(topic) + 2 + (1 if v5 else 0) + payload_len
    length_bytes = 1 if body < 128 else 2 if body < 16384 else 3 if body < 2097152 else 4
    return 1 + length_bytes + 2 + 2 + (1 if v5 else 0) + 4


@dataclass
class Tally:
    messages: int = 0
    bytes: int = 0      # topic + payload
    framed: int = 0     # ... plus MQTT framing and PUBACK
    cycles: int = 0

    def add(self, topic: bytes, payload_len: int, v5: bool) -> None:
        self.messages += 1
        self.bytes += len(topic) + payload_len
        self.framed += len(topic) + payload_len + mqtt_framing(topic, payload_len, v5)

    def per_day(self, attr: str) -> float:
        return getattr(self, attr) / self.cycles * CYCLES_PER_DAY if self.cycles else float("nan")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between cycles while measuring")
    parser.add_argument("--cycles", type=int, default=60, help="cycles in the measuring window")
    parser.add_argument("--warmup", type=float, default=8.0)
    args = parser.parse_args(argv)
    check_peers_installed()
    window = args.interval * args.cycles
    with tempfile.TemporaryDirectory(prefix="hubwatch-bench-") as tmp:
        work = Path(tmp)
        servers = NutServers()
        broker = MosquittoBroker(work / "mosquitto")
        procs = []
        try:
            broker.start()
            nut = start_nut(servers)
            collector = StandInCollector(broker, client_id="bench-standin")
            tap = Subscriber(broker, "#", client_id="bench-tap")
            progress(f"hubwatch-agent ×2 (per cycle, batched {BATCH_CYCLES} cycles) and collectd "
                     f"at {args.interval:g} s for {args.cycles} cycles")
            batch_age = BATCH_CYCLES * args.interval
            for host, age in (("gw01", 0.0), ("gw02", batch_age)):
                config = agent_yaml(work / f"agent-{host}.yaml", hub=HUB, host=host, interval=args.interval,
                                    broker_port=broker.port, nut_port=nut.port, batch_max_age=age)
                procs.append(start_agent(work, f"agent-{host}", config))
            conf = collectd_conf(work / "collectd.conf", hostname="gw03", interval=args.interval,
                                 broker_port=broker.port, nut_port=nut.port)
            procs.append(start_collectd(work, "collectd", conf))
            time.sleep(args.warmup)
            tap.messages(timeout=0)
            opened = time.monotonic()
            got = []
            while time.monotonic() - opened < window:
                got += tap.messages(timeout=1.0, count=10**9)
            closed = time.monotonic()
            got += tap.messages(timeout=0.5, count=10**9)
            tap.close()
            collector.close()
        finally:
            for proc in procs:
                proc.stop()
            servers.close()
            broker.stop()

    tallies: dict[str, Tally] = defaultdict(Tally)
    samples_sent = []
    for message in got:
        if not opened <= message.timestamp <= closed:
            continue
        topic = message.topic.encode()
        payload = bytes(message.payload)
        if message.topic.startswith("collectd/"):
            tallies["collectd"].add(topic, len(payload), v5=False)
            if message.topic.endswith("/cpu/percent-active"):
                tallies["collectd"].cycles += 1
            continue
        parts = wire.parse_topic("hubwatch", message.topic)
        name = {"gw01": "hubwatch", "gw02": "hubwatch-batched"}.get(parts.host)
        if name is None:
            continue
        if parts.kind == "ack":
            tallies[f"{name}-acks"].add(topic, len(payload), v5=True)
        elif parts.kind in ("metrics", "events"):
            envelope = wire.decode(payload)
            tallies[name].add(topic, len(payload), v5=True)
            tallies[name].cycles += sum(1 for s in envelope.samples if s.measurement == "system")
            if name == "hubwatch":
                samples_sent += envelope.samples
    lp = tallies["lineproto"]
    for s in samples_sent:
        lp.add(f"telegraf/{s.tags.get('host', 'gw01')}/{s.measurement}".encode(),
               len(format_line(s.measurement, s.tags, s.fields, s.time_ns).encode()) + 1, v5=False)
    lp.cycles = tallies["hubwatch"].cycles
    what_if(tallies, samples_sent)
    for name in ("hubwatch", "hubwatch-batched"):
        tallies[f"{name}-acks"].cycles = tallies[name].cycles
    text = report(tallies, args, len(samples_sent))
    print(text)
    return text


def what_if(tallies: dict[str, Tally], samples: list[wire.Sample]) -> None:
    """Computed, not sent: the default cycle's samples in one message (today the UPS sample,
    read on its own thread, leaves in a message of its own), with and without the hub and host
    tags that the topic already carries."""
    systems = sorted(s.time_ns for s in samples if s.measurement == "system")
    if not systems:
        return
    cycles: dict[int, list[wire.Sample]] = defaultdict(list)
    for s in samples:
        cycles[min(systems, key=lambda t: abs(t - s.time_ns))].append(s)
    topic = wire.topic("hubwatch", HUB, "gw01", "metrics").encode()
    for name, strip in (("one-message", False), ("one-message-untagged", True)):
        tally = tallies[name]
        for seq, group in enumerate(cycles.values(), 1):
            if strip:
                group = [wire.Sample(s.measurement, s.time_ns, {k: v for k, v in s.tags.items()
                                                                 if k not in ("hub", "host")}, s.fields)
                         for s in group]
            payload = wire.encode(wire.Envelope(HUB, "gw01", seq, time.time(), tuple(group)))
            tally.add(topic, len(payload), v5=True)
            tally.cycles += 1


def report(t: dict[str, Tally], args, samples: int) -> str:
    def mb(x: float) -> str:
        return f"{x / 1e6:.2f}"

    peers = {"collectd (mqtt write plugin)": t["collectd"],
             "line protocol, one message per sample (Telegraf's default)": t["lineproto"]}
    smaller = min(p.per_day("bytes") for p in peers.values())
    rows = []
    for label, tally in [("**hubwatch**, one message per cycle (default)", t["hubwatch"]),
                         (f"**hubwatch**, batch_max_age = {BATCH_CYCLES} cycles (60 s)", t["hubwatch-batched"]),
                         ("what-if, computed: the cycle's samples in one message", t["one-message"]),
                         ("what-if, computed: … and without per-sample hub/host tags", t["one-message-untagged"]),
                         *peers.items()]:
        per_day = tally.per_day("bytes")
        rows.append([label, f"{tally.messages / tally.cycles * CYCLES_PER_DAY:,.0f}",
                     f"{tally.bytes / tally.cycles:,.0f}", mb(per_day), f"{per_day / smaller:.2f}",
                     mb(tally.per_day("framed"))])
    for name, label in (("hubwatch-acks", "hubwatch acks to the hub (per cycle)"),
                        ("hubwatch-batched-acks", "hubwatch acks to the hub (batched)")):
        tally = t[name]
        rows.append([label, f"{tally.messages / tally.cycles * CYCLES_PER_DAY:,.0f}",
                     f"{tally.bytes / tally.cycles:,.0f}", mb(tally.per_day("bytes")), "–",
                     mb(tally.per_day("framed"))])
    headers = ["sender", "messages / day", "bytes / cycle", "MB / day (payload + topic)", "÷ smaller peer",
               "MB / day with MQTT framing + PUBACK"]
    config = (f"Default probes: system, network ({', '.join(two_interfaces())}), ping "
              f"({len(PING_TARGETS)} targets), nut (dummy-ups serving a real APC Back-UPS RS 800 dump); every "
              f"program ran at {args.interval:g} s for {args.cycles} cycles side by side and the bytes per cycle "
              f"are scaled to {CYCLES_PER_DAY:,} cycles a day (10 s). hubwatch cycles carried "
              f"{samples / max(1, t['hubwatch'].cycles):.0f} samples each (its own `agent` point included). "
              "Line protocol: the same samples with their hub and host tags, ns timestamps, topic "
              "`telegraf/{host}/{measurement}`. \"÷ smaller peer\": against the smaller of collectd and "
              "line protocol. Framing: MQTT fixed header, topic length, packet id (and MQTT 5's properties "
              "length for hubwatch) and the 4-byte PUBACK; TCP/IP headers not counted. "
              f"hubwatch's default sent {t['hubwatch'].messages / max(1, t['hubwatch'].cycles):.1f} messages per "
              "cycle: the UPS sample (read on its own thread every ups_poll) is committed and packed apart from "
              "the other probes' samples. The what-if rows re-encode the samples hubwatch sent with "
              "`agent.wire.encode`, grouped by cycle: they are not measured traffic.")
    def verdict(name: str, label: str) -> str:
        per_day = t[name].per_day("bytes")
        share = per_day / smaller
        ok = per_day <= TARGET_DAY_MB * 1e6 and share <= TARGET_SHARE
        return (f"{label}: {per_day / 1e6:.2f} MB/day, {100 * share:.0f}% of the smaller peer — "
                f"{'met' if ok else 'NOT met'}")
    verdicts = (f"**Verdict (target ≤ {TARGET_DAY_MB:g} MB per hub per day and ≤ {100 * TARGET_SHARE:.0f}% of the "
                f"smaller peer):** {verdict('hubwatch', 'default')}; "
                f"{verdict('hubwatch-batched', 'batch_max_age 60 s')}. The acks the collector sends back "
                "to the hub are not in the target's figure; they are listed above.")
    return config + "\n\n" + table(headers, rows) + "\n\n" + verdicts


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
