"""``hubwatch-demo`` as a user runs it: the real command, as its own process, end to end.

The demo starts its own broker, InfluxDB, NUT server, collector and agents (the launchers in
tests/services/), so these tests need only what ``make test`` installs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.services

#: The programs the demo starts; a leftover one would show up under one of these names.
PROGRAMS = ("mosquitto", "influxd", "upsd", "dummy-ups", "hubwatch-")


def demo_command() -> list[str]:
    exe = Path(sys.executable).parent / "hubwatch-demo"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "collector.demo"]


def command_line(pid: int) -> str | None:
    """The process's command line, or None once it is gone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2] == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None


def still_running(pids: list[int], workdir: str) -> list[str]:
    """Those of the demo's pids still alive as one of its programs (a reused pid is not)."""
    left = []
    for pid in pids:
        cmd = command_line(pid)
        if cmd is not None and (workdir in cmd or any(p in cmd for p in PROGRAMS)):
            left.append(f"{pid}: {cmd}")
    return left


def mentioning(workdir: str) -> list[str]:
    """Every live process whose command line or environment names the demo's directory: each
    program the demo starts gets its config, data or state (NUT_STATEPATH) from there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or command_line(int(entry.name)) is None:
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if workdir.encode() in text:
            found.append(f"{entry.name}: {command_line(int(entry.name))}")
    return found


def test_demo_completes_and_reports_the_power_outage_uplink_outage_and_battery_alert(tmp_path):
    html = tmp_path / "report.html"
    started = time.monotonic()
    done = subprocess.run(demo_command() + ["--html", str(html)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-6000:]}\n{done.stderr[-4000:]}"
    assert took < 180, f"the demo took {took:.0f}s"

    # the text report itself
    report = out[out.index("=== Outage report"):out.index("HTML report:")]
    assert re.search(r"^skardu-01: [1-9]\d* outages", report, re.M), report
    assert re.search(r"^\s+power\s+gw01/hubups\s.*\smains_failure$", report.split("skardu-01:")[1].split("\n\n")[0],
                     re.M), report
    gilgit = report.split("gilgit-sco-01:")[1].split("\n\n")[0]
    assert re.search(r"^\s+hub_dark\s+gw01\s.*\suplink$", gilgit, re.M), gilgit
    assert re.search(r"^\s+uplink\s+gw01\s.*\sinternet_unreachable$", gilgit, re.M), gilgit
    hunza = report.split("hunza-01:")[1].split("\n\n")[0]
    assert re.search(r"^\s+power\s+gw01/hubups\s.*\smains_failure$", hunza, re.M), hunza

    # the battery alert, as the webhook received it, and the demo's own verdict
    assert re.search(r"webhook: FIRING\s+(runtime_low|battery_low)\s+critical\s+UPS hubups at hunza-01/gw01", out), out
    for what in ("power outage at skardu-01", "uplink outage at gilgit-sco-01", "battery alert at hunza-01"):
        assert re.search(rf"^\s+OK\s+{what}: ", out, re.M), out
    assert "MISSING" not in out

    # live status lines came while it played, one per hub
    assert re.search(r"^\s+gilgit-sco-01\s+OFFLINE\s", out, re.M), "no status line showed the hub cut off"
    assert re.search(r"^\s+skardu-01\s+online\s+BATTERY\s", out, re.M), "no status line showed the power cut"
    assert re.search(r"^\s+local\s+online\s+this machine", out, re.M)

    assert f"HTML report: {html}" in out
    text = html.read_text()
    assert "<html" in text.lower() and all(h in text for h in ("skardu-01", "gilgit-sco-01", "hunza-01"))
    workdir = re.search(r"^working directory: (\S+)$", out, re.M).group(1)
    assert not Path(workdir).exists(), "the temporary directory was left behind"
    pids = [int(p) for p in re.search(r"^pids: ([\d ]+)$", out, re.M).group(1).split()]
    assert len(pids) == 11 and not still_running(pids, workdir) and not mentioning(workdir)


def test_sigint_midway_stops_every_process_and_removes_the_temp_dir(tmp_path):
    """Also the demo of a fresh clone, with no real UPS dumps beside it: the built-in stand-in
    UPS goes on battery all the same."""
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        demo = subprocess.Popen(demo_command() + ["--ups-data", str(tmp_path / "no-dumps-here")], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        # midway: the power cut is on, a status line shows it, and every process is up
        on_battery = re.compile(r"^\s+skardu-01\s+online\s+BATTERY\s", re.M)
        while not on_battery.search(log.read_text()) and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert on_battery.search(text), text
        assert text.count("built-in stand-in UPS") == 3
        pids = [int(p) for p in re.search(r"^pids: ([\d ]+)$", text, re.M).group(1).split()]
        workdir = re.search(r"^working directory: (\S+)$", text, re.M).group(1)
        assert len(still_running(pids, workdir)) == len(pids) == 11  # all up
        demo.send_signal(signal.SIGINT)
        code = demo.wait(30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    text = log.read_text()
    assert code == 130, text
    assert "interrupted (SIGINT)" in text
    assert not still_running(pids, workdir), text
    assert not mentioning(workdir)
    assert not Path(workdir).exists()
    assert not (tmp_path / "hubwatch-demo-report.html").exists()


def test_sigterm_during_start_up_cleans_up_too(tmp_path):
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        demo = subprocess.Popen(demo_command(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "UPS hunza-ups" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        demo.send_signal(signal.SIGTERM)  # while the NUT server and its drivers are starting
        code = demo.wait(30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    text = log.read_text()
    assert code == 143, text
    workdir = re.search(r"^working directory: (\S+)$", text, re.M).group(1)
    pids = [int(p) for p in re.findall(r" pid (\d+)", text)]
    assert len(pids) >= 2 and not still_running(pids, workdir), text  # mosquitto and influxd were up
    assert not mentioning(workdir), text  # nor the NUT drivers and upsd being started
    assert not Path(workdir).exists()


def test_version_help_and_bad_usage():
    version = subprocess.run(demo_command() + ["--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and re.fullmatch(r"hubwatch-demo \d+\.\d+\.\d+\n", version.stdout)
    usage = subprocess.run(demo_command() + ["--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--keep" in usage.stdout and "make demo" in usage.stdout
    bad = subprocess.run(demo_command() + ["--speed", "fast"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
    # a report it could not write is said before anything starts, not after the whole run
    nowhere = subprocess.run(demo_command() + ["--html", "/proc/demo.html"], capture_output=True, text=True,
                             timeout=30)
    assert nowhere.returncode == 2 and "cannot write the HTML report in /proc" in nowhere.stderr
    assert "working directory" not in nowhere.stdout


def test_a_missing_program_is_named_with_its_debian_package():
    from collector.demo import missing_programs
    from tests.services import influx, mosquitto, nut

    here = SimpleNamespace(mosquitto=mosquitto, influx=influx, nut=nut)
    assert missing_programs(here) == []  # make test installed them all
    gone = SimpleNamespace(mosquitto=SimpleNamespace(MOSQUITTO="/nonexistent/mosquitto"), influx=influx,
                           nut=SimpleNamespace(UPSD=nut.UPSD, DUMMY_UPS=Path("/nonexistent/dummy-ups"), UPSC=nut.UPSC))
    assert missing_programs(gone) == ["/nonexistent/mosquitto (Debian package mosquitto)",
                                      "/nonexistent/dummy-ups (Debian package nut-server)"]


def test_outside_a_source_checkout_it_says_to_use_make_demo(tmp_path):
    """An installed copy of the module with no tests/services beside it exits 2 and says why."""
    package = tmp_path / "site" / "collector"
    package.mkdir(parents=True)
    source = Path(__file__).resolve().parent.parent / "collector"
    (package / "__init__.py").write_text((source / "__init__.py").read_text())
    (package / "demo.py").write_text((source / "demo.py").read_text())
    done = subprocess.run([sys.executable, "-c", "import sys; from collector.demo import main; sys.exit(main([]))"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "run hubwatch-demo from a hubwatch source checkout (make demo)" in done.stderr
    assert "Traceback" not in done.stderr
