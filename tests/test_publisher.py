"""The publisher on a real mosquitto: status, acks, refusals by the ACL, by the credentials and
by paho itself. The collector is played by tests/standin_collector.py (a stand-in)."""

from __future__ import annotations

import logging
import queue
import signal
import time

import pytest

from agent import wire
from agent.clock import Reading
from agent.config import MqttConfig
from agent.confload import Secret
from agent.outbox import Outbox
from agent.publisher import Backoff, MqttSession, Sender
from agent.wire import Sample
from tests.standin_collector import StandInCollector

HUB, HOST = "hub-a", "gw01"
PASSWORD = "s3cret-pw-for-hub-a"


def reading() -> Reading:
    return Reading(time.time_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME), "boot", True)


def mqtt_config(broker, **kw) -> MqttConfig:
    return MqttConfig(url=broker.url, host=broker.host, port=broker.port, keepalive=5, **kw)


def fill(outbox: Outbox, messages: int, per_message: int = 10) -> int:
    for m in range(messages):
        outbox.add([Sample("system", time.time_ns() + i, {"hub": HUB, "host": HOST}, {"load1": float(m)})
                    for i in range(per_message)], reading())
        outbox.pack(reading(), force=True)
    return messages


class Harness:
    """A session and sender on a real outbox, driven the way the agent's loop drives them."""

    def __init__(self, tmp_path, broker, window: int = 20, retry_after: float = 5.0, queue_limit=None, **mqtt):
        self.events: queue.Queue = queue.Queue()
        self.outbox = Outbox(tmp_path / "outbox.db", HUB, HOST)
        self.session = MqttSession(mqtt_config(broker, **mqtt), HUB, HOST, self.events, window=window,
                                   backoff=Backoff(0.1, 0.5), queue_limit=queue_limit)
        self.sender = Sender(self.outbox, self.session, window=window, retry_after=retry_after, resend_after=30)

    def run(self, until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sender.pump()
            try:
                self.sender.handle(self.events.get(timeout=0.05))
            except queue.Empty:
                pass
            if until():
                return True
        return False

    def close(self) -> None:
        self.session.stop()
        self.outbox.close()


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(broker, **kw) -> Harness:
        h = Harness(tmp_path, broker, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def test_online_then_every_message_acked_and_removed_then_stopped(mosquitto, harness):
    with StandInCollector(mosquitto) as collector:
        h = harness(mosquitto)
        fill(h.outbox, 30)
        h.session.start()
        assert h.run(lambda: h.outbox.stats().samples == 0, 10), h.outbox.stats()
        assert sorted(collector.seqs[(HUB, HOST)]) == list(range(1, 31))
        assert h.outbox.stats().counters["messages_acked_total"] == 30
        assert h.sender.stats.errors == 0 and h.sender.stats.rejected == 0
        assert h.session.stop() is True
        assert collector.wait_for(lambda c: [s for _, _, s in c.statuses] == ["online", "stopped"], 5), \
            collector.statuses
    # the retained status is what a collector that starts later sees
    with mosquitto.subscriber(wire.topic("hubwatch", HUB, HOST, "status")) as late:
        assert [m.payload for m in late.messages(timeout=2)] == [b"stopped"]


def test_a_publish_the_acl_refuses_is_logged_kept_and_retried_until_allowed(mosquitto_factory, harness, caplog):
    acl = """
user hub-a
topic write hubwatch/v1/hub-a/gw01/status
topic read hubwatch/v1/hub-a/gw01/ack
user collector
topic readwrite hubwatch/#
"""
    broker = mosquitto_factory(users={"hub-a": PASSWORD, "collector": "pw-c"}, acl=acl)
    h = harness(broker, retry_after=0.3, username="hub-a", password=Secret(PASSWORD))
    fill(h.outbox, 3)
    h.session.start()
    with caplog.at_level(logging.ERROR, logger="agent.publisher"):
        assert h.run(lambda: h.sender.stats.rejected >= 6, 10)
    metrics_topic = wire.topic("hubwatch", HUB, HOST, "metrics")
    assert f"to {metrics_topic}: PUBACK 135" in caplog.text
    assert h.outbox.stats().messages == 3 and h.outbox.stats().samples == 30  # nothing lost
    assert h.session.connected  # a refused publish is not a reason to drop the connection
    # The operator fixes the ACL; the broker reloads it; the same rows go through.
    broker.acl_path.write_text(acl.replace("topic write hubwatch/v1/hub-a/gw01/status",
                                           "topic write hubwatch/v1/hub-a/gw01/#"))
    broker.process.signal(signal.SIGHUP)
    with StandInCollector(broker, username="collector", password="pw-c") as collector:
        assert h.run(lambda: h.outbox.stats().samples == 0, 10), h.outbox.stats()
        assert sorted(collector.seqs[(HUB, HOST)]) == [1, 2, 3]
    assert h.outbox.stats().counters["publish_rejected_total"] >= 6
    assert PASSWORD not in caplog.text


def test_refused_credentials_are_said_once_clearly_and_retried_slowly(mosquitto_factory, tmp_path, caplog):
    broker = mosquitto_factory(users={"hub-a": PASSWORD})
    events: queue.Queue = queue.Queue()
    session = MqttSession(mqtt_config(broker, username="hub-a", password=Secret("wrong-password")), HUB, HOST,
                          events, backoff=Backoff(0.05, 0.1, auth=1.0))
    with caplog.at_level(logging.INFO, logger="agent.publisher"):
        session.start()
        time.sleep(3.2)
        session.stop(timeout=0.5)
    # a short backoff would have tried ~40 times; the long one (0.75-1.25 s) at most 5
    assert 2 <= session.refusals <= 5, session.refusals
    refused = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    text = refused[0].getMessage()
    assert "'hub-a'" in text and ("CONNACK 134" in text or "CONNACK 135" in text), text
    assert "wrong-password" not in caplog.text
    assert not session.connected


def test_publishes_the_client_library_refuses_are_retried_never_lost(mosquitto, harness):
    with StandInCollector(mosquitto) as collector:
        # paho keeps at most 2 QoS 1 messages outstanding: beyond that publish() returns
        # MQTT_ERR_QUEUE_SIZE, which the sender must treat as "not sent".
        h = harness(mosquitto, retry_after=0.05, queue_limit=2)
        fill(h.outbox, 60, per_message=5)
        h.session.start()
        assert h.run(lambda: h.outbox.stats().samples == 0, 20), h.outbox.stats()
        assert h.sender.stats.errors > 0
        assert h.outbox.stats().counters["publish_errors_total"] == h.sender.stats.errors
        assert sorted(collector.seqs[(HUB, HOST)]) == list(range(1, 61))


def test_sent_but_unconfirmed_messages_go_again_byte_for_byte(mosquitto, harness):
    with StandInCollector(mosquitto, acking=False) as collector:
        h = harness(mosquitto)
        h.sender.resend_after = 0.3
        fill(h.outbox, 2)
        originals = {m.seq: m.payload for m in h.outbox.messages_after(0, 10)}
        h.session.start()
        assert h.run(lambda: h.sender.stats.resent >= 2, 5)
        assert h.outbox.stats().messages == 2  # not confirmed: still held
        assert collector.wait_for(lambda c: all(c.seqs[(HUB, HOST)][seq] >= 2 for seq in originals), 5)
        with collector.lock:
            payloads = [wire.encode(e) for _, e in collector.messages]
        assert {wire.decode(p).seq for p in originals.values()} == {1, 2}
        assert all(wire.encode(wire.decode(p)) in payloads for p in originals.values())


def test_reconnect_backoff_doubles_with_jitter_and_caps():
    backoff = Backoff(minimum=1.0, maximum=60.0)
    for attempt, base in [(0, 1), (1, 2), (3, 8), (6, 60), (40, 60)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base / 4  # jittered: agents of many hubs do not reconnect in step
