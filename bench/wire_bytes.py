"""Wire bytes per hub per day for the default probes at 10 s, counted at an MQTT subscriber
(payload + topic bytes), against collectd's MQTT output for the same metrics and against the
same samples sent as one line-protocol message per sample (Telegraf's MQTT output default).

Real programs, side by side on one mosquitto and one upsd (dummy-ups):

- **hubwatch-agent**, default settings (``buffer.batch_max_age`` 60 s: 6 cycles at a 10 s
  interval share a message; zlib with the wire's preset dictionary when smaller), and a second
  one with ``batch_max_age: 0`` (one message per cycle), for comparison; a stand-in collector
  acknowledges every message, and those acks (collector → hub, on the same metered link) are
  counted too;
- **collectd** with the same probes' plugins and its mqtt write plugin (QoS 1);
- **line protocol, one message per sample**: computed from the very samples hubwatch sent,
  with ``collector.lineproto.format_line`` (plus Telegraf's trailing newline), on Telegraf's
  topic ``telegraf/{host}/{measurement}``.

The size of a cycle's output does not depend on the interval, so the programs run at a
shorter interval (default 1 s, the batch age scaled with it: 6 cycles) and the bytes per cycle
are scaled to 8,640 cycles a day (10 s).

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
BATCH_CYCLES = 6  # the default buffer.batch_max_age (60 s) at a 10 s interval
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
            progress(f"hubwatch-agent ×2 (default: {BATCH_CYCLES} cycles a message; per cycle) and collectd "
                     f"at {args.interval:g} s for {args.cycles} cycles")
            batch_age = BATCH_CYCLES * args.interval
            for host, age in (("gw01", batch_age), ("gw02", 0.0)):
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
        name = {"gw01": "hubwatch", "gw02": "hubwatch-per-cycle"}.get(parts.host)
        if name is None:
            continue
        if parts.kind == "ack":
            tallies[f"{name}-acks"].add(topic, len(payload), v5=True)
        elif parts.kind in ("metrics", "events"):
            envelope = wire.decode(payload)
            tallies[name].add(topic, len(payload), v5=True)
            tallies[name].cycles += sum(1 for s in envelope.samples if s.measurement == "system")
            if name == "hubwatch-per-cycle":
                samples_sent += envelope.samples
    lp = tallies["lineproto"]
    for s in samples_sent:
        lp.add(f"telegraf/{s.tags.get('host', 'gw01')}/{s.measurement}".encode(),
               len(format_line(s.measurement, s.tags, s.fields, s.time_ns).encode()) + 1, v5=False)
    lp.cycles = tallies["hubwatch-per-cycle"].cycles
    for name in ("hubwatch", "hubwatch-per-cycle"):
        tallies[f"{name}-acks"].cycles = tallies[name].cycles
    text = report(tallies, args, len(samples_sent))
    print(text)
    return text


def report(t: dict[str, Tally], args, samples: int) -> str:
    def mb(x: float) -> str:
        return f"{x / 1e6:.2f}"

    peers = {"collectd (mqtt write plugin)": t["collectd"],
             "line protocol, one message per sample (Telegraf's default)": t["lineproto"]}
    smaller = min(p.per_day("bytes") for p in peers.values())
    rows = []
    for label, tally in [(f"**hubwatch**, default (batch_max_age 60 s = {BATCH_CYCLES} cycles)", t["hubwatch"]),
                         ("hubwatch, one message per cycle (batch_max_age 0)", t["hubwatch-per-cycle"]),
                         *peers.items()]:
        per_day = tally.per_day("bytes")
        rows.append([label, f"{tally.messages / tally.cycles * CYCLES_PER_DAY:,.0f}",
                     f"{tally.bytes / tally.cycles:,.0f}", mb(per_day), f"{per_day / smaller:.2f}",
                     mb(tally.per_day("framed"))])
    for name, label in (("hubwatch-acks", "hubwatch acks to the hub (default)"),
                        ("hubwatch-per-cycle-acks", "hubwatch acks to the hub (per cycle)")):
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
              f"{samples / max(1, t['hubwatch-per-cycle'].cycles):.0f} samples each (its own `agent` point included). "
              "Line protocol: the same samples with their hub and host tags, ns timestamps, topic "
              "`telegraf/{host}/{measurement}`. \"÷ smaller peer\": against the smaller of collectd and "
              "line protocol. Framing: MQTT fixed header, topic length, packet id (and MQTT 5's properties "
              "length for hubwatch) and the 4-byte PUBACK; TCP/IP headers not counted. "
              f"Messages per cycle: {t['hubwatch'].messages / max(1, t['hubwatch'].cycles):.2f} by default, "
              f"{t['hubwatch-per-cycle'].messages / max(1, t['hubwatch-per-cycle'].cycles):.2f} with "
              "batch_max_age 0 (a cycle's UPS read travels with its other samples). Payloads are zlib with the "
              "wire's preset dictionary (agent/wire_dict.py) when that is smaller.")
    def verdict(name: str, label: str) -> str:
        per_day = t[name].per_day("bytes")
        share = per_day / smaller
        ok = per_day <= TARGET_DAY_MB * 1e6 and share <= TARGET_SHARE
        return (f"{label}: {per_day / 1e6:.2f} MB/day, {100 * share:.0f}% of the smaller peer — "
                f"{'met' if ok else 'NOT met'}")
    verdicts = (f"**Verdict (target ≤ {TARGET_DAY_MB:g} MB per hub per day and ≤ {100 * TARGET_SHARE:.0f}% of the "
                f"smaller peer):** {verdict('hubwatch', 'default (batch_max_age 60 s)')}. For comparison, "
                f"{verdict('hubwatch-per-cycle', 'one message per cycle')}. The acks the collector sends back "
                "to the hub are not in the target's figure; they are listed above.")
    return config + "\n\n" + table(headers, rows) + "\n\n" + verdicts


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
