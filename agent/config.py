"""The agent's configuration: YAML validated into frozen dataclasses.

See ``config/agent.example.yaml`` for every key with its default.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import probes
from agent.confload import Secret, Section, load_config_file, read_config
from agent.wire import ID_PATTERN, MAX_DECOMPRESSED_BYTES, check_prefix

DEFAULT_CONFIG_PATH = "/etc/hubwatch/agent.yaml"


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: Secret | None = None
    topic_prefix: str = "hubwatch"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: float = 60.0
    session_expiry: float = 86400.0   # the broker keeps our session (and queued acks) this long
    reconnect_min: float = 1.0        # reconnect backoff: doubles from min to max, with jitter
    reconnect_max: float = 60.0
    auth_retry: float = 300.0         # after the broker refused the credentials


@dataclass(frozen=True)
class BufferConfig:
    path: Path = Path("/var/lib/hubwatch/outbox.db")
    max_mb: float = 256.0
    batch_max_samples: int = 1000     # a message carries at most this many samples...
    batch_max_bytes: int = 256 * 1024  # ...and this much JSON before compression
    batch_max_age: float = 60.0       # cycles wait up to this long to share a message (0: one per cycle)
    resend_after: float = 60.0        # sent but not confirmed by the collector: send again (doubling)


@dataclass(frozen=True)
class PublishConfig:
    window: int = 20                  # messages in flight (waiting for a PUBACK)
    max_unconfirmed: int = 200        # messages the broker has but the collector has not confirmed
    flush_timeout: float = 3.0        # on SIGTERM, time spent sending what is left


@dataclass(frozen=True)
class ClockConfig:
    require_sync: bool | str = "auto"  # hold samples while the kernel says the clock is unsynchronised
    max_step: float = 1.0             # a wall-clock jump larger than this makes the clock untrusted...
    settle: float = 30.0              # ...until it has been steady this long (or NTP says synced)


@dataclass(frozen=True)
class ProbeSetting:
    name: str
    config: Any  # the probe class's own Config


@dataclass(frozen=True)
class AgentConfig:
    hub: str
    host: str
    interval: float
    mqtt: MqttConfig
    buffer: BufferConfig
    probes: tuple[ProbeSetting, ...]
    probe_timeout: float
    ups_poll: float = 2.0             # UPS probes are read this often for power events
    publish: PublishConfig = PublishConfig()
    clock: ClockConfig = ClockConfig()


def default_host() -> str:
    """The machine's short host name, lower-cased and reduced to the host pattern."""
    name = socket.gethostname().split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", name).strip("-_") or "host"
    return name[:63]


def parse_mqtt(section: Section) -> MqttConfig:
    """The ``mqtt`` section (shared with the collector's config)."""
    url = section.str("url", MqttConfig.url)
    host, port, tls = MqttConfig.host, MqttConfig.port, False
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            section.problem("url", f"{url!r} must start with mqtt:// or mqtts://")
        else:
            tls = parts.scheme == "mqtts"
            try:
                port = parts.port or (8883 if tls else 1883)
            except ValueError:
                section.problem("url", f"{url!r} has an invalid port")
            if not parts.hostname:
                section.problem("url", f"{url!r} names no host")
            else:
                host = parts.hostname
            if parts.password:
                section.problem("url", "do not put a password in the URL; use password_file")
    prefix = section.str("topic_prefix", MqttConfig.topic_prefix)
    if prefix is not None:
        try:
            check_prefix(prefix)
        except ValueError as exc:
            section.problem("topic_prefix", str(exc))
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = section.path_value(key, None)
        if value is not None and not value.is_file():
            section.problem(key, f"{value} is not a readable file")
        files[key] = value
    return MqttConfig(
        url=url or MqttConfig.url, host=host, port=port, tls=tls,
        username=section.str("username", None),
        password=section.secret("password"),
        topic_prefix=prefix or MqttConfig.topic_prefix,
        keepalive=section.duration("keepalive", MqttConfig.keepalive, minimum=5, maximum=3600),
        session_expiry=section.duration("session_expiry", MqttConfig.session_expiry, minimum=0, maximum=2**32 - 2),
        reconnect_min=section.duration("reconnect_min", MqttConfig.reconnect_min, minimum=0.1, maximum=3600),
        reconnect_max=section.duration("reconnect_max", MqttConfig.reconnect_max, minimum=0.1, maximum=86400),
        auth_retry=section.duration("auth_retry", MqttConfig.auth_retry, minimum=1, maximum=86400),
        **files,
    )


def _build(root: Section) -> AgentConfig:
    hub = root.str("hub", pattern=ID_PATTERN)
    host = root.str("host", None, pattern=ID_PATTERN) or default_host()
    interval = root.duration("interval", 10.0, minimum=0.1, maximum=3600)
    probe_timeout = root.duration("probe_timeout", None, minimum=0.1, maximum=600)
    mqtt = parse_mqtt(root.section("mqtt"))
    buffer_section = root.section("buffer")
    buffer = BufferConfig(
        path=buffer_section.path_value("path", str(BufferConfig.path)),
        max_mb=buffer_section.float("max_mb", BufferConfig.max_mb, minimum=1),
        batch_max_samples=buffer_section.int("batch_max_samples", BufferConfig.batch_max_samples,
                                             minimum=1, maximum=100_000),
        batch_max_bytes=buffer_section.int("batch_max_bytes", BufferConfig.batch_max_bytes,
                                           minimum=1024, maximum=MAX_DECOMPRESSED_BYTES // 2),
        batch_max_age=buffer_section.duration("batch_max_age", BufferConfig.batch_max_age, minimum=0, maximum=3600),
        resend_after=buffer_section.duration("resend_after", BufferConfig.resend_after, minimum=0.1, maximum=86400),
    )
    buffer_section.done()
    publish_section = root.section("publish")
    publish = PublishConfig(
        window=publish_section.int("window", PublishConfig.window, minimum=1, maximum=1000),
        max_unconfirmed=publish_section.int("max_unconfirmed", PublishConfig.max_unconfirmed, minimum=1,
                                            maximum=100_000),
        flush_timeout=publish_section.duration("flush_timeout", PublishConfig.flush_timeout, minimum=0, maximum=60),
    )
    publish_section.done()
    clock_section = root.section("clock")
    require_sync = clock_section.raw("require_sync", ClockConfig.require_sync)
    if require_sync != "auto" and not isinstance(require_sync, bool):
        clock_section.problem("require_sync", f"expected true, false or auto, got {require_sync!r}")
        require_sync = ClockConfig.require_sync
    clock = ClockConfig(
        require_sync=require_sync,
        max_step=clock_section.duration("max_step", ClockConfig.max_step, minimum=0.01, maximum=3600),
        settle=clock_section.duration("settle", ClockConfig.settle, minimum=0, maximum=86400),
    )
    clock_section.done()
    ups_poll = root.duration("ups_poll", 2.0, minimum=0.1, maximum=3600)

    probe_section = root.section("probes")
    settings = []
    for name in probe_section.keys():
        if name not in probes.REGISTRY:
            probe_section.problem(name, f"unknown probe (known: {', '.join(probes.REGISTRY)})")
            probe_section.raw(name)
            continue
        cls = probes.probe_class(name)
        settings.append(ProbeSetting(name, cls.parse_config(probe_section, name)))
    if not probe_section.keys():
        probe_section.problem(None, "no probes configured; the agent would measure nothing")
    root.done()

    if probe_timeout is None:
        # A probe must never hold the cycle: by default it gets most of one interval.
        probe_timeout = max(0.5, min(10.0, (interval or 10.0) * 0.8))
    order = list(probes.REGISTRY)
    settings.sort(key=lambda s: order.index(s.name))
    return AgentConfig(hub=hub, host=host, interval=interval, mqtt=mqtt, buffer=buffer,
                       probes=tuple(settings), probe_timeout=probe_timeout, ups_poll=ups_poll,
                       publish=publish, clock=clock)


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> AgentConfig:
    """Read and validate an agent config file; ConfigError lists every problem."""
    return load_config_file(path, _build, environ)


def parse(text: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return read_config(text, _build, "config", environ)
