"""Probes: one module each, one class each, registered by name.

A probe class has:

- ``name``: its key under ``probes:`` in the agent config;
- ``measurements``: the catalogue measurements it emits (the catalogue test holds it to them);
- a nested frozen ``Config`` dataclass and ``parse_config(parent, key) -> Config``, which
  reads ``parent[key]`` from the config (reporting problems by key path);
- ``__init__(config, context)`` and ``collect() -> list[Sample]``.

``collect`` returns the probe's samples, plus an ``agent`` error sample for each target that
failed (one bad UPS must not hide the others). An exception escaping ``collect`` is turned
into an error sample by the runner. Probes are imported only when configured, so the SNMP
libraries load only for an ``snmp_ups`` probe.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from agent.wire import Sample

#: name -> "module:Class". Order is the order probes run and print in.
REGISTRY: dict[str, str] = {
    "system": "agent.probes.system:SystemProbe",
    "network": "agent.probes.network:NetworkProbe",
    "ping": "agent.probes.ping:PingProbe",
    "nut": "agent.probes.nut:NutProbe",
    "snmp_ups": "agent.probes.snmp_ups:SnmpUpsProbe",
    "battery": "agent.probes.battery:BatteryProbe",
}


class ProbeError(Exception):
    """A probe (or one of its targets) could not be read. ``kind`` is one of catalogue.ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProbeContext:
    """What probes may need from their surroundings; the roots and clock are test seams."""

    outbox_path: Path = Path("/var/lib/hubwatch/outbox.db")
    proc_root: Path = Path("/proc")
    sys_root: Path = Path("/sys")
    clock_ns: Callable[[], int] = field(default=time.time_ns)
    timeout: float = 5.0


class Probe(Protocol):
    name: ClassVar[str]
    measurements: ClassVar[tuple[str, ...]]

    def collect(self) -> list[Sample]: ...


def probe_class(name: str) -> Any:
    """The class registered as ``name`` (imports its module); KeyError when unknown."""
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def error_sample(probe: str, error: ProbeError | BaseException, time_ns: int,
                 target: str | None = None) -> Sample:
    """The ``agent`` point that says probe ``probe`` (for ``target``) failed, and why."""
    if isinstance(error, ProbeError):
        kind, message = error.kind, str(error)
    elif isinstance(error, TimeoutError):
        kind, message = "timeout", str(error) or "timed out"
    elif isinstance(error, ConnectionRefusedError):
        kind, message = "connection_refused", str(error) or "connection refused"
    else:
        kind, message = "exception", f"{type(error).__name__}: {error}"
    tags = {"probe": probe}
    if target is not None:
        tags["target"] = target
    return Sample("agent", time_ns, tags, {"error": message[:1000], "error_kind": kind})
