"""The docker-compose central stack (no Docker engine runs here: these check what can be
checked without one — every file it mounts exists, its configs match the shipped ones, and
the collector config it uses is valid)."""

from __future__ import annotations

from pathlib import Path

import yaml

from collector import config as collector_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_mounted_file_exists_in_the_repository():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.endswith(".password"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"
    assert (REPO / "Dockerfile").exists()


def _policy(path: Path) -> list[str]:
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    return [l for l in lines if l.split()[0] not in ("listener", "certfile", "keyfile", "cafile", "tls_version")]


def test_compose_broker_has_the_shipped_policy():
    assert _policy(REPO / "deploy/docker/mosquitto.conf") == _policy(REPO / "config/mosquitto/hubwatch.conf")


def test_compose_grafana_datasource_differs_only_in_the_url():
    shipped = yaml.safe_load((REPO / "dashboards/provisioning/datasources/hubwatch.yaml").read_text())
    compose = yaml.safe_load((REPO / "deploy/docker/grafana-datasource.yaml").read_text())
    assert compose["datasources"][0].pop("url") == "http://influxdb:8086"
    shipped["datasources"][0].pop("url")
    assert compose == shipped


def test_compose_collector_config_is_valid(tmp_path):
    text = (REPO / "deploy/docker/collector.yaml").read_text()
    secret = tmp_path / "pw"
    secret.write_text("x")
    cfg = collector_config.parse(text.replace("/etc/hubwatch/collector.mqtt.password", str(secret)), {})
    assert cfg.mqtt.host == "mosquitto" and cfg.influxdb.url == "http://influxdb:8086"
