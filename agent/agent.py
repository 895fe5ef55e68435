"""The agent's run loop: probes -> outbox -> publisher, until told to stop.

One thread owns the outbox and all decisions. Probes run on worker threads (a slow one never
holds the loop); paho's network thread only queues events. Each pass of the loop:

- every ``interval``: run the probes; commit their samples, the UPS sample read for that
  cycle, and one ``agent`` point on the outbox and delivery, in one transaction (``metrics``):
  one cycle, one commit, one message when sent per cycle;
- every ``ups_poll`` (default 2 s): read the UPS probes. A change of on line / on battery /
  low battery / replace battery is committed on ``events`` and sent at once, ahead of any
  backlog; while on battery every poll's UPS sample goes on ``events``. At the interval the
  UPS sample joins the other metrics (unless it just went out as an event);
- pack pending metrics into messages when they can be sent (connected, and the sender's
  window has room; only while the clock is trusted); otherwise only full batches
  (``batch_max_samples`` / ``batch_max_bytes``), so a backlog built during an outage leaves in
  full batches and stays compact on disk; send what the window allows; apply PUBACKs, and
  the collector's acks waiting together in one outbox transaction.

SIGTERM: pack what is left, send for up to ``publish.flush_timeout`` seconds, publish the
retained ``stopped`` status, close the outbox. Nothing committed is lost either way: what
did not leave waits in the outbox for the next start.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

from agent import sdnotify
from agent.clock import Clock, ClockGuard, Reading, SystemClock
from agent.config import AgentConfig
from agent.outbox import PACK_MESSAGES_PER_CALL, Outbox, OutboxError, is_corruption
from agent.probes import ProbeContext
from agent.publisher import AckReceived, Backoff, MqttSession, Sender
from agent.runner import ProbeRunner
from agent.wire import Sample

log = logging.getLogger("hubwatch.agent")

UPS_PROBES = ("nut", "snmp_ups")
#: The UPS fields whose change is a power event.
POWER_FLAGS = ("on_line", "on_battery", "low_battery", "replace_battery")


class _Wake:
    """Put on the event queue to end the loop's wait early (a probe finished, stop requested)."""


class _Background:
    """One ProbeRunner cycle at a time on its own thread; the loop collects the result when done."""

    def __init__(self, runner: ProbeRunner, wake: Callable[[], None]):
        self.runner = runner
        self._wake = wake
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cycle")
        self._future: Future[list[Sample]] | None = None
        self.tag: Any = None

    @property
    def busy(self) -> bool:
        return self._future is not None

    def start(self, tag: Any = None) -> None:
        if self._future is None:
            self.tag = tag
            self._future = self._pool.submit(self.runner.run_once)
            self._future.add_done_callback(lambda _: self._wake())

    def result(self) -> list[Sample] | None:
        if self._future is None or not self._future.done():
            return None
        future, self._future = self._future, None
        try:
            return future.result()
        except Exception as exc:  # run_once reports probe failures itself; this is a bug
            log.exception("probe cycle failed: %s", exc)
            return []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runner.close()


class Agent:
    """``Agent(config).run(stop)``; ``clock`` is the seam for tests (see agent.clock)."""

    def __init__(self, config: AgentConfig, clock: Clock | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        buf = config.buffer
        self.outbox = Outbox(buf.path, config.hub, config.host, max_mb=buf.max_mb,
                             batch_max_samples=buf.batch_max_samples, batch_max_bytes=buf.batch_max_bytes,
                             batch_max_age_s=buf.batch_max_age)
        seen_synced, offset = self.outbox.clock_state(self.clock.boot_id())
        self.guard = ClockGuard(self.clock, config.clock.require_sync, config.clock.max_step,
                                config.clock.settle, seen_synced, offset)
        # SimpleQueue: put() is safe from a signal handler (request_stop) and from paho's thread.
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        mqtt = config.mqtt
        self.session = MqttSession(mqtt, config.hub, config.host, self.events, window=config.publish.window,
                                   session_expiry_s=int(mqtt.session_expiry),
                                   backoff=Backoff(mqtt.reconnect_min, mqtt.reconnect_max, mqtt.auth_retry))
        self.sender = Sender(self.outbox, self.session, window=config.publish.window,
                             max_unconfirmed=config.publish.max_unconfirmed, resend_after=buf.resend_after)
        context = ProbeContext(outbox_path=buf.path, timeout=config.probe_timeout, clock_ns=self.clock.wall_ns)
        wake = lambda: self.events.put(_Wake())  # noqa: E731
        main = replace(config, probes=tuple(p for p in config.probes if p.name not in UPS_PROBES))
        ups = replace(config, probes=tuple(p for p in config.probes if p.name in UPS_PROBES))
        self.cycle = _Background(ProbeRunner(main, context), wake) if main.probes else None
        self.ups = _Background(ProbeRunner(ups, context), wake) if ups.probes else None
        self.ups_state: dict[tuple[str | None, str | None], tuple] = {}
        self._stop = threading.Event()
        self._reading: Reading | None = None
        self._pack_wanted = True
        self._cycle_due_for_ups = False
        # A cycle is committed once both its parts are in: the other probes' samples (held
        # here when they finish first) and the UPS read started with it.
        self._cycle_held: list[Sample] | None = None
        self._cycle_ups: list[Sample] = []
        self._ups_outstanding = False
        self._heartbeat = sdnotify.Heartbeat()

    # --- control --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Safe from a signal handler: ends the loop at its next step."""
        self._stop.set()
        self.events.put(_Wake())

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self._stop
        names = (self.cycle.runner.names if self.cycle else []) + (self.ups.runner.names if self.ups else [])
        log.info("agent started: hub=%s host=%s interval=%gs ups_poll=%gs probes=%s outbox=%s",
                 self.config.hub, self.config.host, self.config.interval, self.config.ups_poll,
                 ",".join(names), self.config.buffer.path)
        for q in self.outbox.quarantined:
            log.error("this start set a corrupt outbox aside: %s (%d samples recovered, %s lost)",
                      q.moved_to, q.recovered, "an unknown number" if q.lost is None else q.lost)
        self.session.start()
        # Ready once the outbox is open: the agent measures and buffers with or without a broker.
        sdnotify.ready(f"hub={self.config.hub} host={self.config.host}: measuring every {self.config.interval:g}s")
        now = time.monotonic()
        next_cycle = next_poll = now
        try:
            while not stop.is_set() and not self._stop.is_set():
                self._heartbeat.beat()
                now = time.monotonic()
                if now >= next_cycle:
                    if self.cycle is None or not self.cycle.busy:
                        if self._cycle_held is not None:  # its UPS read never came: wait no longer
                            self._guarded(self._commit_cycle)
                        if self.cycle is not None:
                            self.cycle.start()
                        else:
                            self._cycle_held = []
                        self._cycle_due_for_ups = True
                        self._ups_outstanding = self.ups is not None
                        if not self._ups_outstanding and self.cycle is None:
                            self._guarded(self._commit_cycle)
                        next_poll = now
                    next_cycle = max(next_cycle + self.config.interval, now + self.config.interval / 2)
                if self.ups is not None and now >= next_poll and not self.ups.busy:
                    self.ups.start(tag=self._cycle_due_for_ups)
                    self._cycle_due_for_ups = False
                    next_poll = now + self.config.ups_poll
                if self.cycle is not None and (samples := self.cycle.result()) is not None:
                    self._guarded(self._record_cycle, samples)
                if self.ups is not None:
                    tag = self.ups.tag
                    if (samples := self.ups.result()) is not None:
                        self._guarded(self._record_ups, samples, bool(tag))
                busy = self._guarded(self._pack_and_send)
                deadline = min(next_cycle, next_poll if self.ups is not None else next_cycle, now + 0.5)
                self._drain_events(0 if busy else max(0.0, deadline - time.monotonic()))
        finally:
            self._shutdown()

    # --- the steps ----------------------------------------------------------------------------
    def _read_clock(self) -> Reading:
        self._reading = self.guard.read()
        return self._reading

    def _record_cycle(self, samples: list[Sample]) -> None:
        self._cycle_held = list(samples)
        if not self._ups_outstanding:
            self._commit_cycle()

    def _commit_cycle(self) -> None:
        """Commit the cycle's samples, its UPS read and the ``agent`` point in one transaction."""
        samples = (self._cycle_held or []) + self._cycle_ups
        self._cycle_held, self._cycle_ups = None, []
        reading = self._read_clock()
        errors = sum(1 for s in samples if s.measurement == "agent" and "probe" in s.tags)
        if errors:
            self.outbox.count("probe_errors_total", errors)
        self._add(samples + [self._agent_sample(reading)], reading, "metrics")
        self._pack_wanted = True

    def _record_ups(self, samples: list[Sample], for_cycle: bool) -> None:
        events, metrics = [], []
        for sample in samples:
            if sample.measurement != "ups":
                if for_cycle:
                    metrics.append(sample)  # a UPS probe's error point: once an interval is enough
                continue
            key = (sample.tags.get("ups"), sample.tags.get("source"))
            flags = tuple(sample.fields.get(f) for f in POWER_FLAGS)
            previous = self.ups_state.get(key)
            self.ups_state[key] = flags
            changed = previous is not None and previous != flags
            if changed:
                log.info("UPS %s: power status changed to %s", key[0], sample.fields.get("status"))
            if changed or sample.fields.get("on_battery") is True:
                events.append(sample)
            elif for_cycle:
                metrics.append(sample)
        if events:
            reading = self._read_clock()
            self._add(events, reading, "events")
            self._pack(reading)
            self.sender.pump()
        if for_cycle:
            self._cycle_ups += metrics
            self._ups_outstanding = False
            if self._cycle_held is not None:
                self._commit_cycle()

    def _add(self, samples: list[Sample], reading: Reading, kind: str) -> int:
        """Commit samples; a write the disk refuses (full, read-only) drops them, counted."""
        try:
            n = self.outbox.add(samples, reading, kind, seen_synced=self.guard.seen_synced)
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise
            log.error("could not store %d samples in the outbox (%s); they are dropped and counted", len(samples), exc)
            self.outbox.count("dropped_samples_total", len(samples))
            return 0
        self._log_committed(n)
        return n

    def _log_committed(self, n: int) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("committed %d samples, through id %d", n, self.outbox.last_row_id())

    def _agent_sample(self, reading: Reading) -> Sample:
        stats = self.outbox.stats()
        fields: dict[str, Any] = {
            "outbox_samples": float(stats.samples),
            "outbox_messages": float(stats.messages),
            "outbox_bytes": float(stats.file_bytes),
            "mqtt_connected": self.session.connected,
            "clock_trusted": reading.trusted,
        }
        if stats.oldest_t_ns is not None:
            fields["outbox_oldest_age_seconds"] = round(max(0.0, (reading.wall_ns - stats.oldest_t_ns) / 1e9), 3)
        fields.update(stats.counters)
        return Sample("agent", reading.wall_ns, {"hub": self.config.hub, "host": self.config.host}, fields)

    def _pack(self, reading: Reading, force: bool = False) -> list[tuple[int, str]]:
        """Pack events always, metrics when the sender can take them; while it cannot (link down,
        window full) only full batches, so an outage's backlog leaves in full batches, not per cycle."""
        made = self.outbox.pack(reading, force=force, seen_synced=self.guard.seen_synced,
                                metrics=self.sender.has_room)
        self.sender.add_priority([seq for seq, kind in made if kind == "events"])
        return made

    def _pack_and_send(self) -> bool:
        """Pack and send; True when there is more to do at once (a big backlog being packed)."""
        more = False
        if self._pack_wanted:
            made = self._pack(self._read_clock())
            more = len(made) >= PACK_MESSAGES_PER_CALL
            # Held (clock untrusted) or not yet due: look again at the next pass of the loop.
            self._pack_wanted = more or self.outbox.has_pending()
        self.sender.pump()
        return more

    def _drain_events(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        acks: list[AckReceived] = []
        while True:
            if isinstance(event, AckReceived):
                acks.append(event)  # applied together below, after the PUBACKs that came with them
            elif not isinstance(event, _Wake):
                self._guarded(self.sender.handle, event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
        if acks:
            self._guarded(self._apply_acks, acks)

    def _apply_acks(self, acks: list[AckReceived]) -> None:
        acked = self.sender.handle_acks(acks)
        if acked:
            log.debug("collector confirmed seqs %d..%d (%d messages)", min(acked), max(acked), len(acked))

    def _guarded(self, step: Callable[..., Any], *args: Any) -> Any:
        """Run a step; an outbox that breaks at run time is reopened (and set aside if corrupt)."""
        try:
            return step(*args)
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                log.error("outbox failed while running (%s); reopening it", exc)
                try:
                    self.outbox.reopen()
                except OutboxError as again:
                    log.error("cannot reopen the outbox: %s", again)
                    raise
                self.sender.reset()
            else:
                log.error("outbox error (%s); will retry", exc)
            return False

    def _shutdown(self) -> None:
        sdnotify.stopping("sending what is left, then stopping")
        log.info("stopping: sending what is left for up to %gs", self.config.publish.flush_timeout)
        try:
            if self._cycle_held is not None or self._cycle_ups:
                self._commit_cycle()
            reading = self._read_clock()
            deadline = time.monotonic() + self.config.publish.flush_timeout
            while True:
                made = self._pack(reading, force=True)
                if len(made) < PACK_MESSAGES_PER_CALL or time.monotonic() > deadline:
                    break
            while self.session.connected and time.monotonic() < deadline:
                self.sender.pump()
                if self.sender.idle:
                    break
                self._drain_events(0.05)
        except sqlite3.Error as exc:
            log.error("outbox error while stopping: %s", exc)
        finally:
            self.session.stop(timeout=2.0)
            for background in (self.cycle, self.ups):
                if background is not None:
                    background.close()
            stats = None
            try:
                stats = self.outbox.stats()
            except sqlite3.Error:
                pass
            self.outbox.close()
            if stats is not None:
                log.info("agent stopped; %d samples wait in the outbox for the next start", stats.samples)
            else:
                log.info("agent stopped")
