"""Running the configured probes: all at once, each bounded by the probe timeout.

One slow or broken probe never holds the cycle or silences the others: it is reported as
an ``agent`` error sample and the rest still flows. A probe still stuck in its previous run
is not started again (threads cannot be killed; piling them up would leak).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from agent.config import AgentConfig
from agent.probes import ProbeContext, ProbeError, error_sample, probe_class
from agent.wire import Sample

log = logging.getLogger(__name__)


class ProbeRunner:
    def __init__(self, config: AgentConfig, context: ProbeContext):
        self._config = config
        self._context = context
        self._probes: list[tuple[str, Any]] = []
        self._broken: dict[str, BaseException] = {}
        for setting in config.probes:
            try:
                self._probes.append((setting.name, probe_class(setting.name)(setting.config, context)))
            except Exception as exc:  # e.g. a missing optional library: report every cycle
                log.error("probe %s cannot start: %s", setting.name, exc)
                self._broken[setting.name] = exc
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._probes)), thread_name_prefix="probe")
        self._running: dict[str, Future[list[Sample]]] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._probes] + list(self._broken)

    def run_once(self) -> list[Sample]:
        """One cycle: every probe's samples (tagged with hub and host), errors included."""
        now = self._context.clock_ns
        samples: list[Sample] = []
        started: dict[str, Future[list[Sample]]] = {}
        for name, probe in self._probes:
            previous = self._running.get(name)
            if previous is not None and not previous.done():
                samples.append(error_sample(name, ProbeError(
                    "timeout", f"probe {name} is still running its previous cycle"), now()))
                continue
            started[name] = self._running[name] = self._pool.submit(probe.collect)
        if started:
            wait(started.values(), timeout=self._config.probe_timeout)
        for name, future in started.items():
            if not future.done():
                log.warning("probe %s did not finish within %.1fs", name, self._config.probe_timeout)
                samples.append(error_sample(name, ProbeError(
                    "timeout", f"probe {name} did not finish within {self._config.probe_timeout:g}s"), now()))
                continue
            try:
                samples.extend(future.result())
            except Exception as exc:
                log.warning("probe %s failed: %s", name, exc)
                samples.append(error_sample(name, exc, now()))
        for name, exc in self._broken.items():
            samples.append(error_sample(name, exc, now()))
        return [s.with_tags(hub=self._config.hub, host=self._config.host) for s in samples]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for _, probe in self._probes:
            close = getattr(probe, "close", None)
            if close is not None:
                close()
