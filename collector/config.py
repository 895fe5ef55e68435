"""The collector's configuration (``config/collector.example.yaml`` shows every key)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.config import MqttConfig, parse_mqtt
from agent.confload import Secret, Section, load_config_file, read_config

DEFAULT_CONFIG_PATH = "/etc/hubwatch/collector.yaml"
_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class InfluxConfig:
    url: str = "http://127.0.0.1:8086"
    api: str = "v1"
    database: str = "hubwatch"
    retention_policy: str | None = None
    bucket: str = "hubwatch"
    org: str = "hubwatch"
    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    timeout: float = 10.0
    gzip: bool = True
    create_database: bool = False


@dataclass(frozen=True)
class IngestConfig:
    batch_max_points: int = 5000
    batch_max_delay: float = 0.5
    receive_maximum: int = 1000
    session_expiry: float = 86400.0
    max_retry_delay: float = 30.0
    stats_interval: float = 10.0


@dataclass(frozen=True)
class DeadLetterConfig:
    path: Path = Path("/var/lib/hubwatch/deadletter.jsonl")
    max_mb: float = 64.0


@dataclass(frozen=True)
class CollectorConfig:
    instance: str
    mqtt: MqttConfig
    share_group: str
    client_id: str
    influxdb: InfluxConfig
    ingest: IngestConfig
    dead_letter: DeadLetterConfig


def _influx(section: Section) -> InfluxConfig:
    url = section.str("url", InfluxConfig.url)
    if url is not None and urlsplit(url).scheme not in ("http", "https"):
        section.problem("url", f"{url!r} must start with http:// or https://")
    api = section.str("api", "v1", choices=("v1", "v2"))
    config = InfluxConfig(
        url=url or InfluxConfig.url, api=api or "v1",
        database=section.str("database", InfluxConfig.database),
        retention_policy=section.str("retention_policy", None),
        bucket=section.str("bucket", InfluxConfig.bucket),
        org=section.str("org", InfluxConfig.org),
        username=section.str("username", None),
        password=section.secret("password"),
        token=section.secret("token"),
        timeout=section.duration("timeout", 10.0, minimum=0.5, maximum=300),
        gzip=section.bool("gzip", True),
        create_database=section.bool("create_database", False),
    )
    if config.api == "v2" and config.token is None and config.username is None:
        section.problem("token", "api v2 needs token (or token_file), or username and password")
    section.done()
    return config


def _build(root: Section) -> CollectorConfig:
    default_instance = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().split(".")[0].lower()) or "collector"
    instance = root.str("instance", default_instance, pattern=re.compile(r"[a-z0-9][a-z0-9_-]{0,62}"))
    mqtt_section = root.section("mqtt")
    share_group = mqtt_section.str("share_group", "hubwatch-collectors", pattern=_GROUP)
    client_id = mqtt_section.str("client_id", None) or f"hubwatch-collector-{instance}"
    mqtt = parse_mqtt(mqtt_section)
    mqtt_section.done()
    influx = _influx(root.section("influxdb"))
    ingest_section = root.section("ingest")
    ingest = IngestConfig(
        batch_max_points=ingest_section.int("batch_max_points", 5000, minimum=1, maximum=100_000),
        batch_max_delay=ingest_section.duration("batch_max_delay", 0.5, minimum=0.01, maximum=60),
        receive_maximum=ingest_section.int("receive_maximum", 1000, minimum=1, maximum=65535),
        session_expiry=ingest_section.duration("session_expiry", "1d", minimum=0, maximum=2**32 - 1),
        max_retry_delay=ingest_section.duration("max_retry_delay", 30.0, minimum=0.1, maximum=3600),
        stats_interval=ingest_section.duration("stats_interval", 10.0, minimum=0.1, maximum=3600),
    )
    ingest_section.done()
    dl_section = root.section("dead_letter")
    dead_letter = DeadLetterConfig(
        path=dl_section.path_value("path", str(DeadLetterConfig.path)),
        max_mb=dl_section.float("max_mb", 64.0, minimum=0.01),
    )
    dl_section.done()
    root.done()
    return CollectorConfig(instance=instance or default_instance, mqtt=mqtt, share_group=share_group or "hubwatch",
                           client_id=client_id, influxdb=influx, ingest=ingest, dead_letter=dead_letter)


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> CollectorConfig:
    return load_config_file(path, _build, environ)


def parse(text: str, environ: dict[str, str] | None = None) -> CollectorConfig:
    return read_config(text, _build, "config", environ)
