"""Agent config: validation names every problem by key path and line; env, secrets, durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.confload import ConfigError, Secret, parse_duration

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "agent.example.yaml"


def problems_of(text: str, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        agent_config.parse(text, environ or {})
    return [str(p) for p in info.value.problems]


def test_example_config_is_valid_and_has_the_contract_keys(tmp_path):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    text = EXAMPLE.read_text().replace("/etc/hubwatch/mqtt.password", str(password))
    cfg = agent_config.parse(text, {})
    assert cfg.hub == "gilgit-sco-01" and cfg.host == "gw01"
    assert cfg.interval == 10.0
    assert cfg.mqtt.port == 1883 and not cfg.mqtt.tls and cfg.mqtt.topic_prefix == "hubwatch"
    assert cfg.mqtt.password == Secret("s3cret")
    assert cfg.buffer.max_mb == 256
    # a minute of cycles shares a message: the wire budget (2 MB a day) holds by default
    assert cfg.buffer.batch_max_age == 60 == agent_config.parse("hub: h\nprobes: {system: {}}\n", {}).buffer.batch_max_age
    assert [p.name for p in cfg.probes] == ["system", "network", "ping", "nut", "snmp_ups", "battery"]


@pytest.mark.parametrize("text,seconds", [("10", 10), ("10s", 10), ("1.5s", 1.5), ("5m", 300),
                                          ("1h", 3600), ("250ms", 0.25), (7, 7)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_five_mistakes_are_all_reported_with_key_paths_and_lines():
    text = """\
hub: Gilgit SCO
interval: 10 minutes
mqtt:
  url: http://broker:1883
buffer:
  max_mb: lots
probes:
  system: {}
  ping:
    targets: {internet: 1.1.1.1}
    count: 0
"""
    problems = problems_of(text)
    assert len(problems) == 5, problems
    expected = [("hub (line 1)", "does not match"), ("interval (line 2)", "not a duration"),
                ("mqtt.url (line 4)", "mqtt://"), ("buffer.max_mb (line 6)", "expected a number"),
                ("probes.ping.count (line 11)", "below the minimum")]
    for (where, what), problem in zip(expected, problems):
        assert problem.startswith(where) and what in problem, (where, what, problem)


def test_unknown_keys_and_probes_are_named():
    problems = problems_of("hub: h1\nintervall: 5s\nprobes:\n  sytem: {}\n  network: {interfaces: [eth0], speed: 1}\n")
    assert any(p.startswith("intervall (line 2): unknown key") for p in problems)
    assert any(p.startswith("probes.sytem (line 4): unknown probe") for p in problems)
    assert any(p.startswith("probes.network.speed (line 5): unknown key") for p in problems)


def test_environment_expansion_and_defaults():
    text = "hub: ${HUB}\nhost: ${HOST_ID:-lab07}\ninterval: ${INTERVAL:-30s}\nprobes: {system: {}}\n"
    cfg = agent_config.parse(text, {"HUB": "skardu-01"})
    assert (cfg.hub, cfg.host, cfg.interval) == ("skardu-01", "lab07", 30.0)
    assert any("environment variable HUB is not set" in p for p in problems_of(text, {}))


def test_secret_file_is_read_and_never_shown(tmp_path):
    secret_file = tmp_path / "mqtt.password"
    secret_file.write_text("hunter2\n")
    cfg = agent_config.parse(f"hub: h\nmqtt: {{password_file: {secret_file}}}\nprobes: {{system: {{}}}}\n", {})
    assert cfg.mqtt.password.reveal() == "hunter2"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.mqtt)


def test_missing_secret_file_and_both_forms_are_errors(tmp_path):
    problems = problems_of(f"hub: h\nmqtt: {{password_file: {tmp_path}/absent}}\nprobes: {{system: {{}}}}\n")
    assert any(p.startswith("mqtt.password_file") and "cannot read" in p for p in problems)
    problems = problems_of(f"hub: h\nmqtt: {{password: a, password_file: {tmp_path}/x}}\nprobes: {{system: {{}}}}\n")
    assert any("either password or password_file" in p for p in problems)


def test_malformed_yaml_names_the_line():
    problems = problems_of("hub: h1\nprobes:\n  system: {\n  network: [\n")
    assert len(problems) == 1 and "not valid YAML" in problems[0] and "(line" in problems[0]


def test_no_probes_is_an_error():
    assert any("no probes configured" in p for p in problems_of("hub: h1\nprobes: {}\n"))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_check_command_prints_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("hub: BAD HUB\ninterval: -5s\nmqtt: {url: 'ftp://x', password: hunter2, topic_prefix: 'a/#'}\n"
                   "probes: {nut: [{name: ups1, port: 99999}], system: {}}\n")
    result = run_cli("--check", "-c", str(bad))
    assert result.returncode == 2
    lines = [l.strip() for l in result.stderr.splitlines() if l.startswith("  ")]
    assert [l.split(" ")[0] for l in lines] == ["hub", "interval", "mqtt.url", "mqtt.topic_prefix",
                                                "probes.nut[0].port"], result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_check_command_accepts_a_good_config(tmp_path):
    good = tmp_path / "agent.yaml"
    good.write_text("hub: gilgit-sco-01\nprobes: {system: {}}\n")
    result = run_cli("--check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli("--check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("hubwatch-agent ")
    assert "--once" in run_cli("--help").stdout
