"""The real ``hubwatch-agent`` process on a real mosquitto: outages, kill -9, corrupt outboxes,
status, a 100,000-sample backlog, power events from a NUT dummy-ups, and a wrong clock.

The collector is played by tests/standin_collector.py (a stand-in that acks every seq at once);
the full pipeline with the real collector and InfluxDB is tested elsewhere.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import config as agent_config
from agent import wire
from agent.clock import Reading
from agent.outbox import Outbox, read_stats
from agent.wire import Sample
from tests.services.common import ServiceProcess
from tests.standin_collector import StandInCollector, sample_key

REPO = Path(__file__).resolve().parent.parent
HUB, HOST = "gilgit-sco-01", "gw01"
#: kill -9s of the agent at random moments. The issue asks 200 (about 50 s here); the default
#: keeps the whole delivery suite near a minute. HUBWATCH_TEST_KILLS=200 runs the full count.
KILLS = int(os.environ.get("HUBWATCH_TEST_KILLS", "100"))
BACKLOG = 100_000


def agent_command() -> list[str]:
    exe = Path(sys.executable).parent / "hubwatch-agent"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]


def write_config(tmp_path: Path, broker_url: str, *, interval: str = "0.1s", probes: str | None = None,
                 extra: str = "", keepalive: str = "5s", batch_max_age: str = "0s") -> Path:
    probes = probes or "  network: {interfaces: [\"*\"]}\n"
    path = tmp_path / "agent.yaml"
    path.write_text(f"""hub: {HUB}
host: {HOST}
interval: {interval}
mqtt:
  url: {broker_url}
  keepalive: {keepalive}
  reconnect_min: 0.1s
  reconnect_max: 0.5s
buffer:
  path: {tmp_path / 'outbox.db'}
  resend_after: 5s
  batch_max_age: {batch_max_age}
probes:
{probes}{extra}""")
    agent_config.load(path)  # the test's own config must be valid
    return path


class AgentProcess(ServiceProcess):
    def __init__(self, config: Path, workdir: Path, name: str = "agent"):
        super().__init__(name, agent_command() + ["-c", str(config), "--log-level", "debug"], workdir)

    def committed_through(self) -> int:
        """The last sample id the agent logged as committed (logged after COMMIT returned)."""
        ids = re.findall(r"committed \d+ samples, through id (\d+)", self.log_path.read_text(errors="replace"))
        return int(ids[-1]) if ids else 0

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        found: list[re.Match] = []

        def ready() -> bool:
            m = re.search(pattern, self.log_path.read_text(errors="replace"))
            if m:
                found.append(m)
            return m is not None
        self.wait_until(ready, timeout, f"logging {pattern!r}")
        return found[0]

    def terminate(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def ever_committed(db: Path) -> int:
    """Samples ever committed to the outbox: AUTOINCREMENT ids are never reused."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'pending'").fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


def assert_all_delivered(collector: StandInCollector, db: Path, timeout: float = 15.0) -> int:
    total = ever_committed(db)
    assert collector.wait_for(lambda c: len(c.samples) >= total, timeout), \
        f"{collector.distinct_samples()} of {total} committed samples arrived"
    assert collector.distinct_samples() == total
    seqs = sorted(collector.seqs[(HUB, HOST)])
    assert seqs == list(range(1, len(seqs) + 1)), "the seqs the collector saw have a gap"
    assert not collector.errors
    return total


def test_broker_down_with_kills_then_up_everything_arrives_once(tmp_path, mosquitto_factory, emitted):
    broker = mosquitto_factory()
    config = write_config(tmp_path, broker.url, probes="  system: {}\n  network: {interfaces: [lo]}\n")
    db = tmp_path / "outbox.db"
    rng = random.Random(4)
    # The stand-in has its persistent session on the broker before the outage, as a collector would.
    with StandInCollector(broker) as collector:
        broker.stop()
        for i in range(3):  # the broker is down: the agent is killed three times at random moments
            agent = AgentProcess(config, tmp_path, f"agent{i}").start()
            agent.wait_log(r"through id \d+")
            time.sleep(rng.uniform(0.1, 0.8))
            agent.kill()
        agent = AgentProcess(config, tmp_path, "agent-last").start()
        agent.wait_log(r"through id \d+")
        time.sleep(0.5)
        held = read_stats(db)
        assert held.samples > 20 and held.last_acked_seq is None
        # Nothing could be sent, so nothing was packed: the backlog leaves in full batches.
        assert held.messages == 0 and held.pending == held.samples
        down_until = time.time_ns()
        broker.start()
        agent.wait_log(r"connected to mqtt://")
        assert collector.wait_for(lambda c: len(c.samples) >= held.samples, 15)
        assert collector.wait_for(lambda c: any(s.fields.get("mqtt_connected") is True
                                                for s in c.by_key.values()), 10)
        assert agent.terminate() == 0
        total = assert_all_delivered(collector, db)
        samples = list(collector.by_key.values())
        backlog_messages = [e for _, e in collector.messages if min(s.time_ns for s in e.samples) < down_until]
    assert total >= held.samples
    assert len(backlog_messages) <= 2, [len(e.samples) for e in backlog_messages]
    emitted(samples)  # every field the agent sent agrees with the catalogue
    stats = [s for s in samples if s.measurement == "agent" and "probe" not in s.tags]
    assert any(s.fields["mqtt_connected"] is False for s in stats)
    assert any(s.fields["mqtt_connected"] is True for s in stats)


def test_kill_9_at_random_moments_never_loses_a_committed_sample(tmp_path, mosquitto):
    config = write_config(tmp_path, mosquitto.url, interval="0.1s")
    db = tmp_path / "outbox.db"
    rng = random.Random(20)
    started = time.monotonic()
    with StandInCollector(mosquitto) as collector:
        for i in range(KILLS):
            agent = AgentProcess(config, tmp_path, "agent").start()
            if i % 2:
                agent.wait_log(r"through id \d+", timeout=10)  # in the middle of heavy writing
                time.sleep(rng.uniform(0, 0.15))
            else:
                time.sleep(rng.uniform(0.05, 0.4))  # anywhere, start-up included
            agent.kill()
            logged = agent.committed_through()
            if db.exists():
                # read-only: the file is left exactly as the kill left it for the next start
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"kill {i}"
                finally:
                    conn.close()
                assert ever_committed(db) >= logged, f"kill {i}: a commit the agent logged is gone"
            log_text = agent.log_path.read_text()
            assert "corrupt" not in log_text and "Traceback" not in log_text, log_text
            agent.log_path.unlink()
        agent = AgentProcess(config, tmp_path, "agent").start()
        agent.wait_log(r"through id \d+")
        assert agent.terminate() == 0
        assert "corrupt" not in agent.log_path.read_text()
        total = assert_all_delivered(collector, db, timeout=20)
    assert total > KILLS * 5
    print(f"{KILLS} kills, {total} samples committed and delivered, {time.monotonic() - started:.1f}s")


def _outbox_with(path: Path, n: int) -> list[Sample]:
    taken = []
    now = time.time_ns()
    with Outbox(path, HUB, HOST, batch_max_samples=100) as outbox:
        reading = Reading(now, time.clock_gettime_ns(time.CLOCK_BOOTTIME), "b", True)
        for i in range(0, n, 100):
            batch = [Sample("net", now - 10**9 + i + j, {"hub": HUB, "host": HOST, "iface": f"x{j % 7}"},
                            {"rx_bytes_total": i + j}) for j in range(100)]
            outbox.add(batch, reading)
            taken += batch
            if i < n // 2:
                outbox.pack(reading, force=True)
    return taken


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_corrupt_outbox_is_set_aside_and_the_agent_keeps_collecting(tmp_path, mosquitto, damage):
    db = tmp_path / "outbox.db"
    taken = _outbox_with(db, 3000)
    if damage == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2)
    else:
        db.write_bytes(random.Random(3).randbytes(200_000))
    config = write_config(tmp_path, mosquitto.url)
    with StandInCollector(mosquitto) as collector:
        agent = AgentProcess(config, tmp_path).start()
        m = agent.wait_log(r"moved to (outbox\.db\.corrupt-\S+); recovered (\d+) samples, (\d+|an unknown number)")
        recovered = int(m.group(2))
        if damage == "truncated":
            assert recovered + int(m.group(3)) == len(taken)
        else:
            assert recovered == 0 and m.group(3) == "an unknown number"
        assert (tmp_path / m.group(1)).exists()
        # and it keeps collecting and delivering: new samples, and whatever was recovered
        assert collector.wait_for(lambda c: sum(1 for k in c.samples if k[0] == "agent") >= 3, 10)
        assert agent.running
        assert agent.terminate() == 0
        originals = {sample_key(s) for s in taken}
        assert collector.wait_for(lambda c: len(originals & set(c.samples)) == recovered, 10)
    assert agent.log_path.read_text().count("is corrupt") == 1


def test_status_online_stopped_offline_and_the_status_command(tmp_path, mosquitto):
    config = write_config(tmp_path, mosquitto.url, interval="0.5s", keepalive="5s")
    status_topic = wire.topic("hubwatch", HUB, HOST, "status")
    with StandInCollector(mosquitto) as collector:
        def statuses():
            with collector.lock:
                return [s for _, t, s in collector.statuses if t == status_topic]

        agent = AgentProcess(config, tmp_path).start()
        assert collector.wait_for(lambda c: statuses()[-1:] == ["online"], 10)
        agent.wait_log(r"through id \d+")
        import subprocess
        shown = subprocess.run(agent_command() + ["--status", "-c", str(config)], capture_output=True, text=True,
                               timeout=20)
        assert shown.returncode == 0, shown.stderr
        for label in ("samples waiting:", "oldest sample:", "size:", "dropped at the cap:   0",
                      "last acknowledged seq:"):
            assert label in shown.stdout
        assert agent.terminate() == 0
        assert collector.wait_for(lambda c: statuses()[-1:] == ["stopped"], 5), statuses()

        agent = AgentProcess(config, tmp_path, "agent2").start()
        assert collector.wait_for(lambda c: statuses()[-1:] == ["online"], 10)
        killed_at = time.monotonic()
        agent.kill()
        assert collector.wait_for(lambda c: statuses()[-1:] == ["offline"], 7.5), statuses()
        with collector.lock:
            offline_at = [at for at, t, s in collector.statuses if s == "offline"][-1]
    assert offline_at - killed_at <= 1.5 * 5
    assert statuses() == ["online", "stopped", "online", "offline"]


def test_a_backlog_of_100000_samples_drains_with_no_publish_lost(tmp_path, mosquitto):
    db = tmp_path / "outbox.db"
    now = time.time_ns()
    with Outbox(db, HUB, HOST) as outbox:
        reading = Reading(now, time.clock_gettime_ns(time.CLOCK_BOOTTIME), "b", True)
        for i in range(0, BACKLOG, 1000):
            outbox.add([Sample("net", now - 86400 * 10**9 + (i + j) * 10**6,
                               {"hub": HUB, "host": HOST, "iface": f"eth{j % 3}"},
                               {"rx_bytes_total": i + j, "tx_bytes_total": 7 * (i + j), "link_up": True})
                        for j in range(1000)], reading)
    config = write_config(tmp_path, mosquitto.url, interval="10s", probes="  network: {interfaces: [lo]}\n")
    with StandInCollector(mosquitto) as collector:
        started = time.monotonic()
        agent = AgentProcess(config, tmp_path).start()
        assert collector.wait_for(lambda c: len(c.samples) >= BACKLOG, 60)
        drained = time.monotonic() - started
        assert agent.terminate() == 0
        total = assert_all_delivered(collector, db)
    stats = read_stats(db)
    assert stats.counters["publish_errors_total"] == 0 and stats.counters["publish_rejected_total"] == 0
    assert stats.counters["messages_published_total"] >= BACKLOG // 1000
    assert total >= BACKLOG
    print(f"{BACKLOG} queued samples drained in {drained:.1f}s ({BACKLOG / drained:.0f} samples/s, "
          "agent start-up included)")


def test_a_power_event_goes_out_at_once_not_at_the_next_interval(tmp_path, mosquitto, nut_server, emitted):
    ups = nut_server({"hubups": {"ups.status": "OL CHRG", "battery.charge": "97", "battery.runtime": "1800",
                                 "ups.load": "20"}})
    probes = f"  nut: [{{name: hubups, host: 127.0.0.1, port: {ups.port}}}]\n  network: {{interfaces: [lo]}}\n"
    config = write_config(tmp_path, mosquitto.url, interval="60s", probes=probes, extra="ups_poll: 0.5s\n")
    with StandInCollector(mosquitto) as collector:
        def events():
            with collector.lock:
                return [(at, e) for at, kind, e in collector.arrivals if kind == "events"]

        agent = AgentProcess(config, tmp_path).start()
        assert collector.wait_for(lambda c: any(k == "metrics" for _, k, _ in c.arrivals), 10)
        time.sleep(1.0)
        assert events() == []  # on line: nothing on the fast path
        changed_at = time.monotonic()
        ups.set_vars("hubups", {"ups.status": "OB DISCHRG", "battery.charge": "95"})
        assert collector.wait_for(lambda c: len(events()) >= 3, 10)  # the change, then every poll
        first_at, first = events()[0]
        assert first_at - changed_at < 3.0  # the interval is 60 s
        [ups_sample] = [s for s in first.samples if s.measurement == "ups"]
        assert ups_sample.fields["on_battery"] is True and ups_sample.fields["status"] == "OB DISCHRG"
        ups.set_vars("hubups", {"ups.status": "OL CHRG"})
        assert collector.wait_for(lambda c: any(s.fields.get("on_line") is True
                                                for _, e in events() for s in e.samples), 10)
        n = len(events())
        time.sleep(1.5)
        assert len(events()) == n  # back on line: the fast path is quiet again
        assert agent.terminate() == 0
        with collector.lock:
            emitted([s for _, e in collector.messages for s in e.samples])


def test_the_ups_sample_travels_with_its_cycle_in_one_message(tmp_path, mosquitto, nut_server):
    ups = nut_server({"hubups": {"ups.status": "OL", "battery.charge": "100", "ups.load": "12"}})
    probes = f"  nut: [{{name: hubups, host: 127.0.0.1, port: {ups.port}}}]\n  network: {{interfaces: [lo]}}\n"
    config = write_config(tmp_path, mosquitto.url, interval="0.5s", probes=probes)
    with StandInCollector(mosquitto) as collector:
        agent = AgentProcess(config, tmp_path).start()
        assert collector.wait_for(lambda c: len(c.messages) >= 6, 15)
        assert agent.terminate() == 0
        with collector.lock:
            messages = [e for kind, e in collector.messages if kind == "metrics"]
    for envelope in messages:
        names = sorted(s.measurement for s in envelope.samples if "probe" not in s.tags)
        # one cycle, one message: the UPS read beside the other probes' samples and the agent point
        assert names.count("ups") == names.count("agent") == names.count("net") >= 1, names


def test_acks_waiting_together_are_applied_in_one_transaction(tmp_path):
    from agent.agent import Agent
    from agent.publisher import AckReceived

    config = agent_config.load(write_config(tmp_path, "mqtt://127.0.0.1:9"))
    agent = Agent(config)
    try:
        reading = Reading(time.time_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME), "b", True)
        for i in range(40):
            agent.outbox.add([Sample("system", time.time_ns(), {"hub": HUB, "host": HOST}, {"load1": float(i)})],
                             reading)
            agent.outbox.pack(reading, force=True)
        for seq in range(1, 41):
            agent.events.put(AckReceived(wire.encode_ack([seq])))
        commits = []
        agent.outbox._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        agent._drain_events(0)
        assert agent.outbox.stats().messages == 0
        assert len(commits) == 1, "40 acks waiting together must cost one transaction (one fsync)"
    finally:
        agent.session.stop(timeout=0.5)
        agent.outbox.close()


class WrongClock:
    """The clock seam: the real boot-time clock, and a wall clock three days behind until corrected."""

    def __init__(self):
        self.offset_ns = -3 * 86400 * 10**9
        self.is_synced = False

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def boottime_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def synced(self):
        return self.is_synced

    def boot_id(self) -> str:
        return "clock-test-boot"


def test_a_clock_three_days_behind_then_corrected_delivers_every_sample_at_its_true_time(tmp_path, mosquitto):
    from agent.agent import Agent

    config = agent_config.load(write_config(
        tmp_path, mosquitto.url, interval="0.2s", probes="  network: {interfaces: [lo]}\n",
        extra="clock: {require_sync: true}\n"))
    clock = WrongClock()
    with StandInCollector(mosquitto) as collector:
        agent = Agent(config, clock=clock)
        started = time.time_ns()
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        time.sleep(1.5)
        assert collector.distinct_samples() == 0  # held: nothing goes out on a known-wrong clock
        corrected = time.time_ns()
        clock.offset_ns, clock.is_synced = 0, True  # NTP answers and steps the clock
        time.sleep(1.0)
        agent.request_stop()
        runner.join(10)
        finished = time.time_ns()
        with collector.lock:
            samples = list(collector.by_key.values())
    before = [s for s in samples if s.time_ns < corrected]
    assert len(before) >= 5, "the samples taken on the wrong clock must arrive too"
    for s in samples:
        assert started - 2 * 10**9 <= s.time_ns <= finished + 2 * 10**9, s
    assert collector.distinct_samples() == ever_committed(tmp_path / "outbox.db")
