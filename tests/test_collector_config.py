"""Collector config: the example validates; mistakes are named by key path; --check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.confload import ConfigError
from collector import config as collector_config

REPO = Path(__file__).resolve().parent.parent


def test_example_is_valid(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("pw")
    text = (REPO / "config" / "collector.example.yaml").read_text().replace(
        "/etc/hubwatch/collector.mqtt.password", str(secret)).replace("/etc/hubwatch/smtp.password", str(secret))
    cfg = collector_config.parse(text, {})
    assert cfg.instance == "c1" and cfg.share_group == "hubwatch-collectors"
    assert cfg.influxdb.api == "v1" and cfg.influxdb.database == "hubwatch"
    assert cfg.ingest.session_expiry == 86400 and cfg.ingest.batch_max_delay == 0.5


def test_mistakes_are_named():
    with pytest.raises(ConfigError) as info:
        collector_config.parse("mqtt: {share_group: 'a b'}\ninfluxdb: {url: 'ftp://x', api: v3}\n"
                               "ingest: {batch_max_points: 0}\n", {})
    paths = [p.path for p in info.value.problems]
    assert paths == ["mqtt.share_group", "influxdb.url", "influxdb.api", "ingest.batch_max_points"]


def test_v2_needs_a_token():
    with pytest.raises(ConfigError) as info:
        collector_config.parse("influxdb: {api: v2}\n", {})
    assert "token" in str(info.value)


def test_check_command(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("instance: c9\ninfluxdb: {token: hunter2, api: v2}\n")
    result = subprocess.run([sys.executable, "-m", "collector.cli", "--check", "-c", str(good)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "instance=c9" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("influxdb: {urll: x}\n")
    result = subprocess.run([sys.executable, "-m", "collector.cli", "--check", "-c", str(bad)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "influxdb.urll (line 1): unknown key" in result.stderr
