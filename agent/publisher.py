"""Getting outbox messages to the broker, and the collector's acks back.

:class:`MqttSession` owns the paho-mqtt client: MQTT v5, QoS 1, a persistent session
(``clean_start=False`` with a session expiry) under the client id ``hubwatch-{hub}-{host}``,
the retained ``status`` topic (``offline`` as the Last Will, ``online`` published in
``on_connect``, ``stopped`` on a clean stop), and the subscription to its own ``ack`` topic,
made in ``on_connect`` so every reconnect restores it. Paho's network thread only puts
events on a queue; nothing is decided or blocks inside a callback. Reconnects back off
exponentially with full jitter; a refusal of the credentials (CONNACK 134/135) is logged
once, clearly, and retried only after a long pause.

:class:`Sender` runs in the agent's main loop. It keeps at most ``window`` messages waiting
for a PUBACK, checks every ``publish()`` return code and every PUBACK reason code (a refused
publish is retried later, never dropped: the row stays in the outbox), and sends a message
again, byte for byte, when the collector has not confirmed it within ``resend_after``
(doubling per attempt). Messages on ``events`` go before the backlog.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from paho.mqtt.client import CallbackAPIVersion, Client, MQTTErrorCode
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from agent.config import MqttConfig
from agent.outbox import Message, Outbox

log = logging.getLogger(__name__)

#: CONNACK reason codes that mean "these credentials will not do": retrying soon is pointless.
AUTH_REFUSED = {134: "bad user name or password", 135: "not authorized"}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a delay drawn from [base/2, base], base doubling."""

    minimum: float = 1.0
    maximum: float = 60.0
    auth: float = 300.0  # after a credentials refusal

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.minimum * (2 ** min(attempt, 30)))
        return base / 2 + rng() * base / 2


# Events handed from paho's network thread to the main loop.
@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class PubAck:
    mid: int
    reason_code: int
    reason: str


@dataclass(frozen=True)
class AckReceived:
    payload: bytes


class MqttSession:
    """The agent's MQTT connection. ``events`` receives Connected/Disconnected/PubAck/AckReceived."""

    def __init__(self, config: MqttConfig, hub: str, host: str, events: "queue.Queue[Any]", *,
                 window: int = 20, session_expiry_s: int = 86400, backoff: Backoff = Backoff(),
                 queue_limit: int | None = None):
        self.config = config
        self.hub = hub
        self.host = host
        self.events = events
        self.backoff = backoff
        self.client_id = f"hubwatch-{hub}-{host}"
        prefix = config.topic_prefix
        self.topics = {kind: wire.topic(prefix, hub, host, kind) for kind in wire.KINDS}
        self._connected = threading.Event()
        self._attempt = 0
        self._auth_refused = False
        self.connects = 0
        self._stopping = False
        self.refusals = 0  # CONNACKs with a failure reason code

        client = Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=True)
        self.client = client
        if config.username is not None:
            client.username_pw_set(config.username, config.password.reveal() if config.password else None)
        if config.tls:
            client.tls_set(ca_certs=str(config.ca_file) if config.ca_file else None,
                           certfile=str(config.cert_file) if config.cert_file else None,
                           keyfile=str(config.key_file) if config.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(self.topics["status"], wire.encode_status("offline"), qos=1, retain=True)
        # paho's own limits sit above the Sender's window, so they never refuse a message the
        # Sender meant to send; they only bound memory if something goes wrong.
        client.max_inflight_messages_set(window + 8)
        client.max_queued_messages_set(queue_limit or 4 * window + 32)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._set_delay(self.backoff.delay(0))
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = int(session_expiry_s)
        client.connect_async(config.host, config.port, keepalive=int(config.keepalive), clean_start=False,
                             properties=properties)

    # --- lifecycle (main thread) -----------------------------------------------------------
    def start(self) -> None:
        log.info("connecting to %s as %s", self.config.url, self.client_id)
        self.client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, kind: str, payload: bytes) -> tuple[int, int]:
        """Queue a QoS 1 publish: (rc, mid). rc != 0 means paho did not take it."""
        info = self.client.publish(self.topics[kind], payload, qos=1)
        return int(info.rc), info.mid

    def stop(self, timeout: float = 2.0) -> bool:
        """Publish retained ``stopped``, wait (bounded) for its PUBACK, disconnect; True if it went out."""
        sent = False
        if self.connected:
            info = self.client.publish(self.topics["status"], wire.encode_status("stopped"), qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    pass
                sent = info.is_published()
        if not sent:
            log.warning("could not publish status 'stopped' (broker unreachable); the broker's "
                        "Last Will says 'offline'")
        self._stopping = True
        self.client.disconnect()
        stopper = threading.Thread(target=self.client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(timeout)
        return sent

    # --- paho callbacks (network thread): record and hand over, never block ---------------
    def _set_delay(self, seconds: float) -> None:
        # paho waits reconnect_delay before each new attempt; pinning min = max to our own
        # (jittered) choice keeps its loop but makes the policy ours.
        self.reconnect_delay = seconds
        self.client.reconnect_delay_set(seconds, seconds)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refusals += 1
            value = reason_code.value
            if value in AUTH_REFUSED:
                delay = self.backoff.auth * (0.75 + random.random() * 0.5)
                if not self._auth_refused:
                    log.error("broker %s refused the credentials of user %r (CONNACK %d, %s); check "
                              "mqtt.username and the password; retrying every %.0fs", self.config.url,
                              self.config.username, value, AUTH_REFUSED[value], self.backoff.auth)
                self._auth_refused = True
                self._set_delay(delay)
            else:
                log.warning("broker %s refused the connection: %s (CONNACK %d)", self.config.url, reason_code, value)
                self._next_backoff()
            return
        if self._auth_refused:
            log.info("broker accepted the credentials again")
        self._auth_refused = False
        self._attempt = 0
        self._set_delay(self.backoff.delay(0))
        self.connects += 1
        # Birth and subscription here, so every reconnect restores them.
        client.publish(self.topics["status"], wire.encode_status("online"), qos=1, retain=True)
        client.subscribe(self.topics["ack"], qos=1)
        self._connected.set()
        log.info("connected to %s (session %s)", self.config.url,
                 "resumed" if flags.session_present else "new")
        self.events.put(Connected(bool(flags.session_present)))

    def _next_backoff(self) -> None:
        if self._auth_refused:
            return  # keep the long pause
        self._attempt += 1
        self._set_delay(self.backoff.delay(self._attempt))

    def _on_connect_fail(self, client, userdata) -> None:
        if self._attempt == 0:
            log.warning("cannot reach broker %s; retrying with backoff", self.config.url)
        self._next_backoff()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("disconnected from %s: %s", self.config.url, reason_code)
            self._attempt = 0
        self._next_backoff()
        self.events.put(Disconnected(str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.events.put(PubAck(mid, int(reason_code.value), str(reason_code)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("broker refused the subscription to %s: %s (%d); acks cannot arrive, so "
                          "the outbox will keep and resend every message", self.topics["ack"], rc, rc.value)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics["ack"]:
            self.events.put(AckReceived(bytes(message.payload)))


@dataclass
class _Sent:
    due: float            # monotonic time to send again if no collector ack
    attempts: int


@dataclass
class SendStats:
    published: int = 0
    errors: int = 0
    rejected: int = 0
    resent: int = 0


class Sender:
    """Delivery bookkeeping for one outbox, driven from the agent's main loop."""

    def __init__(self, outbox: Outbox, session: Any, *, window: int = 20, max_unconfirmed: int = 200,
                 resend_after: float = 60.0, resend_max: float = 1800.0, retry_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.outbox = outbox
        self.session = session
        self.window = window
        self.max_unconfirmed = max_unconfirmed
        self.resend_after = resend_after
        self.resend_max = resend_max
        self.retry_after = retry_after
        self.clock = clock
        self.in_flight: dict[int, tuple[int, float, str]] = {}   # mid -> (seq, sent at, kind)
        self.flying_seqs: set[int] = set()
        self.awaiting_ack: dict[int, _Sent] = {}            # seq -> PUBACKed, not yet confirmed
        self.retry: dict[int, _Sent] = {}                   # seq -> refused, retry at .due
        self.priority: list[int] = []                       # events seqs, sent first
        self.cursor = 0                                     # highest seq taken from the outbox so far
        self.stats = SendStats()
        self.log_refusals: dict[str, float] = {}

    # --- events from the session --------------------------------------------------------
    def handle(self, event: Any) -> list[int]:
        """Apply one session event; returns seqs the collector confirmed (for the caller's log)."""
        if isinstance(event, PubAck):
            entry = self.in_flight.pop(event.mid, None)
            if entry is None:
                return []
            seq, _, kind = entry
            self.flying_seqs.discard(seq)
            attempts = self.awaiting_ack.get(seq, self.retry.get(seq, _Sent(0, 0))).attempts + 1
            self.retry.pop(seq, None)
            if event.reason_code >= 128:
                self.stats.rejected += 1
                self.outbox.count("publish_rejected_total")
                self._log_refusal(kind, f"broker refused the publish of seq {seq} to {self.session.topics[kind]}: "
                                        f"PUBACK {event.reason_code} ({event.reason}); the message stays in the "
                                        f"outbox and is retried every {self.retry_after:g}s (check the broker's ACL)")
                self.retry[seq] = _Sent(self.clock() + self.retry_after, attempts)
                return []
            self.stats.published += 1
            self.outbox.count("messages_published_total")
            wait = min(self.resend_max, self.resend_after * 2 ** min(attempts - 1, 20))
            self.awaiting_ack[seq] = _Sent(self.clock() + wait, attempts)
            return []
        if isinstance(event, AckReceived):
            return self.handle_acks([event])
        if isinstance(event, Connected):
            # paho sends again what was in flight on the old connection (same mids): their
            # PUBACKs are due from now, not from when they were first sent.
            now = self.clock()
            self.in_flight = {mid: (seq, now, kind) for mid, (seq, _, kind) in self.in_flight.items()}
            return []
        return []

    def handle_acks(self, events: list[AckReceived]) -> list[int]:
        """Apply the collector's acks that arrived together in one outbox transaction (one
        fsync, not one per ack: a draining backlog gets an ack per message)."""
        ranges: list[tuple[int, int]] = []
        for event in events:
            try:
                ranges += wire.decode_ack(event.payload)
            except wire.WireError as exc:
                log.warning("ignoring a malformed ack on %s: %s", self.session.topics["ack"], exc)
        if not ranges:
            return []
        acked = self.outbox.ack(wire.merge_ranges(ranges))
        for seq in acked:
            self.awaiting_ack.pop(seq, None)
            self.retry.pop(seq, None)
        return acked

    def _log_refusal(self, kind: str, text: str) -> None:
        # One line a minute per topic: clear, without flooding the log during a long refusal.
        now = self.clock()
        if now - self.log_refusals.get(kind, -1e9) >= 60:
            log.error(text)
            self.log_refusals[kind] = now

    def reset(self) -> None:
        """Forget everything (the outbox was replaced): send all it holds again, from the start."""
        self.in_flight.clear()
        self.flying_seqs.clear()
        self.awaiting_ack.clear()
        self.retry.clear()
        self.priority.clear()
        self.cursor = 0

    def forget(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.awaiting_ack.pop(seq, None)
            self.retry.pop(seq, None)

    def add_priority(self, seqs: list[int]) -> None:
        self.priority.extend(seqs)

    # --- sending ----------------------------------------------------------------------------
    def pump(self) -> int:
        """Send what the window allows; returns how many publishes were handed to paho."""
        if not self.session.connected:
            return 0
        now = self.clock()
        self._expire_in_flight(now)
        sent = 0
        # Power events first, even past the window: they are few and they are the point.
        while self.priority:
            seq = self.priority.pop(0)
            if seq in self.flying_seqs or seq in self.awaiting_ack:
                continue
            message = self.outbox.message(seq)
            if message is not None:
                if not self._send(message, now, resend=False):
                    return sent
                sent += 1
        for seq, entry in sorted(list(self.retry.items()) + list(self.awaiting_ack.items())):
            if len(self.in_flight) >= self.window:
                return sent
            if entry.due > now or seq in self.flying_seqs:
                continue
            message = self.outbox.message(seq)
            if message is None:  # acked meanwhile, or dropped at the cap
                self.retry.pop(seq, None)
                self.awaiting_ack.pop(seq, None)
                continue
            if not self._send(message, now, resend=True):
                return sent  # the client takes nothing now: try again at the next pass
            sent += 1
        while len(self.in_flight) < self.window and len(self.awaiting_ack) < self.max_unconfirmed:
            batch = self.outbox.messages_after(self.cursor, self.window - len(self.in_flight))
            if not batch:
                break
            for message in batch:
                self.cursor = max(self.cursor, message.seq)
                if message.seq in self.flying_seqs or message.seq in self.awaiting_ack or message.seq in self.retry:
                    continue
                if not self._send(message, now, resend=False):
                    return sent
                sent += 1
        return sent

    def _send(self, message: Message, now: float, resend: bool) -> bool:
        rc, mid = self.session.publish(message.kind, message.payload)
        if rc != 0:
            # Not taken (not connected, or paho's queue is full): keep it and try again soon.
            self.stats.errors += 1
            self.outbox.count("publish_errors_total")
            previous = self.retry.get(message.seq) or self.awaiting_ack.pop(message.seq, None)
            self.retry[message.seq] = _Sent(now + min(self.retry_after, 1.0), previous.attempts if previous else 0)
            log.debug("publish of seq %d refused by the client (rc=%d); retrying", message.seq, rc)
            return False
        if resend:
            self.stats.resent += 1
            self.outbox.count("messages_resent_total")
        self.in_flight[mid] = (message.seq, now, message.kind)
        self.flying_seqs.add(message.seq)
        return True

    def _expire_in_flight(self, now: float) -> None:
        """A PUBACK that never came (a connection that died without paho noticing): give the slot back."""
        limit = max(30.0, self.resend_after)
        for mid, (seq, at, _) in list(self.in_flight.items()):
            if now - at > limit:
                del self.in_flight[mid]
                self.flying_seqs.discard(seq)
                self.retry[seq] = _Sent(now, 1)

    @property
    def has_room(self) -> bool:
        """Connected, with a free slot in the window, the collector keeping up and fewer than
        a window of packed messages still unsent: only then is packing more metrics useful."""
        return (self.session.connected and len(self.in_flight) < self.window
                and len(self.awaiting_ack) < self.max_unconfirmed
                and self.outbox.unsent_after(self.cursor, self.window) < self.window)

    @property
    def idle(self) -> bool:
        """Nothing waits for a PUBACK and nothing new is left to send."""
        return not self.in_flight and not self.priority and not self.outbox.messages_after(self.cursor, 1)

    def next_due(self) -> float | None:
        dues = [e.due for e in self.retry.values()] + [e.due for e in self.awaiting_ack.values()]
        return min(dues) if dues else None
