"""Running the real collector (as its own process) and feeding it real MQTT messages in tests."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent import wire
from agent.wire import Envelope, Sample
from tests.services.common import ServiceProcess

REPO = Path(__file__).resolve().parent.parent


def collector_command(config: Path) -> list[str]:
    exe = Path(sys.executable).parent / "hubwatch-collector"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "collector.cli"]
    return base + ["-c", str(config), "--log-level", "info"]


def write_collector_config(path: Path, broker, influx, *, database: str = "hubwatch", instance: str = "c1",
                           api: str = "v1", influx_url: str | None = None, username: str | None = None,
                           password: str | None = None, extra: str = "", mqtt: str = "", ingest: str = "") -> Path:
    """A collector config for these services; ``mqtt`` and ``ingest``: more ``key: value``
    lines for those sections, ``extra``: more top-level YAML."""
    credentials = ""
    if username:
        secret = path.parent / f"{instance}.mqtt.password"
        secret.write_text(password or "")
        credentials = f"\n  username: {username}\n  password_file: {secret}"
    if api == "v1":
        influx_block = f"""influxdb:
  url: {influx_url or influx.url}
  api: v1
  database: {database}
  create_database: true"""
    else:
        influx_block = f"""influxdb:
  url: {influx_url}
  api: v2
  bucket: {database}
  org: hubwatch
  token: test-token"""
    path.write_text(f"""instance: {instance}
mqtt:
  url: {broker.url}
  share_group: collectors{credentials}
{_indented(mqtt)}{influx_block}
ingest:
  batch_max_delay: 0.2s
  stats_interval: 1s
  max_retry_delay: 2s
{_indented(ingest)}dead_letter:
  path: {path.parent / (instance + '.deadletter.jsonl')}
{extra}""")
    return path


def _indented(lines: str) -> str:
    return "".join(f"  {line}\n" for line in lines.splitlines())


def start_collector(tmp_path: Path, broker, influx, **kw) -> ServiceProcess:
    instance = kw.get("instance", "c1")
    config = write_collector_config(tmp_path / f"collector-{instance}.yaml", broker, influx, **kw)
    proc = ServiceProcess(f"collector-{instance}", collector_command(config), tmp_path / f"run-{instance}")
    proc.start()
    proc.wait_until(lambda: "subscribed in share group" in proc.log_path.read_text(), 20, "subscribed")
    return proc


def envelope(hub: str, host: str, seq: int, samples: list[Sample]) -> bytes:
    return wire.encode(Envelope(hub, host, seq, time.time(), tuple(samples)))


def ups_samples(n: int, start_ns: int, ups: str = "hubups") -> list[Sample]:
    return [Sample("ups", start_ns + i * 1000, {"ups": ups, "source": "nut"},
                   {"battery_charge_percent": float(i % 100), "status": "OL", "on_line": True})
            for i in range(n)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, explain=None):
    """Poll ``predicate`` until truthy; AssertionError naming ``what`` (and ``explain()``) if not."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    detail = f"; {explain()}" if explain else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){detail}")


def count_points(influx, db: str, measurement: str, where: str = "") -> int:
    rows = influx.rows(f'SELECT count(*) FROM "{measurement}" {where}', db=db)
    if not rows:
        return 0
    return max((v for k, v in rows[0].items() if k.startswith("count_") and v is not None), default=0)


def agent_command(config: Path) -> list[str]:
    exe = Path(sys.executable).parent / "hubwatch-agent"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    return base + ["-c", str(config), "--log-level", "info"]


def write_agent_config(path: Path, broker_url: str, hub: str, host: str, probes: str, *, interval: str = "1s",
                       extra: str = "") -> Path:
    path.write_text(f"""hub: {hub}
host: {host}
interval: {interval}
ups_poll: 0.5s
mqtt:
  url: {broker_url}
  keepalive: 5s
  reconnect_min: 0.2s
  reconnect_max: 1s
buffer:
  path: {path.parent / (hub + '-' + host + '.outbox.db')}
  resend_after: 5s
  batch_max_age: 0s
clock:
  require_sync: false
probes:
{probes}
{extra}""")
    return path


def start_agent(tmp_path: Path, broker_url: str, hub: str, host: str, probes: str, **kw) -> ServiceProcess:
    config = write_agent_config(tmp_path / f"agent-{hub}-{host}.yaml", broker_url, hub, host, probes, **kw)
    proc = ServiceProcess(f"agent-{hub}-{host}", agent_command(config), tmp_path / f"run-agent-{hub}-{host}")
    proc.start()
    proc.wait_until(lambda: "agent started" in proc.log_path.read_text(), 20, "started")
    return proc
