"""A STAND-IN for the collector, for the agent's delivery tests only.

The real collector (collector/) writes each message's points to InfluxDB and only then
publishes the seqs on the agent's ``ack`` topic; the full-pipeline tests use it. Here the
question is the agent's side of the contract, so this small real MQTT v5 client subscribes
to ``{prefix}/v1/+/+/metrics`` and ``.../events`` with a persistent session, decodes every
message with the wire module, records every sample, and acks each seq at once (or not, when
``acking`` is off: a collector that is down). It reconnects by itself across broker restarts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from typing import Callable

from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire


def sample_key(sample: wire.Sample) -> tuple:
    """What makes a sample one InfluxDB point: measurement, tags and time."""
    return (sample.measurement, tuple(sorted(sample.tags.items())), sample.time_ns)


class StandInCollector:
    def __init__(self, broker, prefix: str = "hubwatch", client_id: str = "standin-collector",
                 acking: bool = True, username: str | None = None, password: str | None = None):
        self.prefix = prefix
        self.acking = acking
        self.lock = threading.Condition()
        self.messages: list[tuple[str, wire.Envelope]] = []   # (kind, envelope), in arrival order
        self.seqs: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
        self.samples: Counter[tuple] = Counter()               # sample_key -> times received
        self.by_key: dict[tuple, wire.Sample] = {}
        self.arrivals: list[tuple[float, str, wire.Envelope]] = []
        self.statuses: list[tuple[float, str, str]] = []        # (monotonic, topic, status)
        self.errors: list[str] = []
        self.connected = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        if username is not None:
            self.client.username_pw_set(username, password)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect_async(broker.host, broker.port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("stand-in collector could not connect")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        for kind in ("metrics", "events", "status"):
            client.subscribe(wire.subscription(self.prefix, kind), qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        topic = wire.parse_topic(self.prefix, message.topic)
        if topic.kind == "status":
            with self.lock:
                self.statuses.append((time.monotonic(), message.topic, message.payload.decode(errors="replace")))
                self.lock.notify_all()
            return
        try:
            envelope = wire.decode(bytes(message.payload))
        except wire.WireError as exc:
            self.errors.append(f"{message.topic}: {exc}")
            return
        with self.lock:
            self.messages.append((topic.kind, envelope))
            self.arrivals.append((time.monotonic(), topic.kind, envelope))
            self.seqs[(topic.hub, topic.host)][envelope.seq] += 1
            for sample in envelope.samples:
                key = sample_key(sample)
                self.samples[key] += 1
                self.by_key[key] = sample
            self.lock.notify_all()
        if self.acking:
            client.publish(wire.topic(self.prefix, topic.hub, topic.host, "ack"), wire.encode_ack([envelope.seq]), qos=1)

    def wait_for(self, condition: Callable[["StandInCollector"], bool], timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: condition(self), timeout)

    def distinct_samples(self) -> int:
        with self.lock:
            return len(self.samples)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "StandInCollector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
