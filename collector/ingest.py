"""MQTT -> InfluxDB ingest: acknowledge a message to the broker only once its points are stored.

Flow control: the collector announces an MQTT 5 Receive Maximum (``ingest.receive_maximum``),
but does not rely on the broker honouring it (mosquitto 2.0.11 does not under load). It holds
at most that many unacknowledged messages itself: when the writer falls behind (InfluxDB down
or slow), paho's network thread waits inside ``on_message`` and so stops taking messages off
the socket; the rest stays queued at the broker, in the persistent session. While it waits it
still sends what others queued (acks of written messages) and keepalive PINGs, so the broker
keeps the connection (see :meth:`Collector._hold_intake`). That wait is the one place a
network callback blocks, on purpose: it is the back-pressure.

Threads: paho's network thread only queues what arrives (or waits, as above); the main thread
validates and batches; two writer threads, each with its own connection to InfluxDB, write
batches, then acknowledge to the broker (in the order the messages came) and publish the
written ``seq``s back to each agent on its ``ack`` topic.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import sdnotify
from agent.wire import WireError, decode_raw, decode_status, encode_ack, parse_topic, subscription, topic
from collector.config import CollectorConfig
from collector.deadletter import DeadLetters
from collector.engine import Cluster, Engine, Poke
from collector.influx import InfluxRefused, InfluxUnavailable, make_writer
from collector.lineproto import format_line
from collector.validate import Converter, MessageRejected, check_envelope

log = logging.getLogger(__name__)

SUBSCRIBED_KINDS = ("metrics", "events", "status")
WRITERS = 2


@dataclass
class Incoming:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received_at: float


@dataclass
class Batch:
    lines: list[str] = field(default_factory=list)
    messages: list[Incoming] = field(default_factory=list)
    acks: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    started: float = 0.0
    newest_ns: int = 0
    pokes: dict[str, Poke] = field(default_factory=dict)
    turn: int = 0  # its place in the order of acknowledgements

    def poke(self, hub: str, since_ns: int | None = None, urgent: bool = False, online_only: bool = False) -> None:
        """Tell the hub's leader to look at this hub once the batch is stored."""
        current = self.pokes.get(hub)
        if current is None:
            self.pokes[hub] = Poke(hub, since_ns, urgent, online_only)
            return
        current.urgent = current.urgent or urgent
        current.online_only = current.online_only and online_only
        if since_ns is not None and (current.since_ns is None or since_ns < current.since_ns):
            current.since_ns = since_ns

    def __len__(self) -> int:
        return len(self.lines)


class Stats:
    """Counters for the ``hubwatch_collector`` measurement (thread-safe enough: one writer)."""

    def __init__(self) -> None:
        self.received = 0
        self.written = 0
        self.rejected: Counter[str] = Counter()
        self.write_seconds = 0.0
        self.writes = 0
        self.last_batch = 0
        self.lag_seconds: float | None = None
        self.seq_gaps = 0
        self.write_failures = 0


def _queue_ping(client: mqtt.Client) -> None:
    """Queue a PINGREQ for the broker without arming paho's own wait for its PINGRESP
    (``_send_pingreq`` would: the answer sits behind unread messages, and paho would then
    give up on the connection as soon as its loop resumes). Uses paho-mqtt 2.x's internal
    ``_packet_queue``; without it, no ping: at worst the broker drops the connection and the
    unacknowledged messages are redelivered after the reconnection."""
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is not None:
        queue_packet(mqtt.PINGREQ, bytearray([mqtt.PINGREQ, 0]), 0, 0)


class Collector:
    def __init__(self, config: CollectorConfig):
        self.config = config
        self.stats = Stats()
        self._inbox: queue.Queue[Incoming] = queue.Queue()
        self._stop = threading.Event()
        self._generation = 0
        self._connected = threading.Event()
        self._fatal: str | None = None
        # Two writers, each with its own connection: InfluxDB parses one batch while the next
        # is compressed and sent, instead of each batch waiting for the previous round trip.
        self._writers = [make_writer(config.influxdb) for _ in range(WRITERS)]
        self._stats_lock = threading.Lock()
        self._turns = 0  # batches handed to the writers
        self._acked_turns = 0  # batches acknowledged, in the order they were handed over
        self._turn_changed = threading.Condition()
        self._ack_infos: dict[int, list] = {}
        self._dead = DeadLetters(config.dead_letter.path, config.dead_letter.max_mb)
        self._highest_seq: dict[tuple[str, str], int] = {}
        self._converter = Converter()
        self._pending: queue.Queue[Batch | None] = queue.Queue(maxsize=2)
        # messages taken off the socket and not yet finished (written, or given up on stop)
        self._held = 0
        self._held_changed = threading.Condition()
        self._writer_threads = [threading.Thread(target=self._write_loop, args=(w,), name=f"writer-{i}", daemon=True)
                                for i, w in enumerate(self._writers, 1)]
        self._control_prefixes = (f"{config.mqtt.topic_prefix}/collectors/", f"{config.alerts.topic}/")
        self._boots: dict[tuple[str, str], float] = {}
        self.cluster = Cluster(config.instance, config.mqtt.topic_prefix)
        self._client = self._make_client()
        self.engine = Engine(config, self._client, self.cluster)
        self._heartbeat = sdnotify.Heartbeat()  # systemd's WatchdogSec=, when set

    # --- MQTT ------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.config.mqtt
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.config.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password.reveal() if cfg.password else None)
        if cfg.tls:
            client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                           certfile=str(cfg.cert_file) if cfg.cert_file else None,
                           keyfile=str(cfg.key_file) if cfg.key_file else None)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.will_set(self.cluster.my_topic, b"", qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(100)
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(self.config.ingest.session_expiry)
        props.ReceiveMaximum = self.config.ingest.receive_maximum
        return props

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the collector's connection: %s", reason_code)
            if reason_code.value in (134, 135):  # bad user name or password / not authorized
                self._fatal = f"broker refused the credentials ({reason_code})"
            return
        self._generation += 1
        prefix = self.config.mqtt.topic_prefix
        subs = [(f"$share/{self.config.share_group}/{subscription(prefix, kind)}", 1) for kind in SUBSCRIBED_KINDS]
        subs += [(f"{self.cluster.members_topic}/+", 1), (self.cluster.poke_topic, 1),
                 (f"{self.config.alerts.topic}/#", 1)]
        client.subscribe(subs)
        client.publish(self.cluster.my_topic, json.dumps({"instance": self.config.instance,
                                                          "since": time.time()}).encode(), qos=1, retain=True)
        log.info("connected to %s:%d (session %s), subscribed in share group %s",
                 self.config.mqtt.host, self.config.mqtt.port,
                 "resumed" if flags.session_present else "new", self.config.share_group)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        name = message.topic
        if name.startswith(self._control_prefixes):  # coordination: handled here, acked at once
            try:
                if name.startswith(self.cluster.members_topic + "/"):
                    self.cluster.on_member(name, message.payload)
                elif name == self.cluster.poke_topic:
                    self.engine.poke(Poke.from_bytes(message.payload))
                else:
                    self.engine.on_alert_state(name, message.payload)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable message on %s: %s", name, exc)
            if message.qos:
                client.ack(message.mid, message.qos)
            return
        self._hold_intake(client)
        self._inbox.put(Incoming(message.mid, message.qos, message.topic, message.payload,
                                 self._generation, time.time()))

    def _hold_intake(self, client: mqtt.Client) -> None:
        """Count one more held message, first waiting (on paho's network thread, so nothing
        more is read off the socket) while ``receive_maximum`` messages are already held.

        While paho's thread waits here, its loop is ours: nothing else reads or writes the
        socket, so we send what other threads queued (``loop_write``: acks of written
        messages) and a PINGREQ every half keepalive, since paho's own keepalive timer does
        not run meanwhile and the broker drops a client silent for 1.5 keepalives. A
        connection lost while waiting ends the wait: after the reconnection the broker
        redelivers whatever was not acknowledged.
        """
        bound = self.config.ingest.receive_maximum
        ping_every = max(1.0, self.config.mqtt.keepalive / 2)
        began = last_ping = time.monotonic()
        lost = logged = False
        while True:
            with self._held_changed:
                if self._held < bound or lost or self._stop.is_set():
                    self._held += 1
                    break
                self._held_changed.wait(0.5)
            if not logged and time.monotonic() - began >= 1.0:  # a stall, not a batch being written
                log.warning("intake paused: %d messages held unacknowledged until InfluxDB catches up; "
                            "the broker keeps the rest", self._held)
                logged = True
            if time.monotonic() - last_ping >= ping_every:
                _queue_ping(client)
                last_ping = time.monotonic()
            lost = client.loop_write() not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN)
        if logged:
            log.info("intake resumed after %.1fs", time.monotonic() - began)

    def _release(self, count: int) -> None:
        """``count`` held messages are finished: let intake go on."""
        with self._held_changed:
            self._held -= count
            self._held_changed.notify_all()

    # --- processing ------------------------------------------------------------------------
    def _reject(self, topic_name: str, reason: str, detail: str, payload: bytes | str | None) -> None:
        with self._stats_lock:
            self.stats.rejected[reason] += 1
        log.warning("rejected %s: %s: %s", topic_name, reason, detail)
        self._dead.add(topic_name, reason, detail, payload)

    def _take(self, item: Incoming, batch: Batch) -> None:
        """Validate one message into the batch (its lines, its ack); rejections are counted."""
        self.stats.received += 1
        batch.messages.append(item)
        prefix = self.config.mqtt.topic_prefix
        try:
            where = parse_topic(prefix, item.topic)
        except WireError as exc:
            self._reject(item.topic, exc.reason, str(exc), item.payload)
            return
        if where.kind == "status":
            try:
                state = decode_status(item.payload)
            except WireError as exc:
                self._reject(item.topic, exc.reason, str(exc), item.payload)
                return
            batch.lines.append(format_line("status", {"hub": where.hub, "host": where.host},
                                           {"state": state, "online": state == "online"},
                                           int(item.received_at * 1e9)))
            batch.poke(where.hub, urgent=True, online_only=state == "online")
            return
        if where.kind not in ("metrics", "events"):
            return
        try:
            envelope = decode_raw(item.payload)
            check_envelope(envelope, where)
        except (WireError, MessageRejected) as exc:
            self._reject(item.topic, exc.reason, str(exc), item.payload)
            return
        key = (where.hub, where.host)
        batch.acks[key].add(envelope.seq)
        highest = self._highest_seq.get(key)
        if highest is not None and envelope.seq > highest + 1:
            self.stats.seq_gaps += envelope.seq - highest - 1
        if highest is None or envelope.seq > highest:
            self._highest_seq[key] = envelope.seq
        converted = self._converter.convert(envelope.samples, where)
        for rejection in converted.rejections:
            self._reject(item.topic, rejection.reason, rejection.detail, None)
        batch.lines.extend(converted.lines)
        batch.newest_ns = max(batch.newest_ns, converted.newest_ns)
        if converted.lines:
            self._poke_if_notable(batch, where, envelope.samples, converted.oldest_ns, item.received_at)

    def _poke_if_notable(self, batch: Batch, where, samples: list, oldest_ns: int, received_at: float) -> None:
        """Mark the hub for the leader when this message matters to outages or alerts."""
        params = self.config.outages.params
        if where.kind == "events":
            batch.poke(where.hub, urgent=True)
        # An agent's newest samples are up to batch_max_age + an interval old when they leave.
        late_ns = int(received_at * 1e9) - int((3 * params.agent_interval_s + params.agent_batch_max_age_s) * 1e9)
        if oldest_ns < late_ns:  # replayed from an outbox: outages of that time may change
            batch.poke(where.hub, since_ns=oldest_ns)
        for s in samples:
            m = s.get("m")
            if m == "ping":
                if s["f"].get("reachable") is False and s.get("tags", {}).get("target") in params.internet_targets:
                    batch.poke(where.hub)
            elif m == "system":
                boot = s["f"].get("boot_time_seconds")
                key = (where.hub, where.host)
                if isinstance(boot, float) and abs(self._boots.get(key, boot) - boot) > params.boot_jitter_s:
                    batch.poke(where.hub, since_ns=s["t"] - 3600 * 10**9)
                if isinstance(boot, float):
                    self._boots[key] = boot
            elif m == "ups" and s["f"].get("on_battery") is True:
                batch.poke(where.hub)

    def _write(self, writer, lines: list[str]) -> bool:
        """Write until it works or we are told to stop; True when written."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                outcome = writer.write(lines)
            except (InfluxUnavailable, InfluxRefused) as exc:
                with self._stats_lock:
                    self.stats.write_failures += 1
                log.warning("%s; retrying in %.1fs (%d points held, %d messages held unacknowledged)",
                            exc, delay, len(lines), self._held)
                if self._heartbeat.wait(self._stop, delay * random.uniform(0.5, 1.0)):
                    return False
                delay = min(delay * 2, self.config.ingest.max_retry_delay)
                continue
            with self._stats_lock:
                self.stats.write_seconds += time.monotonic() - started
                self.stats.writes += 1
                self.stats.written += outcome.written
                if outcome.dropped_unidentified:
                    self.stats.rejected["influx_partial"] += outcome.dropped_unidentified
            for rejected in outcome.rejected:
                self._reject("(influxdb)", rejected.reason, rejected.detail, rejected.line)
            return True

    def _flush(self, batch: Batch) -> None:
        """Hand a full batch to the writers: the main thread goes on validating the next one
        while this one is written. At most two batches wait, so an InfluxDB outage stops
        intake instead of filling memory."""
        batch.turn = self._turns
        while not self._stop.is_set():
            try:
                self._pending.put(batch, timeout=0.5)
                self._turns += 1
                return
            except queue.Full:
                self._heartbeat.beat()
        # stopping while InfluxDB is down: nothing acked, the broker redelivers it all

    def _write_loop(self, writer) -> None:
        while (batch := self._pending.get()) is not None:
            try:
                self._complete(writer, batch)
            finally:
                with self._turn_changed:  # the next batch's acks may go
                    self._acked_turns = max(self._acked_turns, batch.turn + 1)
                    self._turn_changed.notify_all()
                self._release(len(batch.messages))

    def _complete(self, writer, batch: Batch) -> None:
        """Write a batch, then acknowledge its messages and tell the agents and the leader.
        Acknowledgements leave in the order the messages arrived (MQTT wants PUBACKs in
        order), so a batch written before the one handed over ahead of it waits for it."""
        if batch.lines and not self._write(writer, batch.lines):
            return  # stopping with InfluxDB down: nothing acked, the broker keeps it all
        with self._turn_changed:
            while self._acked_turns < batch.turn and not self._stop.is_set():
                self._turn_changed.wait(0.5)
        self.stats.last_batch = len(batch.lines)
        if batch.newest_ns:
            self.stats.lag_seconds = max(0.0, time.time() - batch.newest_ns / 1e9)
        for item in batch.messages:
            # A mid is only meaningful on the connection that delivered it; older ones are
            # redelivered by the broker after a reconnect (and overwrite the same points).
            if item.qos > 0 and item.generation == self._generation:
                self._client.ack(item.mid, item.qos)
        prefix = self.config.mqtt.topic_prefix
        self._ack_infos[id(writer)] = [self._client.publish(topic(prefix, hub, host, "ack"), encode_ack(seqs), qos=1)
                                       for (hub, host), seqs in batch.acks.items()]
        for poke in batch.pokes.values():  # stored now: the leader may look
            self._client.publish(self.cluster.poke_topic, poke.to_bytes(), qos=1)

    def _stats_lines(self) -> list[str]:
        s, now = self.stats, time.time_ns()
        tags = {"instance": self.config.instance}
        fields: dict[str, object] = {
            "received_total": s.received, "written_total": s.written,
            "rejected_total": sum(s.rejected.values()), "write_failures_total": s.write_failures,
            "seq_gaps_total": s.seq_gaps, "batch_points": float(s.last_batch),
            "write_latency_seconds": (s.write_seconds / s.writes) if s.writes else 0.0,
            "queue_depth": float(self._inbox.qsize()),
        }
        if s.lag_seconds is not None:
            fields["lag_seconds"] = float(s.lag_seconds)
        lines = [format_line("hubwatch_collector", tags, fields, now)]
        for reason, count in sorted(s.rejected.items()):
            lines.append(format_line("hubwatch_collector", {**tags, "reason": reason}, {"rejected_total": count}, now))
        return lines

    # --- lifecycle -------------------------------------------------------------------------
    def _ensure_database(self) -> None:
        cfg = self.config.influxdb
        if cfg.api != "v1" or not cfg.create_database:
            return
        import urllib.request
        from urllib.parse import urlencode
        request = urllib.request.Request(f"{cfg.url.rstrip('/')}/query",
                                         data=urlencode({"q": f'CREATE DATABASE "{cfg.database}"'}).encode())
        deadline = time.monotonic() + 30
        while not self._stop.is_set():
            try:
                urllib.request.urlopen(request, timeout=cfg.timeout).read()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    log.warning("could not create database %s yet: %s", cfg.database, exc)
                    return
                self._stop.wait(1)

    def run(self) -> None:
        """Ingest until :meth:`stop`; raises RuntimeError if the broker refuses our credentials."""
        cfg, ingest = self.config, self.config.ingest
        self._ensure_database()
        self._client.connect_async(cfg.mqtt.host, cfg.mqtt.port, keepalive=int(cfg.mqtt.keepalive),
                                   clean_start=False, properties=self._connect_properties())
        self._client.loop_start()
        engine_thread = threading.Thread(target=self.engine.run, args=(self._stop,), name="engine", daemon=True)
        engine_thread.start()
        for thread in self._writer_threads:
            thread.start()
        sdnotify.status(f"connecting to {cfg.mqtt.host}:{cfg.mqtt.port}")
        batch = Batch()
        next_stats = time.monotonic() + ingest.stats_interval
        # Half the intake bound: small messages must not fill it while a batch waits for its
        # time limit (intake would stall until then).
        most_messages = max(1, ingest.receive_maximum // 2)
        ready = False
        try:
            while not self._stop.is_set():
                if self._fatal:
                    raise RuntimeError(self._fatal)
                self._heartbeat.beat()
                if not ready and self._connected.is_set():
                    # Subscribed (on_connect succeeded): from here on the unit counts as started.
                    sdnotify.ready(f"ingesting from {cfg.mqtt.host}:{cfg.mqtt.port}")
                    ready = True
                timeout = ingest.batch_max_delay if not batch.messages else max(
                    0.0, batch.started + ingest.batch_max_delay - time.monotonic())
                try:
                    item = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is not None:
                    if not batch.messages:
                        batch.started = time.monotonic()
                    self._take(item, batch)
                    # drain what is already waiting without sleeping, up to the batch size
                    while len(batch) < ingest.batch_max_points and len(batch.messages) < most_messages:
                        try:
                            self._take(self._inbox.get_nowait(), batch)
                        except queue.Empty:
                            break
                due = batch.messages and (len(batch) >= ingest.batch_max_points
                                          or len(batch.messages) >= most_messages
                                          or time.monotonic() >= batch.started + ingest.batch_max_delay)
                if time.monotonic() >= next_stats:
                    batch.lines.extend(self._stats_lines())
                    sdnotify.status(f"received {self.stats.received}, written {self.stats.written}, "
                                    f"rejected {sum(self.stats.rejected.values())}")
                    next_stats = time.monotonic() + ingest.stats_interval
                    due = True
                if due:
                    self._flush(batch)
                    batch = Batch()
        finally:
            self._shutdown(batch)

    def _shutdown(self, batch: Batch) -> None:
        # Intake stops here. The subscriptions stay in the persistent session, so the broker
        # keeps queueing for this instance while it restarts; what was received but not yet
        # acknowledged is redelivered on the next connection. Flush what we hold, then ack.
        sdnotify.stopping()
        while True:
            try:
                self._take(self._inbox.get_nowait(), batch)
            except queue.Empty:
                break
        stopping, self._stop = self._stop, threading.Event()
        deadline = threading.Timer(10.0, self._stop.set)  # give a down InfluxDB 10 s, no more
        deadline.start()
        if batch.messages:
            self._flush(batch)
        for _ in self._writer_threads:
            self._pending.put(None)
        for thread in self._writer_threads:
            if thread.is_alive():
                thread.join(12.0)
        deadline.cancel()
        self._stop = stopping
        self.engine.close()
        leave = self._client.publish(self.cluster.my_topic, b"", qos=1, retain=True)  # no longer a member
        for info in [*(i for infos in self._ack_infos.values() for i in infos), leave]:  # let the last acks leave
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                break
        self._client.disconnect()
        self._client.loop_stop()
        for writer in self._writers:
            writer.close()
        log.info("collector stopped: received=%d written=%d rejected=%d",
                 self.stats.received, self.stats.written, sum(self.stats.rejected.values()))

    def stop(self) -> None:
        self._stop.set()
