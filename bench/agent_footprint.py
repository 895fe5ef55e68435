"""Agent footprint: hubwatch-agent beside collectd and prometheus-node-exporter doing the
same work on the same machine, at a 1 s and a 10 s interval, all six side by side in one run.

- **hubwatch-agent**: probes system, network (two interfaces), ping (two targets) and nut
  (a NUT ``dummy-ups`` UPS served by a real ``upsd``), publishing to a local mosquitto; a
  stand-in collector (tests/standin_collector.py) acknowledges every message, as the real
  collector would, so the outbox stays at its steady size.
- **collectd** (Debian's ``collectd-core``): cpu, memory, interface, uptime, load, df, ping,
  nut, and its mqtt write plugin to the same broker (QoS 1). Its ping plugin is set to send
  three echoes per target per interval, as hubwatch's ping probe does by default.
- **prometheus-node-exporter**: the collectors for the same host metrics (cpu, meminfo,
  netdev for the same two interfaces, loadavg, stat, filesystem), scraped at the interval
  by a minimal loop in this benchmark (the scraper's own cost is not counted). It has no
  ping, UPS or MQTT: it does less work than the other two.

Measured from ``/proc/PID``: RSS (``VmRSS``, median over the window = steady; ``VmHWM`` =
peak since start) and CPU (``utime + stime``) over a window that starts after a warm-up,
scaled to 1,000 cycles.

    python bench/agent_footprint.py [--cycles-1s 120] [--cycles-10s 12] [--warmup 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, progress, table  # noqa: E402  (sets sys.path)

from tests.services.common import ServiceProcess, free_port  # noqa: E402
from tests.services.mosquitto import MosquittoBroker, Subscriber  # noqa: E402
from tests.services.nut import NutServers, nut_available  # noqa: E402
from tests.standin_collector import StandInCollector  # noqa: E402

#: A real UPS's upsc dump (APC Back-UPS RS 800), served by dummy-ups.
NUT_DUMP = REPO.parent / "shared" / "data" / "nut-ddl" / "APC" / "APC__Back-UPS_RS_800__usbhid-ups__2.2.2__01.dev"
UPS_NAME = "hubups"
PING_TARGETS = {"gateway": "127.0.0.1", "internet": "127.0.0.2"}
COLLECTD = Path("/usr/sbin/collectd")
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_RSS_MB = 35.0
TARGET_CPU_PERCENT = 0.5


# --- the peers' configurations (shared with bench/wire_bytes.py) ------------------------------

def two_interfaces() -> list[str]:
    """Two interfaces of this machine: the first real one and the loopback."""
    names = sorted(p.name for p in Path("/sys/class/net").iterdir())
    real = [n for n in names if n != "lo" and Path(f"/sys/class/net/{n}/device").exists()]
    others = [n for n in names if n != "lo" and n not in real]
    return ((real + others)[:1] + ["lo"])[:2]


def agent_yaml(path: Path, *, hub: str, host: str, interval: float, broker_port: int, nut_port: int,
               extra: str = "", batch_max_age: float | None = None) -> Path:
    """The default probes, otherwise the agent's defaults (config/agent.example.yaml);
    ``batch_max_age`` None keeps the agent's default."""
    ifaces = ", ".join(two_interfaces())
    targets = ", ".join(f"{k}: {v}" for k, v in PING_TARGETS.items())
    batching = "" if batch_max_age is None else f"  batch_max_age: {batch_max_age:g}s\n"
    path.write_text(f"""hub: {hub}
host: {host}
interval: {interval:g}s
mqtt:
  url: mqtt://127.0.0.1:{broker_port}
buffer:
  path: {path.parent / (host + '.outbox.db')}
{batching}{extra}probes:
  system: {{}}
  network: {{interfaces: [{ifaces}]}}
  ping: {{targets: {{{targets}}}}}
  nut: [{{name: {UPS_NAME}, host: 127.0.0.1, port: {nut_port}}}]
""")
    return path


def start_agent(work: Path, name: str, config: Path) -> ServiceProcess:
    exe = Path(sys.executable).parent / "hubwatch-agent"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    proc = ServiceProcess(name, argv + ["-c", str(config)], work / f"run-{name}").start()
    proc.wait_until(lambda: "agent started" in proc.log_path.read_text(), 30, "started")
    return proc


def collectd_conf(path: Path, *, hostname: str, interval: float, broker_port: int, nut_port: int,
                  prefix: str = "collectd") -> Path:
    """collectd configured for the work hubwatch's default probes do."""
    ifaces = "\n".join(f'  Interface "{n}"' for n in two_interfaces())
    hosts = "\n".join(f'  Host "{a}"' for a in PING_TARGETS.values())
    ping_every = interval / 3  # three echoes per target per interval, like hubwatch's ping count
    base = path.parent / f"collectd-{hostname}"
    base.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""Hostname "{hostname}"
FQDNLookup false
Interval {interval:g}
BaseDir "{base}"
PIDFile "{base}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File STDOUT
  Timestamp true
</Plugin>
LoadPlugin cpu
LoadPlugin memory
LoadPlugin interface
LoadPlugin uptime
LoadPlugin load
LoadPlugin df
LoadPlugin ping
LoadPlugin nut
LoadPlugin mqtt
<Plugin cpu>
  ReportByCpu false
  ReportByState false
  ValuesPercentage true
</Plugin>
<Plugin memory>
  ValuesAbsolute false
  ValuesPercentage true
</Plugin>
<Plugin df>
  MountPoint "/"
  ValuesAbsolute false
  ValuesPercentage true
</Plugin>
<Plugin interface>
{ifaces}
</Plugin>
<Plugin ping>
{hosts}
  Interval {ping_every:.3f}
  Timeout {min(0.9, ping_every * 0.9):.3f}
</Plugin>
<Plugin nut>
  UPS "{UPS_NAME}@127.0.0.1:{nut_port}"
</Plugin>
<Plugin mqtt>
  <Publish "hubwatch-bench">
    Host "127.0.0.1"
    Port "{broker_port}"
    ClientId "collectd-{hostname}"
    Prefix "{prefix}"
    QoS 1
  </Publish>
</Plugin>
""")
    return path


def start_collectd(work: Path, name: str, config: Path) -> ServiceProcess:
    proc = ServiceProcess(name, [str(COLLECTD), "-f", "-C", str(config)], work / f"run-{name}").start()
    proc.wait_until(lambda: "entering read-loop" in proc.log_path.read_text(), 30, "reading")
    return proc


def start_node_exporter(work: Path, name: str) -> tuple[ServiceProcess, int]:
    port = free_port()
    ifaces = "|".join(two_interfaces())
    argv = [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
            "--collector.cpu", "--collector.meminfo", "--collector.netdev", "--collector.loadavg",
            "--collector.stat", "--collector.filesystem",
            # its default excludes lo, and an exclude and an include together are refused
            "--collector.netdev.device-exclude=", f"--collector.netdev.device-include=^({ifaces})$"]
    proc = ServiceProcess(name, argv, work / f"run-{name}").start()
    proc.wait_for_port(port)
    return proc, port


def start_nut(servers: NutServers):
    if not nut_available():
        raise RuntimeError("NUT is not installed (/lib/nut/upsd, /lib/nut/dummy-ups, upsc): run make deps")
    return servers({UPS_NAME: NUT_DUMP})


def check_peers_installed() -> None:
    missing = [str(p) for p in (COLLECTD, NODE_EXPORTER) if not p.exists()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run `make bench-deps` "
                           "(Debian's collectd-core, liboping0, libupsclient6, prometheus-node-exporter)")


# --- /proc ----------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


@dataclass
class Watched:
    """One peer process under measurement."""

    peer: str
    interval: float
    proc: ServiceProcess
    seen: list[float] = field(default_factory=list)  # when each cycle's output was seen (monotonic)
    cycles_seen: int = 0                              # ... inside the window
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    rss_kb: list[int] = field(default_factory=list)
    hwm_kb: int = 0

    @property
    def pid(self) -> int:
        return self.proc.proc.pid


class Scraper(threading.Thread):
    """The minimal Prometheus stand-in: GET /metrics every interval."""

    def __init__(self, port: int, interval: float, stop: threading.Event, seen: list[float]):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval, self.stop_event, self.seen = interval, stop, seen

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            with urllib.request.urlopen(self.url, timeout=5) as response:
                response.read()
            self.seen.append(time.monotonic())
            next_at += self.interval
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles-1s", type=int, default=120, help="cycles measured at the 1 s interval")
    parser.add_argument("--cycles-10s", type=int, default=12, help="cycles measured at the 10 s interval")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the window opens")
    args = parser.parse_args(argv)
    check_peers_installed()
    intervals = {1.0: args.cycles_1s, 10.0: args.cycles_10s}
    window = max(i * n for i, n in intervals.items())
    with tempfile.TemporaryDirectory(prefix="hubwatch-bench-") as tmp:
        work = Path(tmp)
        servers = NutServers()
        broker = MosquittoBroker(work / "mosquitto")
        watched: list[Watched] = []
        stop = threading.Event()
        try:
            broker.start()
            nut = start_nut(servers)
            collector = StandInCollector(broker, client_id="bench-standin")
            counter = Subscriber(broker, "collectd/#", client_id="bench-counter")
            both = ", ".join(f"{i:g} s" for i in intervals)
            progress(f"starting hubwatch-agent, collectd and node-exporter at {both}")
            for interval in intervals:
                tag = f"{interval:g}s"
                config = agent_yaml(work / f"agent-{tag}.yaml", hub="bench-hub", host=f"gw{tag}",
                                    interval=interval, broker_port=broker.port, nut_port=nut.port)
                watched.append(Watched("hubwatch-agent", interval, start_agent(work, f"agent-{tag}", config)))
                conf = collectd_conf(work / f"collectd-{tag}.conf", hostname=f"gw{tag}", interval=interval,
                                     broker_port=broker.port, nut_port=nut.port)
                watched.append(Watched("collectd", interval, start_collectd(work, f"collectd-{tag}", conf)))
                proc, port = start_node_exporter(work, f"node-exporter-{tag}")
                w = Watched("prometheus-node-exporter", interval, proc)
                watched.append(w)
                Scraper(port, interval, stop, w.seen).start()
            progress(f"warming up for {args.warmup:g} s, then measuring for {window:g} s")
            time.sleep(args.warmup)
            counter.messages(timeout=0)  # what arrived during the warm-up is not counted
            opened = time.monotonic()
            for w in watched:
                w.cpu_start = cpu_seconds(w.pid)
            by_host = {(w.peer, f"gw{w.interval:g}s"): w for w in watched}
            while time.monotonic() - opened < window:
                for w in watched:
                    w.rss_kb.append(memory_kb(w.pid)["VmRSS"])
                for message in counter.messages(timeout=1.0, count=10**9):  # all of one second
                    if message.topic.endswith("/cpu/percent-active"):  # collectd/{host}/cpu/...: once a cycle
                        by_host[("collectd", message.topic.split("/")[1])].seen.append(message.timestamp)
            closed = time.monotonic()
            for w in watched:
                w.cpu_end = cpu_seconds(w.pid)
                w.hwm_kb = memory_kb(w.pid)["VmHWM"]
            stop.set()
            with collector.lock:
                for arrived, kind, envelope in collector.arrivals:
                    for sample in envelope.samples:
                        if kind == "metrics" and sample.measurement == "system":
                            by_host[("hubwatch-agent", envelope.host)].seen.append(arrived)
            for w in watched:
                w.cycles_seen = sum(1 for t in w.seen if opened <= t <= closed)
            elapsed = closed - opened
            counter.close()
            collector.close()
        finally:
            stop.set()
            for w in watched:
                w.proc.stop()
            servers.close()
            broker.stop()
    text = report(watched, intervals, elapsed, args.warmup)
    print(text)
    return text


def report(watched: list[Watched], intervals: dict[float, int], elapsed: float, warmup: float) -> str:
    rows, verdicts = [], []
    base: dict[float, Watched] = {w.interval: w for w in watched if w.peer == "hubwatch-agent"}
    for interval, planned in intervals.items():
        ref = base[interval]
        ref_cpu = (ref.cpu_end - ref.cpu_start) / planned * 1000
        ref_rss = statistics.median(ref.rss_kb) / 1024
        ref_hwm = ref.hwm_kb / 1024
        for w in [x for x in watched if x.interval == interval]:
            cpu = w.cpu_end - w.cpu_start
            per_1000 = cpu / planned * 1000
            rss = statistics.median(w.rss_kb) / 1024
            hwm = w.hwm_kb / 1024
            share = 100 * cpu / elapsed
            rows.append([f"{interval:g} s", w.peer, f"{planned} ({w.cycles_seen} seen)", f"{rss:.1f}",
                         f"{rss / ref_rss:.2f}", f"{hwm:.1f}", f"{hwm / ref_hwm:.2f}", f"{cpu:.2f}", f"{per_1000:.1f}",
                         f"{per_1000 / ref_cpu:.2f}" if ref_cpu else "–", f"{share:.2f}%"])
        cpu_share = 100 * (ref.cpu_end - ref.cpu_start) / elapsed
        if interval == 10.0:
            ok_rss = ref_hwm <= TARGET_RSS_MB
            ok_cpu = cpu_share <= TARGET_CPU_PERCENT
            verdicts.append(f"**Verdict (10 s, DESIGN targets RSS ≤ {TARGET_RSS_MB:g} MB, CPU ≤ "
                            f"{TARGET_CPU_PERCENT:g}% of a core):** RSS steady {ref_rss:.1f} MB / "
                            f"peak {ref_hwm:.1f} MB "
                            f"— {'met' if ok_rss else 'NOT met'}; CPU {cpu_share:.2f}% of a core — "
                            f"{'met' if ok_cpu else 'NOT met'}.")
    headers = ["interval", "program", "cycles in window", "RSS steady MB", "÷ hubwatch", "RSS peak MB",
               "÷ hubwatch", "CPU s in window", "CPU s / 1,000 cycles", "÷ hubwatch", "CPU % of a core"]
    ifaces = ", ".join(two_interfaces())
    config = (
        f"All six processes ran side by side against one mosquitto and one upsd (dummy-ups, {NUT_DUMP.name}); "
        f"window {elapsed:.0f} s after a {warmup:g} s warm-up: {intervals[1.0]} cycles at 1 s, "
        f"{intervals[10.0]} cycles at 10 s (CPU scaled ×{1000 / intervals[10.0]:.0f} to 1,000 cycles). "
        f"Probes: system, network ({ifaces}), ping ({', '.join(PING_TARGETS.values())}; hubwatch 3 probes per "
        "target per cycle, TCP connect since ICMP echo sockets are not allowed for this user by "
        "`net.ipv4.ping_group_range`; collectd's ping plugin uses raw ICMP sockets, which need root or "
        "CAP_NET_RAW — it ran as root here — and was set to 3 echoes per target per interval), nut. "
        "hubwatch-agent: default settings otherwise (ups_poll 2 s, cycles batched for up to 60 s, SQLite outbox "
        "with synchronous=FULL), acknowledged by a stand-in collector. collectd: cpu (one `active` %), "
        "memory (%), interface, uptime, load, df (/), ping, nut, mqtt (QoS 1). node-exporter: cpu, meminfo, "
        "netdev, loadavg, stat, filesystem; no ping, UPS or MQTT (it does less). RSS steady = median VmRSS "
        "over the window; peak = VmHWM; CPU = utime+stime from /proc/PID/stat. \"÷ hubwatch\": the program's "
        "figure divided by hubwatch-agent's at the same interval (below 1: lighter than hubwatch). CPU time "
        f"is counted in {1000 // CLK_TCK} ms ticks: a peer that used only a few ticks in the window has a "
        "ratio good to about one tick. hubwatch's 10 s figure includes its UPS fast path (ups_poll 2 s: "
        "five UPS reads per cycle).")
    return config + "\n\n" + table(headers, rows) + "\n\n" + "\n".join(verdicts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
