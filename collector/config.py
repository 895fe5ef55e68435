"""The collector's configuration (``config/collector.example.yaml`` shows every key)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from agent.config import MqttConfig, parse_mqtt
from agent.confload import Secret, Section, load_config_file, read_config
from agent.wire import ID_PATTERN
from collector.alerts import DEFAULT_RULES, RULES, RuleConfig, rules_with_overrides
from collector.notify import EmailConfig, WebhookConfig
from collector.outages import OutageParams

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
class OutagesConfig:
    enabled: bool = True
    params: OutageParams = OutageParams()
    window: float = 6 * 3600.0
    recompute_interval: float = 30.0
    refresh: float = 60.0


@dataclass(frozen=True)
class AlertsConfig:
    enabled: bool = True
    topic: str = "hubwatch/alerts"
    interval: float = 5.0
    rules: Mapping[str, RuleConfig] = field(default_factory=lambda: dict(DEFAULT_RULES))
    overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    webhooks: tuple[WebhookConfig, ...] = ()
    emails: tuple[EmailConfig, ...] = ()

    def rules_for(self, hub: str) -> dict[str, RuleConfig]:
        return rules_with_overrides(dict(self.rules), dict(self.overrides.get(hub, {})))


@dataclass(frozen=True)
class CollectorConfig:
    instance: str
    mqtt: MqttConfig
    share_group: str
    client_id: str
    influxdb: InfluxConfig
    ingest: IngestConfig
    dead_letter: DeadLetterConfig
    outages: OutagesConfig = OutagesConfig()
    alerts: AlertsConfig = AlertsConfig()


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
    outages = _outages(root.section("outages"))
    alerts = _alerts(root.section("alerts"), mqtt.topic_prefix)
    root.done()
    return CollectorConfig(instance=instance or default_instance, mqtt=mqtt, share_group=share_group or "hubwatch",
                           client_id=client_id, influxdb=influx, ingest=ingest, dead_letter=dead_letter,
                           outages=outages, alerts=alerts)


def _outages(section: Section) -> OutagesConfig:
    d = OutageParams()
    params = OutageParams(
        min_power_s=section.duration("min_power_s", d.min_power_s, minimum=0),
        agent_interval_s=section.duration("agent_interval", d.agent_interval_s, minimum=0.1),
        silence_intervals=section.float("silence_intervals", d.silence_intervals, minimum=1),
        agent_batch_max_age_s=section.duration("agent_batch_max_age", d.agent_batch_max_age_s, minimum=0),
        low_charge_percent=section.float("low_charge_percent", d.low_charge_percent, minimum=0, maximum=100),
        gateway_hosts=section.str_list("gateway_hosts", d.gateway_hosts),
        internet_targets=section.str_list("internet_targets", d.internet_targets),
    )
    config = OutagesConfig(
        enabled=section.bool("enabled", True), params=params,
        window=section.duration("window", "6h", minimum=60),
        recompute_interval=section.duration("recompute_interval", 30.0, minimum=0.1),
        refresh=section.duration("refresh", 60.0, minimum=1),
    )
    section.done()
    return config


# rule -> (config key of its threshold, its unit)
_THRESHOLD_KEYS = {"battery_low": "threshold_percent", "runtime_low": "threshold_minutes", "battery_aging": "factor"}


def _rule(section: Section, name: str, base: RuleConfig, partial: bool) -> dict[str, Any]:
    """A rule's settings; with ``partial`` only the keys given (for per-hub overrides)."""
    values: dict[str, Any] = {}
    def take(key: str, attr: str, reader, *args, **kw):
        if partial and not section.has(key):
            return
        values[attr] = reader(key, getattr(base, attr), *args, **kw)
    take("enabled", "enabled", section.bool)
    take("severity", "severity", section.str, choices=("info", "warning", "critical"))
    take("renotify", "renotify_s", section.duration, minimum=1)
    if name in ("on_battery", "hub_offline"):
        take("debounce", "debounce_s", section.duration, minimum=0)
    if name in _THRESHOLD_KEYS:
        take(_THRESHOLD_KEYS[name], "threshold", section.float, minimum=0)
    if name in ("runtime_low", "battery_aging"):
        take("window", "window_s", section.duration, minimum=10)
    section.done()
    return {k: v for k, v in values.items() if v is not None}


def _alerts(section: Section, prefix: str) -> AlertsConfig:
    from dataclasses import replace

    rules_section = section.section("rules")
    rules = dict(DEFAULT_RULES)
    for name in rules_section.keys():
        if name not in RULES:
            rules_section.problem(name, f"unknown rule (known: {', '.join(RULES)})")
            rules_section.raw(name)
            continue
        rules[name] = replace(rules[name], **_rule(rules_section.section(name), name, rules[name], False))
    overrides: dict[str, dict[str, dict[str, Any]]] = {}
    over_section = section.section("overrides")
    for hub in over_section.keys():
        hub_section = over_section.section(hub)
        if not ID_PATTERN.fullmatch(hub):
            over_section.problem(hub, f"{hub!r} is not a hub id")
        for name in hub_section.keys():
            if name not in RULES:
                hub_section.problem(name, f"unknown rule (known: {', '.join(RULES)})")
                hub_section.raw(name)
                continue
            overrides.setdefault(hub, {})[name] = _rule(hub_section.section(name), name, rules[name], True)
        hub_section.done()
    webhooks, emails = [], []
    for notifier in section.sections("notifiers"):
        kind = notifier.str("type", choices=("webhook", "email"))
        if kind == "webhook":
            url = notifier.str("url")
            if url is not None and urlsplit(url).scheme not in ("http", "https"):
                notifier.problem("url", f"{url!r} must start with http:// or https://")
            headers = {}
            for key, value in notifier.section("headers").items():
                headers[str(key)] = str(value)
            webhooks.append(WebhookConfig(url or "", timeout=notifier.duration("timeout", 5.0, minimum=0.1),
                                          headers=tuple(headers.items()),
                                          max_attempts=notifier.int("max_attempts", 8, minimum=1)))
        elif kind == "email":
            recipients = notifier.str_list("to")
            emails.append(EmailConfig(
                host=notifier.str("host"), port=notifier.int("port", 587, minimum=1, maximum=65535),
                starttls=notifier.bool("starttls", True), username=notifier.str("username", None),
                password=notifier.secret("password"), sender=notifier.str("from", "hubwatch@localhost"),
                recipients=recipients or (), ca_file=notifier.str("ca_file", None),
                timeout=notifier.duration("timeout", 10.0, minimum=0.1),
                max_attempts=notifier.int("max_attempts", 8, minimum=1)))
        notifier.done()
    config = AlertsConfig(
        enabled=section.bool("enabled", True),
        topic=section.str("topic", f"{prefix}/alerts"),
        interval=section.duration("interval", 5.0, minimum=0.1),
        rules=rules, overrides=overrides, webhooks=tuple(webhooks), emails=tuple(emails))
    section.done()
    return config


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> CollectorConfig:
    return load_config_file(path, _build, environ)


def parse(text: str, environ: dict[str, str] | None = None) -> CollectorConfig:
    return read_config(text, _build, "config", environ)
