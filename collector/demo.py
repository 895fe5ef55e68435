"""``hubwatch-demo``: the whole chain on this machine, in accelerated time.

    make demo                      # installs what is missing, then runs this
    hubwatch-demo [--keep] [--html FILE]

On free loopback ports in a temporary directory it starts a mosquitto broker, an InfluxDB
1.x ``influxd``, NUT ``upsd`` with three ``dummy-ups`` UPSes (real ``upsc`` dumps from
``../shared/data/nut-ddl``), the real ``hubwatch-collector`` and real ``hubwatch-agent``
processes for three simulated hubs plus one agent measuring this machine. Then it plays a
power cut, an uplink drop and a battery drain, shows a live status line per hub, waits for
the outage engine to settle, prints the outage report and writes its HTML version.
docs/demo.md gives the timeline and how to read the output.

The demo starts its services with the test suite's launchers (``tests/services/``), so it
runs from a source checkout. Exit codes: 0 the report holds every scripted event; 1
something in the chain failed, or a scripted event is missing from the report; 2 bad usage,
not run from a checkout, or a program missing; 130 / 143 interrupted by SIGINT / SIGTERM
(after stopping every process it started and removing its temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence, TextIO

from collector import __version__

PROG = "hubwatch-demo"
REPO = Path(__file__).resolve().parent.parent
#: Real ``upsc`` dumps of 718 UPS models, kept next to the checkout (DESIGN.md "Real device data").
NUT_DDL = REPO.parent / "shared" / "data" / "nut-ddl"
CHECKOUT_HINT = "run hubwatch-demo from a hubwatch source checkout (make demo)"
LOOPBACK = "127.0.0.1"
DATABASE = "hubwatch"
#: The ``ups`` tag every simulated hub's agent gives its UPS (the name in its nut probe).
UPS_TAG = "hubups"
LOCAL_HUB = "local"
DEFAULT_HTML = "hubwatch-demo-report.html"
BATTERY_RULES = ("runtime_low", "battery_low")


class UsageProblem(Exception):
    """Exit 2: the demo cannot run here (not a checkout, a program missing, bad options)."""


class DemoFailed(Exception):
    """Exit 1: something in the chain failed."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: clean up and leave (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stopped(Exception):
    """A scenario thread was told to stop (the demo is ending)."""


# --- what is played -------------------------------------------------------------------------

@dataclass(frozen=True)
class SimHub:
    name: str
    host: str
    ups: str    # the UPS's name on upsd
    dump: str   # its real upsc dump, under nut-ddl
    story: str


HUBS = (
    SimHub("skardu-01", "gw01", "skardu-ups", "APC/APC__Back-UPS_CS_650__usbhid-ups__2.7.2__01.dev",
           "a power cut: 20 s on battery, then mains back"),
    SimHub("gilgit-sco-01", "gw01", "gilgit-ups", "Eaton/Eaton__5E1100iUSB__usbhid-ups__2.7.1__01.dev",
           "an uplink drop: 20 s cut off from the broker and the internet, still measuring"),
    SimHub("hunza-01", "gw01", "hunza-ups",
           "Cyber_Power_Systems/Cyber_Power_Systems__Value_1200ELCD__usbhid-ups__2.7.2__01.dev",
           "a long power cut: the battery drains from 100% to 15%, LB near the end"),
)
POWER_HUB, UPLINK_HUB, DRAIN_HUB = HUBS


@dataclass(frozen=True)
class Timeline:
    """Seconds after the play starts. Time is accelerated: a battery empties in under a minute,
    and the collector's intervals are shortened to match (see ``collector_config``)."""

    power_cut_at: float = 4.0
    power_cut_s: float = 20.0
    power_drain_percent_per_s: float = 0.5
    uplink_cut_at: float = 8.0
    uplink_cut_s: float = 20.0
    drain_at: float = 14.0
    drain_s: float = 44.0
    drain_from: float = 100.0
    drain_to: float = 15.0
    low_battery_at: float = 25.0   # the UPS raises LB at or below this charge
    ups_step_s: float = 2.0        # how often an on-battery UPS's readings change
    settle_max_s: float = 45.0     # at most this long for the outage engine to settle afterwards

    @property
    def play_s(self) -> float:
        return max(self.power_cut_at + self.power_cut_s, self.uplink_cut_at + self.uplink_cut_s,
                   self.drain_at + self.drain_s)


#: An on-line UPS for when the real dumps are not next to the checkout (a fresh clone of this
#: repository alone): the variables a small line-interactive UPS reports through usbhid-ups.
FALLBACK_DEV = """\
battery.charge: 100
battery.charge.low: 10
battery.runtime: 1800
battery.runtime.low: 120
battery.type: PbAc
battery.voltage: 13.6
battery.voltage.nominal: 12.0
device.mfr: hubwatch
device.model: demo 1000VA
device.type: ups
input.voltage: 230.0
input.voltage.nominal: 230
output.voltage: 230.0
ups.load: 20
ups.mfr: hubwatch
ups.model: demo 1000VA
ups.status: OL
"""


# --- the checkout's service launchers -----------------------------------------------------------

def load_launchers() -> SimpleNamespace:
    """The test suite's real-service launchers (tests/services/), from this checkout."""
    services = REPO / "tests" / "services"
    if not all((services / f"{name}.py").is_file() for name in ("common", "mosquitto", "influx", "nut", "proxy")):
        raise UsageProblem(f"{CHECKOUT_HINT}: {services} is not there (this hubwatch was installed without "
                           "its source tree)")
    if sys.path[:1] != [str(REPO)]:
        sys.path.insert(0, str(REPO))
    try:
        from tests.services import common, influx, mosquitto, nut, proxy
    except ImportError as exc:
        raise UsageProblem(f"{CHECKOUT_HINT}: cannot load the service launchers in {services} ({exc}); "
                           "`make demo` installs what they need") from None
    if not Path(mosquitto.__file__).resolve().is_relative_to(services):
        raise UsageProblem(f"{CHECKOUT_HINT}: Python found another 'tests' package at {mosquitto.__file__}")
    return SimpleNamespace(common=common, influx=influx, mosquitto=mosquitto, nut=nut, proxy=proxy)


def missing_programs(launchers: SimpleNamespace) -> list[str]:
    needed = [
        (launchers.mosquitto.MOSQUITTO, "mosquitto"),
        (launchers.influx.INFLUXD, "influxdb"),
        (launchers.nut.UPSD, "nut-server"),
        (launchers.nut.DUMMY_UPS, "nut-server"),
        (launchers.nut.UPSC, "nut-client"),
    ]
    return [f"{path} (Debian package {package})" for path, package in needed if not os.access(path, os.X_OK)]


def hubwatch_command(script: str, module: str) -> list[str]:
    """This installation's console script, or the module run by this Python."""
    exe = Path(sys.executable).parent / script
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


# --- the screen ---------------------------------------------------------------------------------

class Console:
    """Event lines as they happen, and a status block below them: redrawn in place on a
    terminal, printed every ``plain_every`` seconds otherwise (a log, a pipe)."""

    def __init__(self, stream: TextIO, live: bool, plain_every: float = 5.0):
        self.stream = stream
        self.live = live
        self.plain_every = plain_every
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._block: list[str] = []
        self._drawn = 0
        self._last_plain = 0.0

    def clock(self) -> str:
        return f"t+{time.monotonic() - self.started:4.0f}s"

    def say(self, text: str) -> None:
        """One timestamped event line."""
        self._write(f"{self.clock()}  {text}")

    def plain(self, text: str = "") -> None:
        self._write(text)

    def _write(self, text: str) -> None:
        with self._lock:
            self._erase()
            self.stream.write(text + "\n")
            self._draw()
            self.stream.flush()

    def board(self, lines: list[str]) -> None:
        with self._lock:
            self._block = lines
            if self.live:
                self._erase()
                self._draw()
            elif time.monotonic() - self._last_plain >= self.plain_every:
                self._last_plain = time.monotonic()
                self.stream.write(f"{self.clock()}  status:\n" + "".join(f"        {l}\n" for l in lines))
            self.stream.flush()

    def release(self) -> None:
        """Stop redrawing: the last status block stays on the screen as it is."""
        with self._lock:
            self._drawn = 0
            self._block = []

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live or not self._block:
            return
        width = max(40, shutil.get_terminal_size((120, 24)).columns - 1)
        for line in self._block:
            self.stream.write(line[:width] + "\n")  # a wrapped line would break the redraw
        self._drawn = len(self._block)


# --- alerts, received as the collector's webhook notifier sends them ----------------------------

class AlertInbox:
    """A small HTTP server that receives the collector's webhook POSTs and prints each one."""

    def __init__(self, console: Console):
        self.console = console
        self.received: list[dict[str, Any]] = []
        self.active: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except (ValueError, TypeError):
                    self.send_response(400)
                    self.end_headers()
                    return
                inbox.record(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="alert-inbox")
        self._thread.start()

    def record(self, alert: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(alert)
            key = str(alert.get("key"))
            if alert.get("state") == "firing":
                self.active[key] = alert
            else:
                self.active.pop(key, None)
        state = str(alert.get("state", "?")).upper() + (" (again)" if alert.get("renotify") else "")
        self.console.say(f"webhook: {state:<8} {alert.get('rule', '?'):<12} {alert.get('severity', '?'):<8} "
                         f"{alert.get('message', '')}")

    def firing(self, hub: str) -> list[str]:
        with self._lock:
            return sorted({a["rule"] for a in self.active.values() if a.get("hub") == hub})

    def fired(self, hub: str, rules: Sequence[str]) -> list[dict[str, Any]]:
        with self._lock:
            return [a for a in self.received if a.get("hub") == hub and a.get("rule") in rules
                    and a.get("state") == "firing"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the network a hub sees -----------------------------------------------------------------

class SimulatedInternet:
    """What a hub's ``internet`` ping target reaches: a TCP port that answers while the hub's
    uplink is up. While it is cut, connection attempts time out instead, as with an upstream
    that has gone away: the demo stops accepting and fills the port's listen queue, so the
    kernel leaves new SYNs unanswered (a refusal would still count as an answer)."""

    BACKLOG = 4

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(self.BACKLOG)
        self.port = self._listener.getsockname()[1]
        self._dark = threading.Event()
        self._closed = threading.Event()
        self._fillers: list[socket.socket] = []
        threading.Thread(target=self._answer, daemon=True, name="internet").start()

    def _answer(self) -> None:
        while not self._closed.is_set():
            if self._dark.is_set():
                time.sleep(0.05)
                continue
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if ready and not self._dark.is_set():
                    conn, _ = self._listener.accept()
                    conn.close()
            except (OSError, ValueError):
                return

    def go_dark(self) -> None:
        self._dark.set()
        time.sleep(0.15)  # the answering loop notices within one 0.1 s select
        for _ in range(self.BACKLOG + 8):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.2)
            try:
                filler.connect((LOOPBACK, self.port))
            except OSError:
                filler.close()  # the queue is full: SYNs go unanswered from now on
                return
            self._fillers.append(filler)

    def restore(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()
        self._dark.clear()

    def close(self) -> None:
        self._closed.set()
        self.restore()
        self._listener.close()


# --- configuration files ------------------------------------------------------------------------

def collector_config(path: Path, broker_url: str, influx_url: str, webhook_url: str) -> Path:
    path.write_text(f"""\
# written by hubwatch-demo: the real collector, with its intervals shortened to the demo's
# accelerated time (a production collector keeps the defaults).
instance: demo
mqtt:
  url: {broker_url}
  share_group: demo
influxdb:
  url: {influx_url}
  api: v1
  database: {DATABASE}
  create_database: true
ingest:
  batch_max_delay: 0.2s
  stats_interval: 5s
  max_retry_delay: 2s
dead_letter:
  path: {path.parent / 'deadletter.jsonl'}
outages:
  agent_interval: 1s          # the agents' interval: 3 s of silence is a dark hub
  agent_batch_max_age: 0s     # the demo's agents send every cycle
  min_power_s: 5s             # shorter on battery is a blip
  recompute_interval: 1s
alerts:
  interval: 0.5s
  rules:
    on_battery: {{debounce: 3s}}
    hub_offline: {{debounce: 8s}}
    runtime_low: {{threshold_minutes: 0.5, window: 60s}}   # a battery here lasts about a minute
  notifiers:
    - type: webhook
      url: {webhook_url}
""")
    return path


def agent_config(path: Path, hub: str, host: str, broker_url: str, probes: str) -> Path:
    path.write_text(f"""\
# written by hubwatch-demo
hub: {hub}
host: {host}
interval: 1s
ups_poll: 0.5s
mqtt:
  url: {broker_url}
  keepalive: 5s
  reconnect_min: 0.5s
  reconnect_max: 2s
buffer:
  path: {path.parent / 'outbox.db'}
  resend_after: 5s
  batch_max_age: 0s           # a message every cycle: the demo is short
publish:
  flush_timeout: 1s
clock:
  require_sync: false         # the demo is about power and links, not this machine's NTP state
probes:
{probes}""")
    return path


def hub_probes(internet_port: int, nut_port: int, ups: str) -> str:
    return f"""\
  system: {{}}
  ping:
    targets:
      internet: {{address: {LOOPBACK}, port: {internet_port}}}
    method: tcp
    count: 1
    timeout: 0.3s
  nut:
    - {{name: {UPS_TAG}, host: {LOOPBACK}, port: {nut_port}, ups: {ups}}}
"""


LOCAL_PROBES = f"""\
  system: {{}}
  network: {{interfaces: ["eth*", "en*", "wl*", "lo"]}}
  ping:
    targets:
      loopback: {LOOPBACK}
    count: 1
    timeout: 0.3s
"""


# --- formatting ---------------------------------------------------------------------------------

def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def series(result: dict[str, Any]) -> list[tuple[dict[str, str], list[dict[str, Any]]]]:
    """(tags, rows) of every series in one InfluxQL statement's result."""
    out = []
    for s in result.get("series") or []:
        out.append((s.get("tags") or {}, [dict(zip(s["columns"], values)) for values in s.get("values", [])]))
    return out


@dataclass
class Check:
    what: str
    ok: bool
    detail: str


# --- the demo -------------------------------------------------------------------------------------

@dataclass
class Demo:
    launchers: SimpleNamespace
    workdir: Path
    console: Console
    timeline: Timeline = Timeline()
    processes: list[Any] = field(default_factory=list)   # ServiceProcess, in start order
    agents: list[Any] = field(default_factory=list)
    extra_dirs: list[Path] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    scenario_errors: list[str] = field(default_factory=list)
    ups_data: Path = NUT_DDL

    def __post_init__(self) -> None:
        self.broker = self.influx = self.nut = self.collector = self.inbox = None
        self.proxy = None  # TcpProxy: the uplink hub's link to the broker
        self.internet: dict[str, SimulatedInternet] = {}
        self.collector_config: Path | None = None
        self.window_start = time.time()
        self.local_host = self._local_host()

    @staticmethod
    def _local_host() -> str:
        from agent.config import default_host
        return default_host()

    # --- starting -------------------------------------------------------------------------------
    def _started(self, label: str, proc: Any, detail: str = "") -> None:
        self.console.plain(f"  {label:<30} pid {proc.proc.pid:<8} {detail}".rstrip())

    def start_services(self) -> None:
        l = self.launchers
        self.console.plain("Starting the services on loopback:")
        self.broker = l.mosquitto.MosquittoBroker(self.workdir / "mosquitto")
        self.processes.append(self.broker.process)
        self.broker.start()
        self._started("mosquitto (MQTT broker)", self.broker.process, self.broker.url)

        self.influx = l.influx.InfluxServer(self.workdir / "influxdb")
        self.processes.append(self.influx.process)
        self.influx.start()
        self._started("influxd (InfluxDB 1.x)", self.influx.process, self.influx.url)

        nut_root = self.workdir / "nut"
        if len(str(nut_root)) > 60:  # the drivers' unix sockets live there: a socket path fits in 107 bytes
            nut_root = Path(tempfile.mkdtemp(prefix="hwnut", dir="/tmp"))
            self.extra_dirs.append(nut_root)
        self.nut = l.nut.NutServer(nut_root, l.common.free_port())
        devices = {}
        for hub in HUBS:
            dump = self.ups_data / hub.dump
            if dump.is_file():
                devices[hub.ups] = l.nut.load_dev(dump)
                maker, model = (part.replace("_", " ") for part in dump.name.split("__")[:2])
                source = f"{maker} {model} (real dump: {dump.name})"
            else:
                devices[hub.ups] = l.nut.parse_upsc_dump(FALLBACK_DEV)
                source = f"built-in stand-in UPS (no {dump})"
            self.console.plain(f"  UPS {hub.ups:<26} {source}")
        self.nut.write_config(devices)
        for ups in self.nut.ups.values():
            self.processes.append(ups.driver)
        try:
            self.nut.start(timeout=30)
        finally:
            if self.nut.upsd is not None:
                self.processes.append(self.nut.upsd)
        for ups in self.nut.ups.values():
            self._started(f"dummy-ups {ups.name}", ups.driver)
        self._started("upsd (NUT)", self.nut.upsd, f"{LOOPBACK}:{self.nut.port}")

    def start_collector(self) -> None:
        self.inbox = AlertInbox(self.console)
        directory = self.workdir / "collector"
        directory.mkdir()
        self.collector_config = collector_config(directory / "collector.yaml", self.broker.url, self.influx.url,
                                                 self.inbox.url)
        self.window_start = time.time() - 1
        argv = hubwatch_command("hubwatch-collector", "collector.cli") + ["-c", str(self.collector_config),
                                                                           "--log-level", "info"]
        self.collector = self.launchers.common.ServiceProcess("hubwatch-collector", argv, directory)
        self.processes.append(self.collector)
        self.collector.start()
        self._started("hubwatch-collector", self.collector, f"alerts to {self.inbox.url}")
        log = self.collector.log_path
        self.collector.wait_until(lambda: "subscribed in share group" in log.read_text(errors="replace"), 20,
                                  "subscribed to the broker")
        self.collector.wait_until(lambda: "is now the leader" in log.read_text(errors="replace"), 20,
                                  "leading (outages and alerts)")

    def start_agents(self) -> None:
        self.proxy = self.launchers.proxy.TcpProxy(LOOPBACK, self.broker.port)
        for hub in HUBS:
            self.internet[hub.name] = SimulatedInternet()
            directory = self.workdir / "agents" / hub.name
            directory.mkdir(parents=True)
            url = self.proxy.url if hub is UPLINK_HUB else self.broker.url
            config = agent_config(directory / "agent.yaml", hub.name, hub.host, url,
                                  hub_probes(self.internet[hub.name].port, self.nut.port, hub.ups))
            self._start_agent(f"hubwatch-agent {hub.name}", config, directory,
                              "via the uplink proxy" if hub is UPLINK_HUB else hub.story.split(":")[0])
        directory = self.workdir / "agents" / LOCAL_HUB
        directory.mkdir(parents=True)
        config = agent_config(directory / "agent.yaml", LOCAL_HUB, self.local_host, self.broker.url, LOCAL_PROBES)
        self._start_agent(f"hubwatch-agent {LOCAL_HUB}", config, directory, f"this machine ({self.local_host})")

    def _start_agent(self, label: str, config: Path, directory: Path, detail: str) -> None:
        argv = hubwatch_command("hubwatch-agent", "agent.cli") + ["-c", str(config), "--log-level", "info"]
        agent = self.launchers.common.ServiceProcess(label.replace(" ", "-"), argv, directory)
        self.processes.append(agent)
        self.agents.append(agent)
        agent.start()
        self._started(label, agent, detail)

    def wait_for_hubs(self, timeout: float = 30.0) -> None:
        """Until every agent is online and every simulated hub's UPS has been stored."""
        wanted = {(h.name, h.host) for h in HUBS} | {(LOCAL_HUB, self.local_host)}
        deadline = time.monotonic() + timeout
        missing: set = wanted
        while time.monotonic() < deadline:
            self.check_processes()
            try:
                status, ups = self.influx.query(
                    'SELECT last("state") AS "state" FROM "status" GROUP BY "hub", "host";'
                    'SELECT count("on_line") FROM "ups" GROUP BY "hub"', db=DATABASE)
            except Exception:
                status, ups = {}, {}
            online = {(t.get("hub"), t.get("host")) for t, rows in series(status)
                      if rows and rows[0]["state"] == "online"}
            with_ups = {t.get("hub") for t, rows in series(ups) if rows}
            missing = {w for w in wanted if w not in online or (w[0] != LOCAL_HUB and w[0] not in with_ups)}
            if not missing:
                return
            time.sleep(0.3)
        raise DemoFailed("these agents did not come online with their data within "
                         f"{timeout:g}s: {', '.join(f'{h}/{x}' for h, x in sorted(missing))}\n"
                         + "\n".join(f"--- {a.name} log:\n{a.log_tail(15)}" for a in self.agents))

    def check_processes(self) -> None:
        for proc in self.processes:
            if proc.proc is not None and proc.proc.poll() is not None and not self.stop_event.is_set():
                raise DemoFailed(f"{proc.name} (pid {proc.proc.pid}) exited with code {proc.proc.returncode}; "
                                 f"its log ({proc.log_path}) ends:\n{proc.log_tail(25)}")
        if self.scenario_errors:
            raise DemoFailed("the scripted scenario failed: " + "; ".join(self.scenario_errors))

    # --- playing --------------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        if self.stop_event.wait(max(0.0, seconds)):
            raise Stopped()

    def _ups_set(self, hub: SimHub, changes: dict[str, str]) -> None:
        if self.stop_event.is_set():
            raise Stopped()
        self.nut.set_vars(hub.ups, changes, timeout=10)

    def discharge(self, hub: SimHub, seconds: float, start: float, end: float, low_at: float | None) -> float:
        """The UPS on battery for ``seconds``, its charge falling in steps from ``start`` to
        ``end``. Its own runtime estimate follows the same (accelerated) drain, as a healthy
        battery's does; ``low_at``: it raises LB at or below this charge. Returns ``end``."""
        steps = max(2, round(seconds / self.timeline.ups_step_s))
        rate = (start - end) / seconds  # % per second
        began = time.monotonic()
        said_low = False
        for i in range(steps):
            charge = start - (start - end) * i / (steps - 1)
            low = low_at is not None and charge <= low_at
            changes = {"ups.status": "OB DISCHRG LB" if low else "OB DISCHRG", "battery.charge": f"{charge:.0f}",
                       "battery.runtime": f"{charge / rate:.0f}"}
            if "input.voltage" in self.nut.ups[hub.ups].variables:
                changes["input.voltage"] = "0.0"
            self._ups_set(hub, changes)
            if low and not said_low:
                said_low = True
                self.console.say(f"{hub.name}: the UPS raises LB (low battery) at {charge:.0f}%")
            self._wait(began + (i + 1) * seconds / steps - time.monotonic())
        return end

    def mains_back(self, hub: SimHub, original: dict[str, str], charge: float) -> None:
        changes = {"ups.status": "OL CHRG", "battery.charge": f"{charge:.0f}"}
        if "battery.runtime" in original:
            full = float(original.get("battery.runtime", "0") or 0)
            changes["battery.runtime"] = f"{full * charge / 100:.0f}"
        if "input.voltage" in original:
            changes["input.voltage"] = original["input.voltage"]
        self._ups_set(hub, changes)

    def play_power_cut(self) -> None:
        t, hub = self.timeline, POWER_HUB
        original = dict(self.nut.ups[hub.ups].variables)
        self._wait(t.power_cut_at)
        self.console.say(f"{hub.name}: mains power cut; the UPS goes on battery (OB DISCHRG), the gateway "
                         "keeps running on it")
        charge = self.discharge(hub, t.power_cut_s, 100.0, 100.0 - t.power_drain_percent_per_s * t.power_cut_s,
                                None)
        self.mains_back(hub, original, charge)
        self.console.say(f"{hub.name}: mains power back after {t.power_cut_s:.0f}s (OL CHRG, charge {charge:.0f}%)")

    def play_uplink_drop(self) -> None:
        t, hub = self.timeline, UPLINK_HUB
        self._wait(t.uplink_cut_at)
        self.proxy.cut()
        self.internet[hub.name].go_dark()
        self.console.say(f"{hub.name}: uplink cut; the broker loses the agent (Last Will: offline) and its "
                         "internet target stops answering; the agent keeps measuring into its outbox")
        self._wait(t.uplink_cut_s)
        self.internet[hub.name].restore()
        self.proxy.restore()
        self.console.say(f"{hub.name}: uplink back after {t.uplink_cut_s:.0f}s; the agent reconnects and "
                         "replays its outbox")

    def play_battery_drain(self) -> None:
        t, hub = self.timeline, DRAIN_HUB
        original = dict(self.nut.ups[hub.ups].variables)
        self._wait(t.drain_at)
        rate = (t.drain_from - t.drain_to) / t.drain_s
        self.console.say(f"{hub.name}: long power cut; the battery drains {rate:.1f}%/s from {t.drain_from:.0f}% "
                         f"(about {t.drain_from / rate:.0f}s to empty)")
        charge = self.discharge(hub, t.drain_s, t.drain_from, t.drain_to, t.low_battery_at)
        self.mains_back(hub, original, charge)
        self.console.say(f"{hub.name}: mains power back at {charge:.0f}% (OL CHRG), before the battery ran out")

    def play(self, board: "StatusBoard") -> None:
        self.console.plain()
        self.console.plain(f"Playing (about {self.timeline.play_s:.0f}s):")
        for hub in HUBS:
            self.console.plain(f"  {hub.name:<14} {hub.story}")
        self.console.plain(f"  {LOCAL_HUB:<14} this machine, measured as it is")
        threads = []
        for play in (self.play_power_cut, self.play_uplink_drop, self.play_battery_drain):
            thread = threading.Thread(target=self._scenario, args=(play,), daemon=True, name=play.__name__)
            threads.append(thread)
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            self.check_processes()
            self.console.board(board.lines())
            time.sleep(1.0)
        self.check_processes()

    def _scenario(self, play: Callable[[], None]) -> None:
        try:
            play()
        except Stopped:
            pass
        except Exception as exc:
            self.scenario_errors.append(f"{play.__name__}: {exc}")

    # --- settling and reporting ------------------------------------------------------------------
    def outages(self) -> list[dict[str, Any]]:
        result = self.influx.query(
            'SELECT "duration_seconds", "ongoing", "cause", "blip" FROM "outage" '
            f'WHERE time >= {int(self.window_start * 1e9)} GROUP BY "hub", "kind", "host"', db=DATABASE)[0]
        return [{**tags, **row} for tags, rows in series(result) for row in rows]

    def unsettled(self) -> list[str]:
        """What the outage engine and the alerts have still to show."""
        try:
            outages = self.outages()
        except Exception as exc:
            return [f"outages unreadable ({exc})"]
        def ended(hub: str, kind: str, cause: str | None = None) -> bool:
            return any(o["hub"] == hub and o["kind"] == kind and not o.get("ongoing") and not o.get("blip")
                       and (cause is None or o.get("cause") == cause) for o in outages)
        waiting = []
        if not ended(POWER_HUB.name, "power"):
            waiting.append(f"{POWER_HUB.name}'s power outage")
        if not ended(UPLINK_HUB.name, "hub_dark", "uplink"):
            waiting.append(f"{UPLINK_HUB.name}'s dark period classified as cause uplink")
        if not ended(DRAIN_HUB.name, "power"):
            waiting.append(f"{DRAIN_HUB.name}'s power outage")
        ongoing = sorted({f"{o['hub']} {o['kind']}" for o in outages if o.get("ongoing")})
        if ongoing:
            waiting.append("outages still open: " + ", ".join(ongoing))
        firing = sorted({f"{a.get('hub')} {a.get('rule')}" for a in self.inbox.active.values()})
        if firing:
            waiting.append("alerts not yet resolved: " + ", ".join(firing))
        return waiting

    def settle(self, board: "StatusBoard") -> None:
        self.console.plain()
        self.console.say("the script is done; waiting for the outage engine and the alerts to settle")
        deadline = time.monotonic() + self.timeline.settle_max_s
        waiting = self.unsettled()
        while waiting and time.monotonic() < deadline:
            self.check_processes()
            self.console.board(board.lines())
            time.sleep(1.0)
            waiting = self.unsettled()
        self.console.board(board.lines())
        if waiting:
            self.console.say(f"not settled after {self.timeline.settle_max_s:.0f}s, reporting anyway; still "
                             "waiting for: " + "; ".join(waiting))
        else:
            self.console.say("settled: every outage has ended and been classified, every alert resolved")

    def report(self, html_path: Path) -> list[Check]:
        from collector import report_cli

        window = ["-c", str(self.collector_config), "--from", iso(self.window_start), "--to", iso(time.time() + 1),
                  "-q"]
        json_path = self.workdir / "report.json"
        if report_cli.main(window + ["--format", "json", "-o", str(json_path)]) != 0:
            raise DemoFailed("hubwatch-report could not read the outage report (see the message above)")
        self.console.release()
        self.console.plain()
        self.console.plain(f"=== Outage report, {iso(self.window_start)} to now (hubwatch-report --format text) ===")
        self.console.plain()
        if report_cli.main(window + ["--format", "text"]) != 0:
            raise DemoFailed("hubwatch-report could not print the text report")
        sys.stdout.flush()
        if report_cli.main(window + ["--format", "html", "-o", str(html_path)]) != 0:
            raise DemoFailed(f"hubwatch-report could not write the HTML report to {html_path}")
        self.console.plain()
        self.console.plain(f"HTML report: {html_path}")
        return verify(json.loads(json_path.read_text()), self.inbox)

    # --- stopping -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this demo started: agents first (each says 'stopped' and flushes),
        then the collector, the NUT server, InfluxDB and the broker."""
        self.stop_event.set()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("agents", lambda: _stop_together(self.agents, 8.0)),
            ("collector", lambda: self.collector and self.collector.stop(timeout=8)),
            ("NUT", lambda: self.nut and (self.nut.stop(), self.nut.kill())),
            ("influxd", lambda: self.influx and self.influx.stop()),
            ("mosquitto", lambda: self.broker and self.broker.stop()),
            ("uplink proxy", lambda: self.proxy and self.proxy.close()),
            ("internet", lambda: [i.close() for i in self.internet.values()]),
            ("webhook receiver", lambda: self.inbox and self.inbox.close()),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                print(f"{PROG}: while stopping {what}: {exc}", file=sys.stderr)
        for proc in self.processes:  # anything that ignored SIGTERM
            try:
                proc.kill()
            except Exception:
                pass


def _stop_together(processes: list[Any], timeout: float) -> None:
    for proc in processes:
        try:
            proc.signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for proc in processes:
        if proc.proc is None:
            continue
        try:
            proc.proc.wait(max(0.1, deadline - time.monotonic()))
        except Exception:
            proc.kill()


def verify(report: dict[str, Any], inbox: AlertInbox) -> list[Check]:
    """The scripted events, as the report (outages) and the webhook (alerts) show them."""
    hubs = {h["hub"]: h for h in report.get("hubs", [])}
    def outages(hub: str) -> list[dict[str, Any]]:
        return list(hubs.get(hub, {}).get("outages", []))
    power = [o for o in outages(POWER_HUB.name) if o["kind"] == "power"]
    uplink = [o for o in outages(UPLINK_HUB.name)
              if o["kind"] == "uplink" or (o["kind"] == "hub_dark" and o.get("cause") == "uplink")]
    battery = inbox.fired(DRAIN_HUB.name, BATTERY_RULES)
    def when(o: dict[str, Any]) -> str:
        return f"{o['kind']}" + (f" (cause {o['cause']})" if o.get("cause") else "") + \
               f", {human_seconds(o.get('duration_seconds'))}"
    return [
        Check(f"power outage at {POWER_HUB.name}", bool(power),
              "; ".join(when(o) for o in power) or f"the report lists no power outage for {POWER_HUB.name}"),
        Check(f"uplink outage at {UPLINK_HUB.name}", bool(uplink),
              "; ".join(when(o) for o in uplink)
              or f"the report lists neither an uplink outage nor a hub_dark outage with cause uplink for "
                 f"{UPLINK_HUB.name}"),
        Check(f"battery alert at {DRAIN_HUB.name}", bool(battery),
              "; ".join(f"{a['rule']}: {a.get('message', '')}" for a in battery)
              or f"the webhook received no {' or '.join(BATTERY_RULES)} alert for {DRAIN_HUB.name}"),
    ]


# --- the live status lines --------------------------------------------------------------------

class StatusBoard:
    """One line per hub, from InfluxDB (what the collector stored) and the webhook (alerts)."""

    HEADER = f"{'hub':<14} {'agent':<8} {'power':<11} {'charge':>6} {'runtime':>7}  {'alerts firing':<34} outages"

    def __init__(self, demo: Demo):
        self.demo = demo

    def lines(self) -> list[str]:
        demo = self.demo
        since = int(demo.window_start * 1e9)
        try:
            status, ups, local, outages = demo.influx.query(
                'SELECT last("state") AS "state" FROM "status" GROUP BY "hub", "host";'
                'SELECT last("on_battery") AS "on_battery", last("low_battery") AS "low", '
                'last("battery_charge_percent") AS "charge", last("battery_runtime_seconds") AS "runtime" '
                f'FROM "ups" WHERE time >= {since} GROUP BY "hub";'
                'SELECT last("cpu_percent") AS "cpu", last("memory_used_percent") AS "memory", '
                'last("load1") AS "load1" '
                f"FROM \"system\" WHERE hub = '{LOCAL_HUB}' AND time >= {since};"
                'SELECT "duration_seconds", "ongoing", "cause", "blip" FROM "outage" '
                f'WHERE time >= {since} GROUP BY "hub", "kind"', db=DATABASE)
        except Exception as exc:
            return [self.HEADER, f"(waiting for InfluxDB: {str(exc)[:80]})"]
        state = {(t.get("hub"), t.get("host")): rows[0].get("state") for t, rows in series(status) if rows}
        power = {t.get("hub"): rows[0] for t, rows in series(ups) if rows}
        per_hub: dict[str, list[str]] = {}
        for tags, rows in series(outages):
            for row in rows:
                kind = tags.get("kind", "?")
                if row.get("blip"):
                    text = "blip"
                else:
                    cause = f"/{row['cause']}" if kind in ("hub_dark", "host_down") and row.get("cause") else ""
                    length = "now" if row.get("ongoing") else human_seconds(row.get("duration_seconds"))
                    text = f"{kind}{cause} {length}"
                per_hub.setdefault(tags.get("hub", "?"), []).append(text)
        lines = [self.HEADER]
        for hub in HUBS:
            p = power.get(hub.name, {})
            if p.get("on_battery") is None:
                supply = "?"
            else:
                supply = ("BATTERY+LB" if p.get("low") else "BATTERY") if p.get("on_battery") else "mains"
            charge = f"{p['charge']:.0f}%" if p.get("charge") is not None else "-"
            alerts = ",".join(demo.inbox.firing(hub.name)) or "-"
            lines.append(f"{hub.name:<14} {_agent_state(state.get((hub.name, hub.host))):<8} {supply:<11} "
                         f"{charge:>6} {human_seconds(p.get('runtime')):>7}  {alerts:<34} "
                         + (", ".join(per_hub.get(hub.name, [])) or "-"))
        rows = [r for _, rs in series(local) for r in rs]
        machine = rows[0] if rows else {}
        usage = (f"cpu {machine['cpu']:.0f}%, memory {machine['memory']:.0f}%, load {machine['load1']:.2f}"
                 if machine.get("cpu") is not None and machine.get("memory") is not None
                 and machine.get("load1") is not None else "waiting for its first sample")
        lines.append(f"{LOCAL_HUB:<14} {_agent_state(state.get((LOCAL_HUB, demo.local_host))):<8} "
                     f"this machine ({demo.local_host}): {usage}"
                     + (f"; outages: {', '.join(per_hub[LOCAL_HUB])}" if per_hub.get(LOCAL_HUB) else ""))
        return lines


def _agent_state(state: str | None) -> str:
    if state is None:
        return "?"
    return "online" if state == "online" else state.upper()


# --- the command ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the whole hubwatch chain on this machine (loopback only): a broker, InfluxDB, a NUT "
                    "server with three UPSes, the collector, agents for three simulated hubs and one for this "
                    "machine. Plays a power cut, an uplink drop and a battery drain in accelerated time, shows "
                    "a live status line per hub, then prints the outage report and writes its HTML version. "
                    "Takes one to two minutes.",
        epilog="Run it from a source checkout: `make demo` installs what is missing and runs it. Exit codes: 0 "
               "the report holds every scripted event; 1 something in the chain failed or an event is missing; "
               "2 bad usage, not a checkout, or a program missing; 130/143 interrupted (everything stopped and "
               "removed). See docs/demo.md.")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs, outboxes, data) and write the HTML "
                             "report there; the processes are stopped either way")
    parser.add_argument("--html", metavar="FILE", type=Path,
                        help=f"where to write the HTML report (default: ./{DEFAULT_HTML}, or in the kept "
                             "directory with --keep)")
    parser.add_argument("--ups-data", metavar="DIR", type=Path, default=NUT_DDL,
                        help="a folder of real `upsc` dumps laid out as NUT's device dump library "
                             "(MAKER/MAKER__MODEL__DRIVER__VERSION__NN.dev) to take the three UPSes from; "
                             f"default: ../shared/data/nut-ddl beside the checkout ({NUT_DDL}); a dump missing "
                             "there is replaced by a built-in stand-in UPS")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _cleanup(demo: Demo | None, workdir: Path | None, keep: bool, console: Console | None) -> None:
    if console is not None:
        console.release()
    if demo is not None:
        demo.stop()
    _reap_children()
    if workdir is not None:
        if keep:
            print(f"{PROG}: kept {workdir} (configs, logs, outboxes, InfluxDB data)", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for extra in (demo.extra_dirs if demo is not None else []):
        shutil.rmtree(extra, ignore_errors=True)


def _reap_children() -> None:
    """Last resort: stop any child process still running (one started just as a signal came)."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == me:
            children.append(int(entry.name))
    for pid in children:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
            else:
                continue
            break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        launchers = load_launchers()
        missing = missing_programs(launchers)
        if missing:
            raise UsageProblem(f"missing: {'; '.join(missing)}. `make demo` installs them (Debian/Ubuntu, as "
                               "root or with sudo)")
        html = None if args.keep and args.html is None else (args.html or Path(DEFAULT_HTML)).resolve()
        if html is not None:
            try:  # os.access says yes to root even where nothing can be created (/proc, a read-only mount)
                tempfile.TemporaryFile(dir=html.parent).close()
            except OSError as exc:
                raise UsageProblem(f"cannot write the HTML report in {html.parent} ({exc.strerror or exc}); "
                                   "give --html FILE somewhere writable") from None
    except UsageProblem as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2

    cleaning = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if cleaning.is_set():
            print(f"\n{PROG}: still stopping the demo's processes...", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console(sys.stdout, live=sys.stdout.isatty())
    workdir: Path | None = None
    demo: Demo | None = None
    code = 1
    try:
        workdir = Path(tempfile.mkdtemp(prefix="hubwatch-demo-"))
        html = html or workdir / DEFAULT_HTML
        console.plain(f"{PROG} {__version__}: the whole chain on this machine, in accelerated time (Ctrl-C stops "
                      "it and cleans up)")
        console.plain(f"working directory: {workdir}")
        demo = Demo(launchers, workdir, console, ups_data=args.ups_data)
        demo.start_services()
        demo.start_collector()
        demo.start_agents()
        console.plain(f"pids: {' '.join(str(p.proc.pid) for p in demo.processes if p.proc is not None)}")
        demo.wait_for_hubs()
        console.say("every agent is online and its data is in InfluxDB")
        board = StatusBoard(demo)
        demo.play(board)
        demo.settle(board)
        checks = demo.report(html)
        console.plain()
        console.plain("=== What the demo scripted, and where it shows ===")
        for check in checks:
            console.plain(f"  {'OK     ' if check.ok else 'MISSING'}  {check.what}: {check.detail}")
        failed = [c.what for c in checks if not c.ok]
        if failed:
            print(f"{PROG}: the report is missing: {', '.join(failed)}"
                  + ("" if args.keep else " (run with --keep to keep the logs)"), file=sys.stderr)
            code = 1
        else:
            console.plain("All three scripted events are in the report.")
            code = 0
    except Interrupted as exc:
        cleaning.set()
        console.release()
        print(f"\n{PROG}: interrupted ({exc}); stopping every process"
              + ("" if args.keep or workdir is None else f" and removing {workdir}"), file=sys.stderr, flush=True)
        code = 128 + exc.signum
    except Exception as exc:
        cleaning.set()
        console.release()
        services = launchers.common
        if isinstance(exc, (DemoFailed, services.ServiceError)):
            print(f"\n{PROG}: failed: {exc}", file=sys.stderr)
        else:
            print(f"\n{PROG}: failed unexpectedly:", file=sys.stderr)
            traceback.print_exc()
        if not args.keep and workdir is not None:
            print(f"{PROG}: run with --keep to keep the logs", file=sys.stderr)
        code = 1
    finally:
        cleaning.set()
        try:
            _cleanup(demo, workdir, args.keep, console)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if code in (0, 1):
        print(f"{PROG}: done in {time.monotonic() - console.started:.0f}s, every process stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
