"""``hubwatch-agent --once`` on this machine, and the runner's handling of failing probes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import config as agent_config
from agent import probes
from agent.catalogue import check_sample
from agent.probes import ProbeContext
from agent.runner import ProbeRunner
from agent.wire import Sample

REPO = Path(__file__).resolve().parent.parent


def agent_command() -> list[str]:
    import sys
    exe = Path(sys.executable).parent / "hubwatch-agent"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]


def test_once_prints_valid_samples_from_system_network_and_ping(tmp_path, emitted):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
hub: gilgit-sco-01
host: gw01
buffer: {{path: {tmp_path}/outbox.db}}
probes:
  system: {{}}
  network: {{interfaces: [lo, "eth*"]}}
  ping: {{targets: {{loopback: 127.0.0.1, nowhere: no-such-host.invalid}}, count: 2, timeout: 0.3s, tcp_port: 9}}
""")
    result = subprocess.run(agent_command() + ["--once", "-c", str(cfg)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    objs = [json.loads(line) for line in lines]
    for obj in objs:
        assert set(obj) == {"m", "t", "tags", "f"}
        assert obj["tags"]["hub"] == "gilgit-sco-01" and obj["tags"]["host"] == "gw01"
        assert abs(obj["t"] / 1e9 - time.time()) < 60
        assert not check_sample(obj["m"], obj["tags"], obj["f"]), obj
    samples = emitted(Sample.from_json(o) for o in objs)
    measurements = {s.measurement for s in samples}
    assert {"system", "net", "ping"} <= measurements, measurements
    pings = {s.tags["target"]: s.fields for s in samples if s.measurement == "ping"}
    assert pings["loopback"]["reachable"] is True and pings["nowhere"]["reachable"] is False
    assert any(s.measurement == "net" and s.tags["iface"] == "lo" for s in samples)


class _SlowProbe:
    """A probe that takes longer than the cycle allows (stands in for a hung device)."""

    name = "slow"
    measurements = ()

    class Config:
        pass

    def __init__(self, config, context):
        self.release = threading.Event()

    def collect(self):
        self.release.wait(5)
        return []


class _BrokenProbe:
    name = "broken"
    measurements = ()

    class Config:
        pass

    def __init__(self, config, context):
        pass

    def collect(self):
        raise OSError(5, "Input/output error reading the device")


def test_a_slow_and_a_broken_probe_do_not_stop_the_others(tmp_path, monkeypatch, emitted):
    monkeypatch.setitem(probes.REGISTRY, "slow", "tests.test_agent_cli:_SlowProbe")
    monkeypatch.setitem(probes.REGISTRY, "broken", "tests.test_agent_cli:_BrokenProbe")
    base = agent_config.parse("hub: h1\nhost: gw\nprobe_timeout: 0.3s\nprobes: {system: {}}\n", {})
    from dataclasses import replace
    cfg = replace(base, probes=base.probes + (agent_config.ProbeSetting("slow", None),
                                              agent_config.ProbeSetting("broken", None)))
    runner = ProbeRunner(cfg, ProbeContext(outbox_path=tmp_path / "o.db"))
    started = time.monotonic()
    samples = runner.run_once()
    assert time.monotonic() - started < 2.0, "the slow probe held the cycle"
    errors = {s.tags["probe"]: s.fields for s in samples if s.measurement == "agent"}
    assert errors["slow"]["error_kind"] == "timeout" and "0.3s" in errors["slow"]["error"]
    assert errors["broken"]["error_kind"] == "exception" and "Input/output error" in errors["broken"]["error"]
    assert any(s.measurement == "system" for s in samples)
    emitted(samples)
    # next cycle: the slow probe is still stuck and is not started a second time
    again = runner.run_once()
    assert any(s.tags.get("probe") == "slow" and "still running" in s.fields["error"] for s in again)
    runner.close()
