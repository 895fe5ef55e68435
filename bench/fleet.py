#!/usr/bin/env python3
"""Fleet simulation: N simulated hubs through the real broker and collector(s) into influxd,
measuring the collector's lag and the loss; then more hubs until something saturates.

    python bench/fleet.py --hubs 14,1000,10000 [--interval 10] [--duration 150] [--collectors auto|K]
    python bench/fleet.py --hubs 5000 --duration 60 --collectors 2     # one size, as a tool
    python bench/fleet.py --hubs 10000 --push 12500,15000,20000        # then more, until one is not sustained
    (--no-engine: collectors without outages and alerts; --keep DIR: keep logs and data;
     --json FILE: the raw results; --direct-samples 0: skip influxd's direct-write rate)

Per fleet size: a fresh mosquitto (the shipped config's queue limits and autosave) and
influxd, K ``hubwatch-collector`` processes in one share group (the shipped ingest defaults,
outages and alerts on, as in production), and simulator processes (``bench/fleetsim.py``,
one MQTT connection per hub; one process per 6,000 hubs: a process costs about 4% of a core
per 1,000 hubs, and several keep each one's asyncio loop on schedule and spread them over
the cores).

- **lag**: the simulators report a sampled live message (its newest ``system`` sample's time
  ``t`` and when the message was published); a prober asks InfluxDB for that exact point
  every half second, and the lag is the time from the publish to the first answer that has
  it: what the broker and the collectors add. (The hubs batch 60 s of cycles per message, as
  the agent does by default, so a sample itself is up to a minute older than that.) The collector's own ``hubwatch_collector.lag_seconds``
  (age of the newest sample in each batch it writes) is reported beside it.
- **loss**: after the sampling stops, the hubs' power and links come back and their outboxes
  drain (each message stays until the collector acknowledges its seq); then every sample
  generated must be in InfluxDB exactly once: counted per measurement, stored = generated.
- **CPU**: per process, from /proc, over the steady part of the run.

A size is *sustained* when the lag stays under 30 s (p95) without growing, nothing is lost,
and the simulators kept their schedule (the load really was offered).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import machine, progress, table  # noqa: E402  (sets sys.path)

import fleetsim  # noqa: E402
from collector.lineproto import format_line  # noqa: E402
from tests.collector_harness import collector_command  # noqa: E402
from tests.services.common import ServiceProcess  # noqa: E402
from tests.services.influx import InfluxServer  # noqa: E402
from tests.services.mosquitto import MosquittoBroker  # noqa: E402

LAG_TARGET_S = 30.0
HUBS_PER_SIMULATOR = 6_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc ----------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuWindow:
    """CPU% of named processes between ``start()`` and ``stop()`` (100% = one core)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.begin: dict[str, float] = {}
        self.result: dict[str, float] = {}
        self.machine_percent = math.nan
        self.rss: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._m0 = machine_busy()
        self.begin = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        elapsed = time.monotonic() - self._t0
        m1 = machine_busy()
        self.result = {name: 100.0 * (cpu_seconds(pid) - self.begin[name]) / elapsed for name, pid in self.pids.items()}
        self.machine_percent = 100.0 * (os.cpu_count() or 1) * (m1[0] - self._m0[0]) / max(1, m1[1] - self._m0[1])
        self.rss = {name: rss_mb(pid) for name, pid in self.pids.items()}


# --- the simulators ------------------------------------------------------------------------

class Simulators:
    """Simulator processes and what they report (stdout JSON lines, read on threads)."""

    def __init__(self, broker: MosquittoBroker, hubs: int, procs: int, args, work: Path, canary_every: int):
        self.procs: list[subprocess.Popen] = []
        self.ready: list[dict] = []
        self.finals: list[dict] = []
        self.stats: dict[int, dict] = {}
        self.stats_history: list[tuple[float, int, dict]] = []
        self.canaries: "queue.Queue[tuple[str, int, int]]" = queue.Queue()
        self.cuts: list[tuple[str, int, float]] = []
        self._lock = threading.Lock()
        per = math.ceil(hubs / procs)
        for i in range(procs):
            first, count = i * per, min(per, hubs - i * per)
            if count <= 0:
                break
            argv = [sys.executable, str(Path(fleetsim.__file__)), "--broker", f"{broker.host}:{broker.port}",
                    "--hubs", str(count), "--first", str(first), "--interval", str(args.interval),
                    "--duration", str(args.duration), "--drain-timeout", str(args.drain_timeout),
                    "--seed", str(args.seed), "--canary-every", str(canary_every), "--wait-for-go",
                    "--batch-max-age", str(args.batch_max_age)]
            if hubs > 20_000:
                argv.append("--spread-source")
            log = open(work / f"fleetsim-{i}.log", "wb")
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True)
            log.close()
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "canary" in obj:
                self.canaries.put(tuple(obj["canary"]))
            elif "cut" in obj:
                self.cuts.append(tuple(obj["cut"]))
            elif "stats" in obj:
                with self._lock:
                    self.stats[index] = obj["stats"]
                    self.stats_history.append((time.monotonic(), index, obj["stats"]))
            elif "ready" in obj:
                with self._lock:
                    self.ready.append(obj["ready"])
            elif "final" in obj:
                with self._lock:
                    self.finals.append(obj["final"])

    @property
    def pids(self) -> dict[str, int]:
        return {f"simulator {i + 1}": p.pid for i, p in enumerate(self.procs)}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.procs):
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a simulator exited before it was ready (see fleetsim-*.log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulators not connected within {timeout:.0f}s: {self.ready}")
            time.sleep(0.2)

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()

    def wait_final(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.finals) < len(self.procs):
            if time.monotonic() > deadline:
                raise RuntimeError("simulators did not finish")
            if all(p.poll() is not None for p in self.procs) and len(self.finals) < len(self.procs):
                time.sleep(1)
                if len(self.finals) < len(self.procs):
                    raise RuntimeError("a simulator exited without its final report (see fleetsim-*.log)")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# --- lag: ask InfluxDB for sampled points until they are there -----------------------------

class LagProber(threading.Thread):
    def __init__(self, influx: InfluxServer, db: str, canaries: "queue.Queue[tuple[str, int, int]]"):
        super().__init__(daemon=True)
        self.influx, self.db, self.canaries = influx, db, canaries
        self.pending: list[tuple[str, int, int]] = []  # (hub, t, published ns)
        self.found: list[tuple[float, float]] = []  # (monotonic when found, lag seconds)
        self.unseen = 0
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.5):
            while True:
                try:
                    self.pending.append(self.canaries.get_nowait())
                except queue.Empty:
                    break
            if not self.pending:
                continue
            batch = self.pending[:40]
            q = ";".join(f"SELECT count(\"uptime_seconds\") FROM \"system\" WHERE \"hub\" = '{hub}' AND time = {t}"
                         for hub, t, _ in batch)
            try:
                results = self.influx.query(q, db=self.db)
            except Exception:
                self.errors += 1
                continue
            now_wall, now_mono = time.time(), time.monotonic()
            seen = set()
            for canary, result in zip(batch, results):
                sent = canary[2] / 1e9
                if result.get("series"):
                    self.found.append((now_mono, now_wall - sent))
                    seen.add(canary)
                elif now_wall - sent > 600:
                    self.unseen += 1
                    seen.add(canary)
            self.pending = [c for c in self.pending if c not in seen]

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# --- one fleet size ------------------------------------------------------------------------

@dataclass
class RunResult:
    hubs: int
    collectors: int
    simulators: int
    duration: float
    generated: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    lag_p50: float = math.nan
    lag_p95: float = math.nan
    lag_max: float = math.nan
    lag_growth: float = math.nan
    lag_samples: int = 0
    lag_unseen: int = 0
    collector_lag_max: float = math.nan
    collector_lag_p95: float = math.nan
    collector_queue_max: float = math.nan
    alert_delay_p50: float = math.nan
    alert_delay_p95: float = math.nan
    alerts_expected: int = 0
    alerts_missing: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    machine_cpu: float = math.nan
    messages_per_s: float = math.nan
    samples_per_s: float = math.nan
    stored_per_s: float = math.nan
    slip_p99: float = math.nan
    resent: int = 0
    events: dict[str, int] = field(default_factory=dict)
    drain_seconds: float = math.nan
    pending: int = 0  # samples still in the hubs' outboxes when the drain timed out
    series: int = 0
    series_by_measurement: dict[str, int] = field(default_factory=dict)
    connect_seconds: float = math.nan
    wire_bytes_per_hub_day: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Generated samples not in InfluxDB at the end."""
        return sum(self.generated.values()) - sum(min(self.stored.get(m, 0), n) for m, n in self.generated.items())

    @property
    def lost(self) -> int:
        """Missing and no longer held by any hub: gone for good."""
        return max(0, self.missing - self.pending)

    @property
    def extra(self) -> int:
        return sum(max(0, self.stored.get(m, 0) - n) for m, n in self.generated.items())

    @property
    def sustained(self) -> bool:
        return (self.lag_p95 < LAG_TARGET_S and not (self.lag_growth > 10) and self.missing == 0 and self.extra == 0
                and self.lag_samples > 0 and self.slip_p99 < 2.0)


def write_collector_config(path: Path, broker: MosquittoBroker, influx: InfluxServer, instance: str,
                           engine: bool = True) -> Path:
    """The shipped defaults (config/collector.example.yaml), on this run's ports; ``engine``
    False turns outages and alerts off (ingest alone)."""
    off = "" if engine else "outages:\n  enabled: false\nalerts:\n  enabled: false\n"
    path.write_text(f"""{off}instance: {instance}
mqtt:
  url: {broker.url}
  share_group: hubwatch-collectors
influxdb:
  url: {influx.url}
  api: v1
  database: hubwatch
  create_database: true
ingest:
  batch_max_points: 5000
  batch_max_delay: 0.5s
  receive_maximum: 1000
  stats_interval: 2s
dead_letter:
  path: {path.parent / (instance + '.deadletter.jsonl')}
""")
    return path


def alert_delays(result: RunResult, influx: InfluxServer, cuts: list, generation_end: float) -> None:
    """How long after a power cut its on_battery alert was stored (the rule's debounce is 30 s):
    the outage and alert engine keeping up, or not. Cuts that lasted at least 45 s and began
    at least 45 s before the sampling stopped are expected to have fired by then."""
    fired: dict[str, list[int]] = {}
    for row in influx.rows('SELECT "state" FROM "alert" WHERE "rule" = \'on_battery\' GROUP BY "hub"', db="hubwatch"):
        if row.get("state") == "firing":
            fired.setdefault(row["hub"], []).append(row["time"])
    delays, missing = [], 0
    for hub, t, seconds in cuts:
        if seconds < 45 or t / 1e9 > generation_end - 45:
            continue
        later = [f for f in fired.get(hub, []) if t <= f <= generation_end * 1e9]
        if later:
            delays.append((min(later) - t) / 1e9)
        else:
            missing += 1
    result.alerts_expected = len(delays) + missing
    result.alerts_missing = missing
    result.alert_delay_p50, result.alert_delay_p95 = percentile(delays, 50), percentile(delays, 95)


def count_stored(influx: InfluxServer, db: str) -> dict[str, int]:
    out = {}
    for measurement, counted in fleetsim.COUNTED_FIELD.items():
        rows = influx.rows(f'SELECT count("{counted}") FROM "{measurement}"', db=db)
        out[measurement] = int(rows[0]["count"]) if rows else 0
    return out


def series_counts(influx: InfluxServer, db: str) -> tuple[int, dict[str, int]]:
    by_measurement = {}
    for row in influx.rows("SHOW MEASUREMENTS", db=db):
        name = row["name"]
        got = influx.rows(f'SHOW SERIES EXACT CARDINALITY FROM "{name}"', db=db)
        by_measurement[name] = int(got[0]["count"]) if got else 0
    return sum(by_measurement.values()), by_measurement


def run_fleet(work: Path, hubs: int, collectors: int, simulators: int, args) -> RunResult:
    result = RunResult(hubs, collectors, simulators, args.duration)
    broker = MosquittoBroker(work / "mosquitto", autosave_interval=5, extra_config=[
        "max_queued_messages 10000000", "max_queued_bytes 2000000000"])
    influx = InfluxServer(work / "influxd")
    procs: list[ServiceProcess] = []
    sims = None
    try:
        broker.start()
        influx.start()
        for i in range(collectors):
            config = write_collector_config(work / f"collector-c{i + 1}.yaml", broker, influx, f"c{i + 1}",
                                            engine=not args.no_engine)
            proc = ServiceProcess(f"collector-c{i + 1}", collector_command(config), work / f"run-c{i + 1}")
            proc.start()
            proc.wait_until(lambda p=proc: "subscribed in share group" in p.log_path.read_text(), 30, "subscribed")
            procs.append(proc)
        messages_per_s = hubs / (args.interval * (1 + args.batch_max_age // args.interval))
        canary_every = max(1, int(messages_per_s / 4))  # about 4 sampled messages a second in all
        progress(f"{hubs:,} hubs: {collectors} collector(s), {simulators} simulator process(es): connecting")
        started = time.monotonic()
        sims = Simulators(broker, hubs, simulators, args, work, canary_every)
        sims.wait_ready(timeout=120 + hubs / 100)
        result.connect_seconds = time.monotonic() - started
        prober = LagProber(influx, "hubwatch", sims.canaries)
        prober.start()
        pids = {"mosquitto": broker.pid, "influxd": influx.pid,
                **{f"collector {i + 1}": p.proc.pid for i, p in enumerate(procs)}, **sims.pids}
        window = CpuWindow(pids)
        progress(f"{hubs:,} hubs connected in {result.connect_seconds:.0f}s; sampling for {args.duration:.0f}s")
        sims.go()
        t0_wall, t0 = time.time(), time.monotonic()
        warmup = min(20.0, args.duration / 4)
        time.sleep(warmup)
        window.start()
        while time.monotonic() - t0 < args.duration:
            time.sleep(1)
            if any(not p.running for p in procs):
                raise RuntimeError("a collector died:\n" + "\n".join(p.log_tail(10) for p in procs if not p.running))
        window.stop()
        t_end_wall = time.time()
        result.cpu, result.rss, result.machine_cpu = window.result, window.rss, window.machine_percent
        progress(f"{hubs:,} hubs: sampling done (machine {result.machine_cpu:.0f}% of {os.cpu_count()} cores); "
                 "draining the outboxes")
        sims.wait_final(timeout=args.drain_timeout + 120)
        # the collectors may still be writing what they acknowledged last: wait for the counts
        generated: Counter[str] = Counter()
        for final in sims.finals:
            generated.update(final["generated"])
        result.generated = dict(generated)
        deadline, stored, previous = time.monotonic() + 120, {}, None
        while time.monotonic() < deadline:
            stored = count_stored(influx, "hubwatch")
            if all(stored.get(m, 0) >= n for m, n in generated.items()) or stored == previous:
                break
            previous = stored
            time.sleep(3)
        result.stored = stored
        time.sleep(1.5)
        prober.stop()
        # lag, from the sampled points
        found = [(t - t0, lag) for t, lag in prober.found]
        lags = [lag for _, lag in found]
        result.lag_samples, result.lag_unseen = len(lags), prober.unseen + len(prober.pending)
        result.lag_p50, result.lag_p95, result.lag_max = percentile(lags, 50), percentile(lags, 95), max(lags or [math.nan])
        third = args.duration / 3
        first = [lag for at, lag in found if at < third]
        last = [lag for at, lag in found if 2 * third <= at <= args.duration]
        if first and last:
            result.lag_growth = statistics.median(last) - statistics.median(first)
        rows = influx.rows(f'SELECT "lag_seconds", "queue_depth" FROM "hubwatch_collector" WHERE time >= '
                           f'{int((t0_wall + warmup) * 1e9)} AND time <= {int(t_end_wall * 1e9)}', db="hubwatch")
        clags = [r["lag_seconds"] for r in rows if r.get("lag_seconds") is not None]
        result.collector_lag_max = max(clags or [math.nan])
        result.collector_lag_p95 = percentile(clags, 95)
        result.collector_queue_max = max([r["queue_depth"] for r in rows if r.get("queue_depth") is not None] or [math.nan])
        # the leader's work: each power cut that lasted is an on_battery alert, after its 30 s debounce
        if not args.no_engine:
            alert_delays(result, influx, sims.cuts, t0_wall + args.duration)
        # rates and the simulators' own health
        published = sum(f.get("published", 0) for f in sims.finals)
        result.messages_per_s = published / args.duration
        result.samples_per_s = sum(generated.values()) / args.duration
        result.resent = sum(f.get("resent", 0) for f in sims.finals)
        result.slip_p99 = max((s["slip_p99"] for _, _, s in sims.stats_history), default=math.nan)
        result.drain_seconds = max(f["drain_seconds"] for f in sims.finals)
        result.pending = sum(f.get("outbox_samples", 0) for f in sims.finals)
        result.events = {k: sum(f.get(k, 0) for f in sims.finals)
                         for k in ("power_cuts", "batteries_exhausted", "uplink_drops", "reboots", "connects")}
        result.wire_bytes_per_hub_day = (sum(f.get("bytes_packed", 0) for f in sims.finals) / hubs
                                         / args.duration * 86400)
        result.series, result.series_by_measurement = series_counts(influx, "hubwatch")
        for proc in procs:
            text = proc.log_path.read_text(errors="replace")
            if "Traceback" in text:
                result.notes.append(f"{proc.name} logged a traceback")
        return result
    finally:
        if sims is not None:
            sims.stop()
        for proc in procs:
            proc.stop(timeout=20)
        broker.stop()
        influx.stop()


# --- influxd on its own: the ceiling --------------------------------------------------------

def direct_write_rate(work: Path, samples: int) -> dict[str, float]:
    """Samples/s written straight to a fresh influxd in 5,000-line batches over one connection:
    the first cycle of 10,000 simulated hubs (creating their series, timed apart), then
    ``samples`` more into the existing series (the steady rate, as a running fleet writes)."""
    hubs = 10_000  # as many series as a 10,000-hub fleet
    per_cycle = hubs * 6.6
    made = fleetsim.fleet_samples(hubs, 1 + max(1, math.ceil(samples / per_cycle)))
    lines = [format_line(s.measurement, dict(s.tags), dict(s.fields), s.time_ns) for s in made]
    # a hub's cycle starts with its system sample: the second one of hub 0 begins the second cycle
    first = next(i for i, s in enumerate(made)
                 if i > 0 and s.measurement == "system" and s.tags.get("hub") == fleetsim.hub_name(0))
    influx = InfluxServer(work / "influxd-direct").start()
    try:
        influx.create_database("direct")
        conn = http.client.HTTPConnection(influx.host, influx.port, timeout=120)

        def write(chunk: list[str]) -> float:
            started = time.monotonic()
            for i in range(0, len(chunk), 5000):
                conn.request("POST", "/write?db=direct&precision=ns", body="\n".join(chunk[i:i + 5000]).encode())
                response = conn.getresponse()
                response.read()
                if response.status != 204:
                    raise RuntimeError(f"direct write failed: HTTP {response.status}")
            return time.monotonic() - started

        creating = write(lines[:first])
        cpu0 = cpu_seconds(influx.pid)
        steady = write(lines[first:])
        return {"rate": (len(lines) - first) / steady, "samples": len(lines) - first,
                "influxd_cpu_percent": 100.0 * (cpu_seconds(influx.pid) - cpu0) / steady,
                "creating_rate": first / creating, "creating_samples": first}
    finally:
        influx.stop()


# --- report ---------------------------------------------------------------------------------

def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _busiest(result: RunResult) -> str:
    name, value = max(result.cpu.items(), key=lambda kv: kv[1])
    return f"{name} {value:.0f}%"


def _group(result: RunResult, prefix: str) -> float:
    return sum(v for k, v in result.cpu.items() if k.startswith(prefix))


def ours(result: RunResult) -> float:
    return sum(v for v in result.cpu.values() if not math.isnan(v))


def projections(r: RunResult, cores: int) -> list[list[object]]:
    """Where each component would run out, from its CPU per 1,000 hubs in run ``r``: a
    single-threaded process (mosquitto; a collector, bound by Python's GIL; a simulator) at one
    core, influxd and the whole machine at every core."""
    k = r.hubs / 1000
    rows = []
    for name, total, limit in (
            ("mosquitto (one thread: one core)", r.cpu.get("mosquitto", math.nan), 100.0),
            ("collector, each instance (Python's GIL: one core)", _group(r, "collector"), 100.0),
            (f"influxd ({cores} cores)", r.cpu.get("influxd", math.nan), 100.0 * cores),
            ("simulator, each process (one core)", _group(r, "simulator"), 100.0),
            (f"the machine, without the simulators ({cores} cores)", ours(r) - _group(r, "simulator"),
             100.0 * cores),
            (f"the machine, everything here ({cores} cores)", ours(r), 100.0 * cores)):
        per_k = total / k  # CPU per 1,000 hubs served, however many instances share them
        rows.append([name, _f(per_k, 2), f"{limit / per_k * 1000:,.0f}" if per_k > 0 else "–"])
    return rows


def render(results: list[RunResult], direct: dict[str, float] | None, args) -> str:
    cores = os.cpu_count() or 1
    out = [
        f"Each size: {args.duration:.0f} s of sampling at a {args.interval:g} s interval (hubs with power cuts, "
        "battery drains, uplink drops and reboots), then the outboxes drain and every generated sample is "
        "counted in InfluxDB. Lag = time from a sampled live message's publish until InfluxDB returns its "
        f"newest `system` point (polled every 0.5 s; each hub sends its cycles together every {args.batch_max_age:g} s, "
        f"the agent's default `batch_max_age`, so a sample is up to that much older); growth = median lag of the last third of the run minus the first. "
        "Sustained = lag p95 < 30 s and not growing, zero loss, simulators on schedule.\n"]
    rows = []
    for r in results:
        rows.append([f"{r.hubs:,}", r.collectors, r.simulators, _f(r.samples_per_s, 0), _f(r.messages_per_s, 0),
                     f"{_f(r.lag_p50)} / {_f(r.lag_p95)} / {_f(r.lag_max)}", _f(r.lag_growth),
                     _f(r.collector_lag_max), f"{sum(r.generated.values()):,}",
                     f"{r.lost:,}" + (f" (+{r.extra:,} extra)" if r.extra else "")
                     + ((f"; {r.missing:,} not stored yet, " if r.missing else " (all stored; ")
                        + f"{r.pending:,} still unconfirmed at the hubs when the drain stopped"
                        + ("" if r.missing else ")") if r.pending else ""),
                     f"{r.resent:,}",
                     "yes" if r.sustained else "**no**"])
    out.append(table(["hubs", "collectors", "simulator processes", "samples/s", "MQTT msgs/s published",
                      "lag p50 / p95 / max (s)", "lag growth (s)", "collector `lag_seconds` max (s)",
                      "samples generated", "lost", "messages resent", "sustained"], rows))
    out.append("\nCPU in % of one core over the steady part of each run, from /proc (this machine is shared: "
               "*others* is what the rest of the machine used meanwhile).\n")
    rows = []
    for r in results:
        collectors = ", ".join(f"{v:.0f}" for k, v in r.cpu.items() if k.startswith("collector"))
        sims = ", ".join(f"{v:.0f}" for k, v in r.cpu.items() if k.startswith("simulator"))
        rows.append([f"{r.hubs:,}", _f(r.cpu.get("mosquitto", math.nan), 0), collectors,
                     _f(r.cpu.get("influxd", math.nan), 0), sims, _f(ours(r), 0),
                     _f(r.machine_cpu - ours(r), 0), _f(r.machine_cpu, 0), _f(r.slip_p99, 2)])
    out.append(table(["hubs", "mosquitto", "collectors", "influxd", "simulators", "all of these",
                      "others", f"machine ({cores} cores = {100 * cores}%)", "simulator slip p99 (s)"], rows))
    detail = []
    for r in results:
        per_hub = r.samples_per_s / r.hubs * args.interval if r.hubs else math.nan
        detail.append([f"{r.hubs:,}", _f(per_hub, 2), ", ".join(f"{k} {v:,}" for k, v in r.events.items()),
                       _f(r.drain_seconds, 0), _f(r.connect_seconds, 0),
                       ", ".join(f"{k} {v:.0f}" for k, v in r.rss.items() if not math.isnan(v)),
                       f"{r.series:,}", _f(r.series / r.hubs if r.hubs else math.nan, 2),
                       (f"{_f(r.alert_delay_p50)} / {_f(r.alert_delay_p95)}; {r.alerts_missing} of "
                        f"{r.alerts_expected} not fired in time") if r.alerts_expected else "–"])
    out.append("\n" + table(["hubs", "samples per hub per interval", "what happened (simulated)", "drain (s)",
                             "connect (s)", "RSS at end (MB)", "series in InfluxDB", "series per hub",
                             "on_battery alert after the cut p50 / p95 (s; rule debounce 30 s)"], detail))
    sustained = [r for r in results if r.sustained]
    best = max(sustained, key=lambda r: r.hubs) if sustained else None
    # CPU shares are squeezed once the machine is full: project from the largest steady run
    steady = [r for r in sustained if not (r.lag_growth > 2.0)]
    basis = max(steady or sustained or results, key=lambda r: r.hubs)
    out.append(f"\nWhere each part runs out, from its CPU per 1,000 hubs at {basis.hubs:,} hubs (the largest run "
               "whose lag did not grow; linear, so only a guide):\n")
    out.append(table(["component", "CPU % per 1,000 hubs", "hubs at its limit (per instance or process)"],
                     projections(basis, cores)))
    if direct:
        rate = direct["rate"]
        per_hub_s = basis.samples_per_s / basis.hubs if basis.hubs else math.nan
        out.append(f"\ninfluxd's own direct-write rate in the same run (a fresh influxd, 5,000-line batches over "
                   f"one connection, {direct['samples']:,.0f} samples of 10,000 simulated hubs into their existing "
                   f"series): **{rate:,.0f} samples/s** = {rate / per_hub_s:,.0f} hubs at {per_hub_s:.3f} samples "
                   f"per hub per second; 0.4× of it is {0.4 * rate / per_hub_s:,.0f} hubs. (The first cycle, which "
                   f"creates the {direct['creating_samples']:,.0f} series, went at {direct['creating_rate']:,.0f} "
                   f"samples/s; influxd used {direct['influxd_cpu_percent']:.0f}% CPU while writing.) "
                   "The design's target is ≥ 50,000 hubs.")
    if best is not None:
        broken = [r for r in results if not r.sustained and r.hubs > best.hubs]
        edge = (f", at the edge: lag p95 {best.lag_p95:.1f} s and {best.lag_growth:+.1f} s over the run"
                if best.lag_growth > 2.0 else "")
        out.append(f"\nLargest fleet sustained here: **{best.hubs:,} hubs** ({best.samples_per_s:,.0f} samples/s{edge}"
                   + (f", {best.samples_per_s / direct['rate']:.2f}× the direct rate" if direct else "") + ")"
                   + (f"; {min(broken, key=lambda r: r.hubs).hubs:,} hubs was not." if broken else "."))
    out.append("\n" + "\n".join(verdicts(results, direct, basis)))
    return "\n".join(out)


def verdicts(results: list[RunResult], direct: dict[str, float] | None, basis: RunResult) -> list[str]:
    lines = []
    at_10k = next((r for r in results if r.hubs == 10_000), None)
    if at_10k is not None:
        met = at_10k.lag_p95 < LAG_TARGET_S and at_10k.lost == 0 and at_10k.missing == 0
        lines.append(f"- **Target at 10,000 hubs** (lag under 30 s, zero loss): **{'met' if met else 'NOT met'}** — "
                     f"lag p95 {_f(at_10k.lag_p95)} s, {at_10k.missing:,} of {sum(at_10k.generated.values()):,} "
                     f"samples missing, with {at_10k.collectors} collector instance" + ("s." if at_10k.collectors > 1 else "."))
    late = [r for r in results if r.alerts_expected and (r.alerts_missing > 0.1 * r.alerts_expected
                                                         or r.alert_delay_p50 > 45)]
    if late:
        r = min(late, key=lambda r: r.hubs)
        lines.append(f"- **Alerts late** from {r.hubs:,} hubs (the outage and alert engine, its hubs shared over "
                     f"{r.collectors} instance(s)): the on_battery alert came {_f(r.alert_delay_p50)} s "
                     f"after the cut (p50; the rule waits 30 s) and {r.alerts_missing} of {r.alerts_expected} had "
                     "not fired 45 s after their cut.")
    else:
        timed = [r for r in results if r.alerts_expected]
        if timed:
            r = max(timed, key=lambda r: r.hubs)
            lines.append(f"- **Alerts on time** up to {r.hubs:,} hubs: on_battery fired {_f(r.alert_delay_p50)} / "
                         f"{_f(r.alert_delay_p95)} s after the cut (p50 / p95; the rule's debounce is 30 s), "
                         f"{r.alerts_missing} of {r.alerts_expected} late.")
    broken = [r for r in results if not r.sustained]
    if broken:
        r = min(broken, key=lambda r: r.hubs)
        busiest = max(r.cpu.items(), key=lambda kv: kv[1]) if r.cpu else ("–", math.nan)
        lines.append(f"- **Not sustained at {r.hubs:,} hubs**: lag p95 {_f(r.lag_p95)} s (growth {_f(r.lag_growth)} s), "
                     f"{r.lost:,} samples lost, simulator slip p99 {_f(r.slip_p99)} s; the machine at "
                     f"{r.machine_cpu:.0f}% of {100 * (os.cpu_count() or 1)}%, the busiest process {busiest[0]} at "
                     f"{_f(busiest[1], 0)}% of a core; the collectors' queue reached {_f(r.collector_queue_max, 0)} "
                     f"messages and {r.resent:,} messages were resent by the hubs.")
        lines.append(f"- **Saturated first at {r.hubs:,} hubs: {first_saturated(r)}**")
    sustained = [r for r in results if r.sustained]
    if sustained:
        best = max(sustained, key=lambda r: r.hubs)
        met = best.hubs >= 50_000
        ratio = f", {best.samples_per_s / direct['rate']:.2f}× influxd's direct-write rate here" if direct else ""
        lines.append(f"- **Design target ≥ 50,000 hubs: {'met' if met else 'NOT met'} on this machine** — the largest "
                     f"fleet sustained was {best.hubs:,} hubs ({best.samples_per_s:,.0f} samples/s{ratio}; the target's "
                     "premise is about 0.4× of it). Here the broker, the collectors, influxd and the simulators share "
                     "two cores; see docs/scaling.md.")
    return lines


def first_saturated(r: RunResult) -> str:
    """Which part ran out first in a run that was not sustained, from its CPU and the
    simulators' schedule: a one-thread part near a whole core, influxd near every core, else
    the machine; the simulators when they could not keep their own schedule."""
    cores = os.cpu_count() or 1
    sims = sum(v for k, v in r.cpu.items() if k.startswith("simulator"))
    single = [(k, v) for k, v in r.cpu.items() if (k == "mosquitto" or k.startswith("collector")) and v >= 85]
    if single:
        name, cpu = max(single, key=lambda kv: kv[1])
        return f"{name}, at {cpu:.0f}% of its one core."
    if r.cpu.get("influxd", 0) >= 85 * cores:
        return f"influxd, at {r.cpu['influxd']:.0f}% of the {100 * cores}%."
    if r.slip_p99 > 1.0:
        return (f"the simulator itself: the machine's cores ran out ({r.machine_cpu:.0f}% of {100 * cores}%) and the "
                f"simulator processes ({sims:.0f}% in all) fell behind their schedule (slip p99 {r.slip_p99:.1f} s), "
                "while no central part was near its own limit (mosquitto, each collector: one core; influxd: all).")
    return (f"the machine's CPU ({r.machine_cpu:.0f}% of {100 * cores}%), shared by every part, none of them near "
            "its own limit.")


def auto_collectors(hubs: int) -> int:
    return max(1, min(3, math.ceil(hubs / 20_000)))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hubs", default="14,1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--push", default="", help="larger sizes tried after, until one is not sustained")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--batch-max-age", type=float, default=60.0,
                        help="the hubs' buffer.batch_max_age (the agent's default: 60 s; 0: a message every cycle)")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of sampling per size")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--collectors", default="auto", help="instances in the share group (auto: 1 per 20,000 hubs)")
    parser.add_argument("--simulators", default="auto", help=f"processes (auto: 1 per {HUBS_PER_SIMULATOR:,} hubs)")
    parser.add_argument("--direct-samples", type=int, default=300_000, help="0: skip the direct-write comparison")
    parser.add_argument("--no-engine", action="store_true", help="collectors without outages and alerts (ingest only)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs, data)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.hubs.split(",") if x]
    push = [int(x) for x in args.push.split(",") if x]
    wanted = max(sizes + push) * 2 + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:  # mosquitto inherits it: one descriptor per hub
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="hubwatch-fleet-") as tmp:
        work = args.keep or Path(tmp)

        def one(hubs: int) -> RunResult:
            collectors = auto_collectors(hubs) if args.collectors == "auto" else int(args.collectors)
            simulators = (max(1, math.ceil(hubs / HUBS_PER_SIMULATOR)) if args.simulators == "auto"
                          else int(args.simulators))
            r = run_fleet(work / f"fleet-{hubs}", hubs, collectors, simulators, args)
            progress(f"{hubs:,} hubs: lag p95 {_f(r.lag_p95)}s (growth {_f(r.lag_growth)}s), lost {r.lost:,} "
                     f"of {sum(r.generated.values()):,}, busiest {_busiest(r)}, machine {r.machine_cpu:.0f}%, "
                     f"{'sustained' if r.sustained else 'NOT sustained'}")
            results.append(r)
            if args.json:
                args.json.write_text(json.dumps([{**r.__dict__, "lost": r.lost, "missing": r.missing, "sustained": r.sustained}
                                                 for r in results], indent=1, default=str))
            return r

        for hubs in sizes:
            one(hubs)
        for hubs in push:
            if not one(hubs).sustained:
                break
        direct = None
        if args.direct_samples:
            progress("influxd direct write")
            direct = direct_write_rate(work, args.direct_samples)
            progress(f"influxd direct write: {direct['rate']:,.0f} samples/s "
                     f"({direct['creating_rate']:,.0f} while creating the series)")
    text = render(results, direct, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "direct": direct,
                                         "runs": [{**r.__dict__, "lost": r.lost, "missing": r.missing, "sustained": r.sustained}
                                                  for r in results]}, indent=1, default=str))
    print(text)
    return text


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop every process


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
