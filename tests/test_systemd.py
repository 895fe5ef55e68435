"""systemd integration: the sd_notify client, the programs' READY/WATCHDOG/STOPPING, the units.

The notify socket is a real unix datagram socket bound by the test (as systemd binds its
own), with ``SO_PASSCRED`` so the kernel's sender credentials are checked the way systemd
uses them. The units are checked with the real ``systemd-analyze verify`` and
``systemd-analyze security``, and their system call filters against the calls the real
programs make (traced with ``strace``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent import sdnotify
from tests.collector_harness import collector_command, count_points, envelope, ups_samples, wait_for, write_collector_config
from tests.services.common import ServiceProcess, free_port

REPO = Path(__file__).resolve().parent.parent
UNITS = {name: REPO / "systemd" / f"hubwatch-{name}.service" for name in ("agent", "collector")}
VENV_BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
STRACE = shutil.which("strace")
#: The exposure scores recorded in docs/install.md; a change to the units must not raise them.
MAX_EXPOSURE = {"agent": 1.5, "collector": 1.1}


class NotifySocket:
    """What systemd's end of ``$NOTIFY_SOCKET`` sees: messages with the sender's pid."""

    def __init__(self, address: str | bytes, env_value: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.env_value = env_value
        self.messages: list[tuple[float, int | None, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, space)
            except OSError:
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), pid, fields))

    def with_key(self, key: str) -> list[tuple[float, int | None, dict[str, str]]]:
        with self._lock:
            return [m for m in self.messages if key in m[2]]

    def wait(self, key: str, count: int = 1, timeout: float = 10.0):
        return wait_for(lambda: (found := self.with_key(key)) and len(found) >= count and found,
                        timeout, f"{count} message(s) with {key}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A path notify socket set as this process's ``$NOTIFY_SOCKET``."""
    path = tmp_path / "notify"
    receiver = NotifySocket(str(path), str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


# --- the client ------------------------------------------------------------------------------
def test_messages_reach_a_path_socket_with_our_credentials(notify_socket):
    assert sdnotify.ready("measuring")
    assert sdnotify.watchdog()
    assert sdnotify.status("3 samples\nwaiting")
    assert sdnotify.stopping()
    notify_socket.wait("STOPPING", 1)
    got = [fields for _, _, fields in notify_socket.messages]
    assert got == [{"READY": "1", "STATUS": "measuring"}, {"WATCHDOG": "1"},
                   {"STATUS": "3 samples waiting"}, {"STOPPING": "1"}]
    # systemd accepts a message only from the service's main process: the kernel says who sent it
    assert {pid for _, pid, _ in notify_socket.messages} == {os.getpid()}


def test_abstract_namespace_socket(monkeypatch):
    name = f"hubwatch-test-{uuid.uuid4().hex}"
    receiver = NotifySocket("\0" + name, "@" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert receiver.wait("READY")[0][2] == {"READY": "1"}
    finally:
        receiver.close()


def test_no_op_outside_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False and sdnotify.watchdog() is False and sdnotify.stopping() is False
    # a socket nobody listens on: a failed send is swallowed, never raised
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a form we do not speak
    assert sdnotify.ready() is False


def test_watchdog_interval_from_the_environment():
    me = str(os.getpid())
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    # inherited by a child: the watchdog is someone else's
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_heartbeat_pings_at_half_the_interval_while_waiting(notify_socket):
    beat = sdnotify.Heartbeat(interval=0.4)
    stop = threading.Event()
    started = time.monotonic()
    assert beat.wait(stop, 1.0) is False
    assert time.monotonic() - started >= 1.0
    pings = [t for t, _, f in notify_socket.messages if f == {"WATCHDOG": "1"}]
    assert 3 <= len(pings) <= 6, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.4, gaps  # never a whole interval without a ping
    # beat() between waits is rate-limited: a busy loop does not flood systemd
    before = len(notify_socket.messages)
    for _ in range(1000):
        beat.beat()
    assert len(notify_socket.messages) - before <= 1
    # a set event ends the wait at once
    stop.set()
    started = time.monotonic()
    assert beat.wait(stop, 10.0) is True and time.monotonic() - started < 0.5


def test_heartbeat_without_watchdog_is_a_plain_wait(notify_socket):
    beat = sdnotify.Heartbeat(interval=None)
    assert not beat.enabled
    assert beat.wait(threading.Event(), 0.05) is False
    assert beat.beat() is False
    assert notify_socket.messages == []


# --- the collector under a notify socket --------------------------------------------------------
@pytest.mark.services
def test_collector_ready_once_subscribed_watchdog_through_an_influx_outage_then_stopping(
        tmp_path, mosquitto, influx):
    sock_path = tmp_path / "notify"
    receiver = NotifySocket(str(sock_path), str(sock_path))
    config = write_collector_config(tmp_path / "collector.yaml", mosquitto, influx)
    proc = ServiceProcess("collector", collector_command(config), tmp_path / "run",
                          env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    proc.start()
    try:
        (_, pid, ready), = receiver.wait("READY")
        assert ready["READY"] == "1" and pid == proc.proc.pid
        assert "subscribed in share group" in proc.log_path.read_text()  # ready means subscribed
        # InfluxDB goes away: the write retries, and the watchdog must keep being fed meanwhile
        influx.stop()
        with mosquitto.client() as client:
            client.publish("hubwatch/v1/gilgit-sco-01/gw01/metrics",
                           envelope("gilgit-sco-01", "gw01", 1, ups_samples(3, time.time_ns())))
        wait_for(lambda: "retrying in" in proc.log_path.read_text(), 10, "a failing write")
        seen = len(receiver.with_key("WATCHDOG"))
        time.sleep(2.5)  # longer than the 1 s watchdog, all of it spent retrying the write
        pings = [t for t, _, f in receiver.with_key("WATCHDOG")]
        assert len(pings) - seen >= 4, proc.log_tail()
        assert max(b - a for a, b in zip(pings[seen:], pings[seen + 1:])) < 1.0
        assert "retrying in" in proc.log_path.read_text().splitlines()[-1] or proc.running
        proc.signal(signal.SIGTERM)
        receiver.wait("STOPPING")
        proc.proc.wait(timeout=30)
    finally:
        proc.stop()
        receiver.close()


# --- the units --------------------------------------------------------------------------------
def unit_lines(name: str) -> list[tuple[str, str]]:
    out = []
    for line in UNITS[name].read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def unit_value(name: str, key: str) -> list[str]:
    return [v for k, v in unit_lines(name) if k == key]


def unit_for_this_machine(name: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's console script (verify wants it to exist)."""
    text = UNITS[name].read_text()
    assert "ExecStart=/opt/hubwatch/venv/bin/" in text
    copy = tmp_path / UNITS[name].name
    copy.write_text(text.replace("ExecStart=/opt/hubwatch/venv/bin/", f"ExecStart={VENV_BIN}/"))
    return copy


@pytest.mark.parametrize("name", ["agent", "collector"])
def test_unit_runs_the_program_as_a_watched_notify_service(name):
    assert unit_value(name, "Type") == ["notify"]
    assert unit_value(name, "ExecStart") == [
        f"/opt/hubwatch/venv/bin/hubwatch-{name} -c /etc/hubwatch/{name}.yaml"]
    assert unit_value(name, "Restart") == ["always"]
    assert unit_value(name, "WatchdogSec") and unit_value(name, "RestartSec")
    assert unit_value(name, "User") == ["hubwatch"] and unit_value(name, "Group") == ["hubwatch"]
    assert unit_value(name, "StateDirectory") == ["hubwatch"]
    assert unit_value(name, "ConfigurationDirectory") == ["hubwatch"]
    after = " ".join(unit_value(name, "After")).split()
    assert "network.target" in after
    # the programs cope with no network and an unsynchronised clock: never wait for them
    assert not {"network-online.target", "time-sync.target"} & set(after + " ".join(
        unit_value(name, "Wants") + unit_value(name, "Requires")).split())
    assert unit_value(name, "CapabilityBoundingSet") == [""]
    assert unit_value(name, "NoNewPrivileges") == ["yes"]
    assert unit_value(name, "ProtectSystem") == ["strict"]


def test_agent_unit_can_read_the_clock_state():
    # ProtectClock= would deny even the read-only adjtimex the agent uses (systemd 252)
    assert unit_value("agent", "ProtectClock") == []
    allowed = " ".join(unit_value("agent", "SystemCallFilter")).split()
    assert "clock_adjtime" in allowed and "adjtimex" in allowed
    assert unit_value("collector", "ProtectClock") == ["yes"]


def require_systemd_analyze() -> None:
    if not SYSTEMD_ANALYZE:
        pytest.fail("systemd-analyze is not installed (Debian package systemd): `make test` installs it")


def test_systemd_analyze_verify_passes(tmp_path):
    require_systemd_analyze()
    units = [str(unit_for_this_machine(name, tmp_path)) for name in UNITS]
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hubwatch" not in result.stderr, result.stderr  # no warning about our units either


@pytest.mark.parametrize("name", ["agent", "collector"])
def test_systemd_analyze_security_exposure(name, tmp_path):
    require_systemd_analyze()
    unit = unit_for_this_machine(name, tmp_path)
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))
    print(f"{unit.name}: exposure {score}")
    assert score <= MAX_EXPOSURE[name], result.stdout


# --- the system call filters against what the programs really call -----------------------------
def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not line[0].isspace():
            current = groups.setdefault(entry, [])
        elif current is not None:
            current.append(entry)
    return groups


def allowed_syscalls(name: str) -> set[str]:
    """The unit's effective allow list: its SystemCallFilter= lines applied in order."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(member) for member in groups[item])) if groups[item] else set()

    allowed: set[str] = set()
    for i, value in enumerate(unit_value(name, "SystemCallFilter")):
        deny = value.startswith("~")
        items = set().union(*(expand(item) for item in value.lstrip("~").split()))
        assert i > 0 or not deny, "the first SystemCallFilter= line should be an allow list"
        allowed = allowed - items if deny else allowed | items
    return allowed


@pytest.fixture
def trace_dir():
    """A work directory the traced program can write as an unprivileged user.

    The units run as the unprivileged hubwatch user, and some libraries act differently for
    root (SQLite chowns the files it creates), so as root the program is traced as nobody.
    """
    path = Path(tempfile.mkdtemp(prefix="hubwatch-trace-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def traced(argv: list[str], workdir: Path, *, run_for: float | None = None) -> set[str]:
    """Run argv under ``strace -f -c``; with ``run_for``, SIGTERM it after that long. The calls made."""
    out = workdir / "strace.txt"
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [STRACE, "-f", "-qq", "-c", "-U", "name,calls", *as_user, "-o", str(out), "--", *argv]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run_for is not None:
        time.sleep(run_for)
        # signal the traced program itself (strace would detach on a signal of its own)
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = set()
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            calls.add(parts[0])
    assert calls, out.read_text()
    return calls


@pytest.fixture
def needs_tracing():
    """systemd-analyze and strace are installed by `make test` (Debian systemd, strace)."""
    require_systemd_analyze()
    if not STRACE:
        pytest.fail("strace is not installed (Debian package strace): `make test` installs it")


def agent_config(tmp_path: Path, broker_url: str = "mqtt://127.0.0.1:9") -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
hub: gilgit-sco-01
host: gw01
interval: 1s
mqtt: {{url: "{broker_url}"}}
buffer: {{path: {tmp_path}/outbox.db, batch_max_age: 0s}}  # publish every cycle: the whole path runs
probes:
  system: {{}}
  network: {{interfaces: ["eth*", "en*", "wl*", lo]}}
  ping: {{targets: {{loopback: 127.0.0.1}}, count: 1, timeout: 0.3s}}
  nut: [{{name: hubups, host: 127.0.0.1, port: {free_port()}}}]
  battery: {{}}
""")
    return cfg


@pytest.mark.usefixtures("needs_tracing")
def test_agent_probes_make_only_calls_the_unit_allows(trace_dir):
    calls = traced([str(VENV_BIN / "hubwatch-agent"), "--once", "-c", str(agent_config(trace_dir))], trace_dir)
    assert "clock_adjtime" in calls or "adjtimex" in calls  # the clock state is really read
    assert calls - allowed_syscalls("agent") == set()


@pytest.mark.usefixtures("needs_tracing")
@pytest.mark.services
def test_agent_run_loop_makes_only_calls_the_unit_allows(trace_dir, mosquitto):
    calls = traced([str(VENV_BIN / "hubwatch-agent"), "-c", str(agent_config(trace_dir, mosquitto.url))],
                   trace_dir, run_for=4.0)
    assert (trace_dir / "outbox.db").stat().st_size > 0  # the loop ran: samples were committed
    assert {"fsync", "fdatasync"} & calls or "pwrite64" in calls
    assert calls - allowed_syscalls("agent") == set()


@pytest.mark.usefixtures("needs_tracing")
@pytest.mark.services
def test_collector_makes_only_calls_the_unit_allows(trace_dir, mosquitto, influx):
    config = write_collector_config(trace_dir / "collector.yaml", mosquitto, influx)

    def publish_soon():
        time.sleep(2.0)
        with mosquitto.client() as client:
            client.publish("hubwatch/v1/gilgit-sco-01/gw01/metrics",
                           envelope("gilgit-sco-01", "gw01", 1, ups_samples(10, time.time_ns())))
    feeder = threading.Thread(target=publish_soon)
    feeder.start()
    calls = traced(collector_command(config), trace_dir, run_for=4.0)
    feeder.join()
    assert count_points(influx, "hubwatch", "ups") == 10  # it ran the whole path: MQTT to InfluxDB
    assert calls - allowed_syscalls("collector") == set()
