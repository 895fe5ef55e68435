"""Replay: a 24 h outbox backlog (8,640 cycles at 10 s of the default probes' samples) drained
by the real ``hubwatch-agent`` to a local mosquitto.

The backlog is written straight through ``agent.outbox.Outbox`` (a day cannot be waited
for), shaped the ways an outage leaves it:

- **outage** (what the agent leaves now): each cycle committed in one transaction (its UPS
  read included); with the link down, metrics are packed only into full batches
  (``batch_max_samples``: 1,000 samples a message), the rest left as pending rows that the agent
  packs when the link returns;
- **per-cycle, pre-packed** (what agents before that left, with ``batch_max_age: 0``): every
  cycle packed while the broker was down — the UPS sample in a message of its own, the other
  probes' samples and the ``agent`` point in another: 17,280 messages;
- **batched, pre-packed** (the same with ``batch_max_age: 60s``): one message per 6 cycles;
- **held** (the clock was not trusted during the outage): pending rows whose times the agent
  corrects when it packs them.

The samples are real ones — one cycle of the real probes (system, network on two
interfaces, ping to two targets, nut on a dummy-ups UPS) taken at start, plus the agent's
own point — repeated with advancing times, counters and values.

Then the broker is up and the agent is started; the clock runs from the agent's start until
every backlog sample has reached the receiver, which is either

- a lean acker in this process (subscribes with a persistent session, reads each message's
  seq and sample count, acks at once: the collector's contract without its work), or
- the real ``hubwatch-collector`` writing into a real influxd (the clock stops when every
  backlog point is queryable).

    python bench/replay.py [--hours 24] [--shapes outage,per-cycle,held] [--collector outage]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import progress, table  # noqa: E402  (sets sys.path)

from agent import config as agent_config  # noqa: E402
from agent import wire  # noqa: E402
from agent.clock import Reading, SystemClock  # noqa: E402
from agent.outbox import COUNTERS, Outbox, read_stats  # noqa: E402
from agent.probes import ProbeContext  # noqa: E402
from agent.runner import ProbeRunner  # noqa: E402
from agent.wire import Sample  # noqa: E402
from agent_footprint import agent_yaml, start_agent, start_nut  # noqa: E402
from tests.collector_harness import start_collector  # noqa: E402
from tests.services.influx import InfluxServer  # noqa: E402
from tests.services.mosquitto import MosquittoBroker  # noqa: E402
from tests.services.nut import NutServers  # noqa: E402

HUB, HOST = "gilgit-sco-01", "gw01"
INTERVAL_S = 10
TARGET_RATE = 10_000
#: backlog shape -> the buffer.batch_max_age it was packed with (None: left pending, the agent's default)
SHAPES: dict[str, float | None] = {"outage": None, "per-cycle": 0.0, "batched": 60.0, "held": None}
#: One field every point of a measurement has, to count points in InfluxDB.
COUNT_FIELD = {"system": "uptime_seconds", "net": "rx_bytes_total", "ping": "loss_percent",
               "ups": "battery_charge_percent", "agent": "outbox_samples"}


# --- the backlog ------------------------------------------------------------------------------

def real_cycle(nut_port: int, work: Path) -> tuple[list[Sample], list[Sample]]:
    """One cycle of the real default probes: (UPS samples, the others)."""
    path = agent_yaml(work / "template.yaml", hub=HUB, host=HOST, interval=INTERVAL_S, broker_port=1883,
                      nut_port=nut_port)
    config = agent_config.load(path)
    runner = ProbeRunner(config, ProbeContext(outbox_path=work / "template.db", timeout=config.probe_timeout))
    try:
        runner.run_once()  # the first cycle has no CPU or rate baseline
        time.sleep(1.0)
        samples = runner.run_once()
    finally:
        runner.close()
    problems = [s for s in samples if s.measurement == "agent"]
    if problems:
        raise RuntimeError(f"a probe failed while taking the template cycle: {problems}")
    return [s for s in samples if s.measurement == "ups"], [s for s in samples if s.measurement != "ups"]


def advance(sample: Sample, i: int, t_ns: int) -> Sample:
    """The sample as it would be i cycles later: counters grow, gauges wander a little."""
    fields = {}
    for name, value in sample.fields.items():
        if isinstance(value, bool) or isinstance(value, str):
            fields[name] = value
        elif name.endswith("_total") and isinstance(value, int):
            fields[name] = value + i * (1500 if "bytes" in name else 3)
        elif name == "uptime_seconds":
            fields[name] = round(value + i * INTERVAL_S, 2)
        elif isinstance(value, float):
            wobble = 1 + ((i * 37) % 11 - 5) / 100
            fields[name] = round(value * wobble, 3)
        else:
            fields[name] = value
    return Sample(sample.measurement, t_ns, sample.tags, fields)


def agent_point(i: int, t_ns: int, held: int) -> Sample:
    """The agent's own point during an outage (fields as Agent._agent_sample makes them)."""
    fields: dict = {"outbox_samples": float(held), "outbox_messages": float(i), "outbox_bytes": float(held * 420),
                    "mqtt_connected": False, "clock_trusted": True,
                    "outbox_oldest_age_seconds": float(i * INTERVAL_S)}
    fields.update({name: 0 for name in COUNTERS})
    return Sample("agent", t_ns, {"hub": HUB, "host": HOST}, fields)


def fill(db: Path, shape: str, ups: list[Sample], others: list[Sample], cycles: int, start_ns: int) -> int:
    """Write the backlog as the agent would have during the outage; the number of samples."""
    clock = SystemClock()
    offset = time.time_ns() - clock.boottime_ns()
    trusted = shape != "held"
    total = 0
    packed_with = SHAPES[shape]
    with Outbox(db, HUB, HOST, batch_max_age_s=packed_with or 0.0) as outbox:
        # Setting up only: the drain below runs on the agent's own connection (synchronous=FULL).
        outbox._conn.execute("PRAGMA synchronous = OFF")
        for i in range(cycles):
            t = start_ns + i * INTERVAL_S * 10**9
            reading = Reading(t, t - offset, clock.boot_id(), trusted)
            cycle = [advance(s, i, t) for s in others] + [agent_point(i, t, total)]
            ups_now = [advance(s, i, t + 5_000_000) for s in ups]
            if packed_with is None:
                # One commit a cycle; with the link down only full batches are packed.
                outbox.add(ups_now + cycle, reading)
                outbox.pack(reading, metrics=False)
            else:
                # Older agents: the UPS read committed (and packed) apart, each packed at once.
                outbox.add(ups_now, reading)
                outbox.pack(reading)
                outbox.add(cycle, reading)
                outbox.pack(reading)
            total += len(cycle) + len(ups_now)
    return total


# --- receivers ----------------------------------------------------------------------------------

class LeanAcker:
    """Acks every seq at once after reading only the envelope header: the collector's contract
    (ack on ``{prefix}/v1/{hub}/{host}/ack``) without its work, so the agent is what is timed."""

    def __init__(self, broker: MosquittoBroker, backlog_before_ns: int):
        self.before_ns = backlog_before_ns
        self.lock = threading.Condition()
        self.samples_by_seq: dict[int, int] = {}
        self.backlog_samples = 0
        self.first_at: float | None = None
        self.client = Client(CallbackAPIVersion.VERSION2, client_id="bench-acker", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._connected = threading.Event()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, keepalive=30, clean_start=True, properties=props)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("acker could not connect")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(wire.subscription("hubwatch", "metrics"), qos=1)
        client.subscribe(wire.subscription("hubwatch", "events"), qos=1)
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        topic = wire.parse_topic("hubwatch", message.topic)
        raw = wire.decode_raw(bytes(message.payload))
        client.publish(wire.topic("hubwatch", topic.hub, topic.host, "ack"), wire.encode_ack([raw.seq]), qos=1)
        with self.lock:
            if self.first_at is None:
                self.first_at = time.monotonic()
            if raw.seq not in self.samples_by_seq:
                old = sum(1 for s in raw.samples if s["t"] < self.before_ns)
                self.samples_by_seq[raw.seq] = old
                self.backlog_samples += old
            self.lock.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.backlog_samples >= n, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def points_before(influx: InfluxServer, before_ns: int) -> int:
    total = 0
    for measurement, field_name in COUNT_FIELD.items():
        rows = influx.rows(f'SELECT count("{field_name}") FROM "{measurement}" WHERE time < {before_ns}',
                           db="hubwatch")
        total += rows[0]["count"] if rows else 0
    return total


@dataclass
class Drain:
    shape: str
    receiver: str
    samples: int
    messages: int
    outbox_mb: float
    seconds: float            # agent start -> every backlog sample received
    after_first: float        # first message received -> every backlog sample received
    left_in_outbox: int


def drain(work: Path, shape: str, db: Path, expected: int, before_ns: int, nut_port: int,
          real_collector: bool, window: int | None = None) -> Drain:
    stats = read_stats(db)
    broker = MosquittoBroker(work / f"mq-{shape}-{int(real_collector)}").start()
    influx = None
    procs = []
    acker = None
    try:
        if real_collector:
            influx = InfluxServer(work / f"influx-{shape}").start()
            procs.append(start_collector(work, broker, influx, instance=f"replay-{shape}"))
        else:
            acker = LeanAcker(broker, before_ns)
        extra = f"publish:\n  window: {window}\n  max_unconfirmed: {max(200, window)}\n" if window else ""
        config = agent_yaml(db.parent / f"agent-{shape}.yaml", hub=HUB, host=HOST, interval=INTERVAL_S,
                            broker_port=broker.port, nut_port=nut_port, batch_max_age=SHAPES[shape], extra=extra)
        started = time.monotonic()
        agent = start_agent(work, f"agent-{shape}-{int(real_collector)}-{window or 20}", config)
        procs.append(agent)
        first = None
        if acker is not None:
            if not acker.wait_for(expected, 300):
                raise RuntimeError(f"only {acker.backlog_samples} of {expected} backlog samples arrived in 300 s")
            done = time.monotonic()
            first = acker.first_at
        else:
            while True:
                n = points_before(influx, before_ns)
                if first is None and n:
                    first = time.monotonic()
                if n >= expected:
                    break
                if time.monotonic() - started > 300:
                    raise RuntimeError(f"only {n} of {expected} backlog points in InfluxDB after 300 s")
                time.sleep(0.2)
            done = time.monotonic()
        # the acks of the last messages are applied a moment later
        deadline = time.monotonic() + 10
        left = read_stats(db).samples
        while left > 50 and time.monotonic() < deadline:
            time.sleep(0.2)
            left = read_stats(db).samples
        label = shape if window is None else f"{shape}, publish.window {window}"
        return Drain(label, "real collector → influxd" if real_collector else "lean acker", expected,
                     stats.messages + read_stats(db).next_seq - stats.next_seq, stats.file_bytes / 2**20,
                     done - started, done - (first or started), left)
    finally:
        if acker is not None:
            acker.close()
        for proc in reversed(procs):
            proc.stop()
        broker.stop()
        if influx is not None:
            influx.stop()


def copy_outbox(db: Path, into: Path) -> Path:
    into.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy2(f"{db}{suffix}", f"{into / db.name}{suffix}")
    return into / db.name


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--shapes", default="outage,per-cycle,held")
    parser.add_argument("--what-if-window", type=int, default=0,
                        help="drain the per-cycle backlog once more with this publish.window (0: skip)")
    parser.add_argument("--collector", default="outage",
                        help="shapes also drained through the real collector into influxd ('' for none)")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    with_collector = [s for s in args.collector.split(",") if s]
    cycles = int(args.hours * 3600 / INTERVAL_S)
    results: list[Drain] = []
    with tempfile.TemporaryDirectory(prefix="hubwatch-bench-") as tmp:
        work = Path(tmp)
        servers = NutServers()
        try:
            nut = start_nut(servers)
            ups, others = real_cycle(nut.port, work)
            per_cycle = len(ups) + len(others) + 1
            start_ns = (time.time_ns() - int(args.hours * 3600e9) - 60 * 10**9) // 10**9 * 10**9
            before_ns = start_ns + cycles * INTERVAL_S * 10**9
            for shape in shapes:
                shape_dir = work / shape
                shape_dir.mkdir()
                db = shape_dir / f"{HOST}.outbox.db"
                progress(f"{shape}: writing {cycles:,} cycles × {per_cycle} samples into the outbox")
                began = time.monotonic()
                expected = fill(db, shape, ups, others, cycles, start_ns)
                progress(f"{shape}: {expected:,} samples written in {time.monotonic() - began:.0f} s")
                runs = [(False, None)]
                if shape == "per-cycle" and args.what_if_window:
                    runs.append((False, args.what_if_window))
                if shape in with_collector:
                    runs.append((True, None))
                copies = [copy_outbox(db, work / f"{shape}-copy{i}") for i in range(1, len(runs))]
                for (real, window), outbox_db in zip(runs, [db] + copies):
                    result = drain(work, shape, outbox_db, expected, before_ns, nut.port, real_collector=real,
                                   window=window)
                    progress(f"{result.shape}: {result.samples / result.seconds:,.0f} samples/s ({result.receiver})")
                    results.append(result)
        finally:
            servers.close()
    text = report(results, args.hours, per_cycle)
    print(text)
    return text


def report(results: list[Drain], hours: float, per_cycle: int) -> str:
    rows = []
    for r in results:
        rows.append([r.shape, r.receiver, f"{r.samples:,}", f"{r.messages:,}", f"{r.outbox_mb:.1f}",
                     f"{r.seconds:.1f}", f"{r.samples / r.seconds:,.0f}", f"{r.samples / r.after_first:,.0f}",
                     f"{r.left_in_outbox}"])
    headers = ["backlog shape", "received by", "samples", "messages", "outbox MB", "s (agent start → all in)",
               "samples/s", "samples/s after the first arrived", "left in outbox after"]
    to_acker = [r for r in results if r.receiver == "lean acker"]
    default = next((r for r in to_acker if r.shape == "outage"), to_acker[0] if to_acker else None)
    config = (f"{hours:g} h at {INTERVAL_S} s = {int(hours * 3600 / INTERVAL_S):,} cycles × {per_cycle} samples "
              "(system, net × 2, ping × 2, ups, agent), written through agent.outbox.Outbox, then drained by the "
              "real hubwatch-agent (default settings: window 20, max_unconfirmed 200, batch_max_samples 1,000; "
              "acks arriving together applied in one transaction) to a local mosquitto. "
              "Shapes: *outage* = what the agent leaves now: full batches of 1,000 samples packed during the "
              "outage, the rest pending rows packed when the link returns; *per-cycle* = two messages a cycle packed during the outage (what agents "
              "before that left with batch_max_age 0); *batched* = the same, 6 cycles a message; *held* = pending "
              "rows recorded on an untrusted clock, corrected when packed. "
              "The clock starts when the agent process is started (Python start-up included). "
              "\"left in outbox after\": samples still held a moment after the last backlog sample arrived "
              "(the live cycles' own, or acks not yet applied).")
    lines = []
    if default is not None:
        rate = default.samples / default.seconds
        lines.append(f"**Verdict (target ≥ {TARGET_RATE:,} samples/s to a local broker):** "
                     f"{rate:,.0f} samples/s for the backlog an outage leaves ({default.shape}) — "
                     f"{'met' if rate >= TARGET_RATE else 'NOT met'}"
                     + "".join(f"; {r.shape}: {r.samples / r.seconds:,.0f}" for r in to_acker if r is not default)
                     + ".")
    for r in results:
        if r.receiver != "lean acker":
            lines.append(f"Through the real collector, every sample of the {r.shape} backlog was queryable in "
                         f"influxd {r.seconds:.1f} s after the agent started ({r.samples / r.seconds:,.0f} samples/s).")
    return config + "\n\n" + table(headers, rows) + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
