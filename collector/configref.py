"""The configuration reference (docs/config.md), generated from the code that reads the
configuration, so it cannot drift: every key the agent's and the collector's config readers
ask for, with its kind and default. ``python -m collector.configref > docs/config.md``."""

from __future__ import annotations

from typing import Any

from agent import config as agent_config
from agent.confload import MISSING, Secret, config_keys
from collector import config as collector_config

#: A config naming every probe and every option family, so every key gets read.
AGENT_EVERYTHING = """
hub: h
probes:
  system: {}
  network: {}
  ping: {targets: {internet: {address: 1.1.1.1}}}
  nut: [{name: u}]
  snmp_ups: [{name: s, host: 127.0.0.1, version: v3, v3: {username: u}}]
  battery: {}
"""

COLLECTOR_EVERYTHING = """
alerts:
  rules: {on_battery: {}, battery_low: {}, runtime_low: {}, battery_aging: {}, hub_offline: {}}
  overrides: {somehub: {on_battery: {}}}
  notifiers:
    - {type: webhook, url: "http://x"}
    - {type: email, host: x, to: [a@b]}
"""


def _default(value: Any) -> str:
    if value is MISSING:
        return "**required**"
    if value is None:
        return "—"
    if isinstance(value, Secret):
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"`{value}`" if isinstance(value, str) else str(value)


def _table(keys: list[tuple[str, str, Any]]) -> list[str]:
    secrets = {path for path, kind, _ in keys if kind.startswith("secret")}
    keys = [k for k in keys if not (k[0].endswith("_file") and k[0][:-5] in secrets)]
    lines = ["| key | kind | default |", "|---|---|---|"]
    lines += [f"| `{path}` | {kind} | {_default(default)} |" for path, kind, default in keys]
    return lines


def leaf(path: str) -> str:
    """The last key of a path: ``probes.nut[0].port`` -> ``port``."""
    return path.rsplit(".", 1)[-1].split("[")[0]


def agent_keys() -> list[tuple[str, str, Any]]:
    return config_keys(AGENT_EVERYTHING, agent_config._build)


def collector_keys() -> list[tuple[str, str, Any]]:
    return config_keys(COLLECTOR_EVERYTHING, collector_config._build)


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the code that reads the configuration "
             "(`python -m collector.configref > docs/config.md`); a test keeps it in sync, and another "
             "checks that every key appears in the example files. `[0]` stands for any list entry.", "",
             "Durations accept `10`, `10s`, `5m`, `1h`, `1d` (defaults shown in seconds). `${VAR}` and "
             "`${VAR:-default}` expand from the environment. A secret `x` may instead be given as `x_file`, "
             "a file holding it.", "",
             "## Agent (`config/agent.example.yaml`)", ""]
    lines += _table(agent_keys())
    lines += ["", "## Collector (`config/collector.example.yaml`)", ""]
    lines += _table(collector_keys())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
