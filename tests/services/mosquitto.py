"""pytest fixtures: a real mosquitto broker on a free loopback port, and a real MQTT v5 test client.

Fixtures
--------
``mosquitto_factory(**options) -> MosquittoBroker``
    Starts a new broker (its own temp dir and port) per call; every broker is stopped when
    the test ends. Options (all keywords):

    - ``users={name: password}``: a password file made with ``mosquitto_passwd -b``;
      anonymous clients are then refused unless ``allow_anonymous=True``.
    - ``acl="..."``: the text of an ``acl_file`` (``user NAME`` / ``topic write a/#`` /
      ``pattern read a/%u/#``; the lines before the first ``user`` apply to anonymous clients).
    - ``allow_anonymous``: default True without ``users``, False with them.
    - ``extra_config=["max_queued_messages 10000000", ...]``: more lines for mosquitto.conf
      (not 0 = unlimited: mosquitto 2.0.11 then drops a client after its second refused publish).
    - ``autosave_interval=1``: seconds between persistence saves (what a SIGKILL can lose).

``mosquitto -> MosquittoBroker``
    One anonymous broker with persistence, no ACL.

Helpers: ``MqttClient`` (connect, publish returning the PUBACK reason code, subscribe,
collect messages) and ``Subscriber`` (an ``MqttClient`` subscribed to a topic filter).
Both speak MQTT v5 through paho-mqtt with ``CallbackAPIVersion.VERSION2``.

Behaviour of mosquitto 2.0.11 that tests can rely on (checked in tests/test_services.py):

- a wrong password (and an anonymous client when anonymous is off) is refused with CONNACK
  reason code 135 "Not authorized", not 134 "Bad user name or password";
- a QoS 1 publish the ACL denies gets PUBACK reason code 135 "Not authorized" and the client
  stays connected;
- a QoS 1 publish nobody is subscribed to gets PUBACK 16 "No matching subscribers": a
  success (``rc.is_failure`` is False), so test success with ``not rc.is_failure``, not ``== 0``;
- a SUBSCRIBE outside the ACL is still granted (SUBACK = the QoS asked for); the broker just
  never delivers the messages the ACL hides;
- a QoS 1 message queued for a disconnected persistent session survives a clean stop/start,
  and a ``kill()`` after ``wait_saved()``; a ``kill()`` before the next autosave loses it
  together with the session.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.services.common import LOOPBACK, ManagedService, ServiceError, ServiceFactory, ServiceProcess, free_port

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"


def mqtt_connack(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> int | None:
    """Send a bare MQTT 3.1.1 CONNECT; the CONNACK return code, or None if none came.

    Any CONNACK (even "not authorised") proves the broker is serving MQTT on the port.
    """
    # Clean session, keep-alive 10 s, empty client id (the broker assigns one).
    variable_header = b"\x00\x04MQTT" + bytes([4, 0x02, 0, 10])
    payload = b"\x00\x00"
    packet = bytes([0x10, len(variable_header) + len(payload)]) + variable_header + payload
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(packet)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
            sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return None
    return reply[3] if reply[0] == 0x20 else None


class MosquittoBroker(ManagedService):
    """One mosquitto process, its config and persistence in ``config_dir``.

    ``stop()`` then ``start()`` brings it back on the same port with the same persistence
    file (a broker restart); ``kill()`` is a crash (SIGKILL: what was not yet autosaved is
    lost; ``wait_saved()`` first to make a crash test deterministic).
    """

    def __init__(self, config_dir: Path, *, users: dict[str, str] | None = None, acl: str | None = None,
                 allow_anonymous: bool | None = None, extra_config: Iterable[str] = (),
                 autosave_interval: int = 1):
        self.config_dir = Path(config_dir)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = free_port()
        self.users = dict(users or {})
        self.persistence_dir = self.config_dir / "persistence"
        self.persistence_dir.mkdir(exist_ok=True)
        self.config_path = self.config_dir / "mosquitto.conf"
        self.password_path = self.config_dir / "passwords" if self.users else None
        self.acl_path = self.config_dir / "acl" if acl is not None else None
        if allow_anonymous is None:
            allow_anonymous = not self.users
        lines = [
            "# written by tests/services/mosquitto.py",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            # mosquitto appends the file name to this prefix: it needs the trailing slash.
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {autosave_interval}",
            "log_dest stdout",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto 2.0 drops to the 'mosquitto' user, which cannot write our temp dir.
            lines.append("user root")
        if self.password_path is not None:
            self._write_passwords(self.password_path, self.users)
            lines.append(f"password_file {self.password_path}")
        if self.acl_path is not None:
            self.acl_path.write_text(acl.strip() + "\n")
            lines.append(f"acl_file {self.acl_path}")
        lines.extend(extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process = ServiceProcess("mosquitto", [MOSQUITTO, "-c", str(self.config_path)], self.config_dir)

    @staticmethod
    def _write_passwords(path: Path, users: dict[str, str]) -> None:
        path.write_text("")
        path.chmod(0o600)
        for name, password in users.items():
            done = subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), name, password],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise ServiceError(f"mosquitto_passwd failed for user {name!r}: {done.stdout}{done.stderr}")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    start_timeout = 10.0

    def ready(self) -> bool:
        """A CONNECT gets a CONNACK."""
        return mqtt_connack(self.port) is not None

    @property
    def ready_what(self) -> str:
        return f"answering MQTT on {self.host}:{self.port}"

    @property
    def persistence_file(self) -> Path:
        return self.persistence_dir / "mosquitto.db"

    def _saved_signature(self) -> tuple[int, int] | None:
        try:
            stat = self.persistence_file.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Wait for the next autosave to finish: what the broker acknowledged before this
        call is then on disk and survives ``kill()``. (mosquitto saves from its one thread,
        so a save that ends after a PUBACK was sent cannot have started before it.)"""
        before = self._saved_signature()
        self.process.wait_until(lambda: self._saved_signature() not in (None, before), timeout,
                                f"saved to {self.persistence_file}")

    def client(self, client_id: str = "", **options) -> "MqttClient":
        """A connected ``MqttClient`` for this broker (see its arguments)."""
        return MqttClient(self, client_id, **options)

    def subscriber(self, topic: str, **options) -> "Subscriber":
        """A connected ``Subscriber`` for this broker (see its arguments)."""
        return Subscriber(self, topic, **options)

    def __repr__(self) -> str:
        return f"<MosquittoBroker {self.url} pid={self.pid} dir={self.config_dir}>"


class MqttRefused(ConnectionError):
    """The broker answered CONNECT with a failure reason code (``.reason_code``)."""

    def __init__(self, reason_code: ReasonCode):
        super().__init__(f"broker refused the connection: {reason_code} ({reason_code.value})")
        self.reason_code = reason_code


class MqttClient:
    """A real paho-mqtt MQTT v5 client for tests; its network loop runs on a background thread.

    ``MqttClient(broker, client_id="", username=None, password=None, clean_start=True,
    session_expiry=0, timeout=5.0)`` connects at once and raises ``MqttRefused`` if the
    broker refuses. ``session_expiry`` (seconds) with ``clean_start=False`` makes a
    persistent session: the broker queues QoS ≥ 1 messages for it while it is away.
    Messages to any subscription land in an internal queue read by ``messages()``.
    Does not reconnect by itself: a broker restart needs a new client. Use as a context manager.
    """

    def __init__(self, broker: MosquittoBroker | tuple[str, int], client_id: str = "", *,
                 username: str | None = None, password: str | None = None, clean_start: bool = True,
                 session_expiry: int = 0, timeout: float = 5.0):
        self.host, self.port = (broker.host, broker.port) if isinstance(broker, MosquittoBroker) else broker
        self.timeout = timeout
        self.client_id = client_id  # "" lets the broker assign one
        self._paho = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                            reconnect_on_failure=False)
        if username is not None:
            self._paho.username_pw_set(username, password)
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.on_publish = self._on_publish
        self._paho.on_subscribe = self._on_subscribe
        self._lock = threading.Condition()
        self._connack: ReasonCode | None = None
        self._acks: dict[int, object] = {}  # mid -> PUBACK reason code / SUBACK reason codes
        self._inbox: queue.Queue[MQTTMessage] = queue.Queue()
        self.session_present = False
        self.disconnect_reason: ReasonCode | None = None
        self.connected = False
        properties = None
        if session_expiry:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        self._paho.connect(self.host, self.port, keepalive=30, clean_start=clean_start, properties=properties)
        self._paho.loop_start()
        try:
            with self._lock:
                if not self._lock.wait_for(lambda: self._connack is not None or self.disconnect_reason is not None,
                                           timeout):
                    raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout:g}s")
            if self._connack is None or self._connack.is_failure:
                raise MqttRefused(self._connack or self.disconnect_reason)
        except BaseException:
            self.close()
            raise

    @property
    def paho(self) -> Client:
        """The underlying paho client, for anything not wrapped here."""
        return self._paho

    # paho callbacks (network thread): only record, never block.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._connack = reason_code
            self.session_present = bool(flags.session_present)
            self.connected = not reason_code.is_failure
            self._lock.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self.connected = False
            self.disconnect_reason = reason_code
            self._lock.notify_all()

    def _on_message(self, client, userdata, message: MQTTMessage) -> None:
        self._inbox.put(message)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._acks[mid] = reason_code
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._acks[mid] = list(reason_codes)
            self._lock.notify_all()

    def _wait_ack(self, mid: int, what: str, timeout: float | None) -> object:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._acks or not self.connected, timeout):
                raise TimeoutError(f"no {what} within {timeout:g}s")
            if mid not in self._acks:
                raise ConnectionError(f"disconnected before {what}: {self.disconnect_reason}")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 1, retain: bool = False,
                timeout: float | None = None) -> ReasonCode:
        """Publish and wait for the broker's answer: the PUBACK reason code for QoS 1
        (``rc.value == 0`` success, 135 not authorised), Success once sent for QoS 0."""
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:
            raise ConnectionError(f"paho refused to publish to {topic!r}: rc={info.rc}")
        return self._wait_ack(info.mid, f"PUBACK for {topic!r}", timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float | None = None) -> ReasonCode:
        """Subscribe and wait for SUBACK; returns its reason code (the granted QoS, or a failure)."""
        result, mid = self._paho.subscribe(topic, qos=qos)
        if result != 0:
            raise ConnectionError(f"paho refused to subscribe to {topic!r}: rc={result}")
        return self._wait_ack(mid, f"SUBACK for {topic!r}", timeout)[0]

    def messages(self, timeout: float = 2.0, count: int = 1) -> list[MQTTMessage]:
        """Received messages, oldest first, taken out of the inbox.

        Returns as soon as at least ``count`` messages are in hand, or when ``timeout``
        seconds have passed (then with fewer, possibly none: assert on the result).
        """
        got: list[MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got.append(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        while True:  # and whatever else already arrived
            try:
                got.append(self._inbox.get_nowait())
            except queue.Empty:
                return got

    def wait_disconnected(self, timeout: float | None = None) -> ReasonCode | None:
        """Wait until the broker drops this client; the DISCONNECT reason code, if any."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if not self._lock.wait_for(lambda: not self.connected, timeout):
                raise TimeoutError(f"still connected after {timeout:g}s")
            return self.disconnect_reason

    def close(self) -> None:
        """Disconnect cleanly (a persistent session stays on the broker) and stop the loop."""
        try:
            if self.connected:
                self._paho.disconnect()
        finally:
            self._paho.loop_stop()

    def __enter__(self) -> "MqttClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscriber(MqttClient):
    """An ``MqttClient`` subscribed to ``topic`` (QoS ``qos``, default 1) before it is returned.

    ``Subscriber(broker, "hubwatch/v1/#").messages(timeout=2)`` -> received messages.
    Takes ``MqttClient``'s keyword arguments; raises if the broker refuses the subscription.
    """

    def __init__(self, broker: MosquittoBroker | tuple[str, int], topic: str, qos: int = 1, **options):
        super().__init__(broker, **options)
        self.topic = topic
        try:
            granted = self.subscribe(topic, qos)
            if granted.is_failure:
                raise PermissionError(f"subscription to {topic!r} refused: {granted} ({granted.value})")
        except BaseException:
            self.close()
            raise


@pytest.fixture
def mosquitto_factory(tmp_path) -> Iterator[ServiceFactory]:
    """Call with keyword options (see this module's docstring) to get a running broker."""
    factory = ServiceFactory(tmp_path, MosquittoBroker, 'mosquitto')
    yield factory
    factory.close()


@pytest.fixture
def mosquitto(mosquitto_factory) -> MosquittoBroker:
    """A running anonymous mosquitto with persistence: ``.url``, ``.host``, ``.port``."""
    return mosquitto_factory()
