"""pytest fixtures: a real VictoriaMetrics (Debian ``victoria-metrics``) on loopback.

It stands in for an InfluxDB 2.x server: it accepts the v2 write API (``/api/v2/write``)
that ``influxdb-client`` speaks, so ``InfluxDBClient(url=vm.url, token="x", org="o")``
with any bucket writes into it. Read back through its Prometheus API.

Fixtures
--------
``victoria_factory(retention="100y", extra_args=()) -> VictoriaMetrics``
    A new server per call, storage in its own temp dir, HTTP on a free loopback port;
    stopped when the test ends.
``victoria -> VictoriaMetrics``
    One server with the defaults.

How VictoriaMetrics 1.79 stores InfluxDB line protocol (what assertions must expect):

- series name ``{measurement}_{field}``, tags become labels (``ups,hub=h1 load_percent=5``
  -> ``ups_load_percent{hub="h1"}``); the v2 ``bucket``/``org`` add no label;
- timestamps are kept in milliseconds;
- numbers and booleans (true -> 1) are stored; string field values are stored as 0.

Freshly written points are not searchable at once: ``/internal/force_flush`` is needed and
even then it takes up to about a second. So read with ``wait_export()``/``wait_query()``,
which flush and poll until the series appear. Started with ``-search.latencyOffset=0s`` and
``-search.disableCache`` so instant queries see the newest point.

Handle: ``.url``, ``.host``, ``.port``, ``.query(promql, at=None)`` -> result list,
``.export(match)`` -> list of ``{"metric": {...}, "values": [...], "timestamps": [...]}``,
``.wait_export(match, timeout=10)``, ``.wait_query(promql, timeout=10)``, ``.flush()``,
``.stop()``, ``.start()`` (same data), ``.kill()``, ``.pid``, ``.log_tail()``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest

from tests.services.common import LOOPBACK, ManagedService, ServiceFactory, ServiceProcess, free_port

VICTORIA_METRICS = "/usr/bin/victoria-metrics"


class VictoriaError(RuntimeError):
    """VictoriaMetrics answered with an error, or data did not show up in time."""


class VictoriaMetrics(ManagedService):
    """One ``victoria-metrics`` process, its storage in ``data_root/storage``."""

    def __init__(self, data_root: Path, *, retention: str = "100y", extra_args: Iterable[str] = ()):
        self.data_root = Path(data_root)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = free_port()
        self.storage_path = self.data_root / "storage"
        argv = [
            VICTORIA_METRICS,
            f"-storageDataPath={self.storage_path}",
            f"-httpListenAddr={self.host}:{self.port}",
            # points older than the retention are dropped silently: keep replayed history
            f"-retentionPeriod={retention}",
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
            *extra_args,
        ]
        self.process = ServiceProcess("victoria-metrics", argv, self.data_root)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _get(self, path: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> bytes:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            with error:
                detail = error.read().decode(errors="replace").strip()
            raise VictoriaError(f"GET {path} -> HTTP {error.code}: {detail}") from None

    def healthy(self) -> bool:
        return self._get("/health", timeout=0.5).strip() == b"OK"

    ready = healthy

    @property
    def ready_what(self) -> str:
        return f"healthy at {self.url}/health"

    def flush(self) -> None:
        """Ask the storage to make buffered points searchable (they may still need ~1 s)."""
        self._get("/internal/force_flush")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant PromQL/MetricsQL query at unix time ``at`` (default now); the ``data.result`` list
        (``[{"metric": {...}, "value": [unix_seconds, "string value"]}, ...]``)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = json.loads(self._get("/api/v1/query", params))
        if answer.get("status") != "success":
            raise VictoriaError(f"query {promql!r} failed: {answer}")
        return answer["data"]["result"]

    def export(self, match: str | Iterable[str]) -> list[dict[str, Any]]:
        """Raw stored points of the series a selector matches (e.g. ``'{__name__=~"ups_.*"}'``):
        one dict per series with ``metric`` (labels, ``__name__``), ``values``, ``timestamps`` (ms)."""
        matches = [match] if isinstance(match, str) else list(match)
        body = self._get("/api/v1/export", {"match[]": matches})
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def _wait(self, fetch: Callable[[], list], what: str, timeout: float, count: int) -> list:
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            found = fetch()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise VictoriaError(f"{what}: {len(found)} series after {timeout:g}s, wanted {count}\n"
                                    f"{self.log_tail()}")
            time.sleep(0.05)

    def wait_export(self, match: str | Iterable[str], timeout: float = 10.0, count: int = 1) -> list[dict[str, Any]]:
        """``export(match)`` once it returns at least ``count`` series (flushing meanwhile)."""
        return self._wait(lambda: self.export(match), f"export {match!r}", timeout, count)

    def wait_query(self, promql: str, timeout: float = 10.0, count: int = 1) -> list[dict[str, Any]]:
        """``query(promql)`` once it returns at least ``count`` series (flushing meanwhile)."""
        return self._wait(lambda: self.query(promql), f"query {promql!r}", timeout, count)

    def __repr__(self) -> str:
        return f"<VictoriaMetrics {self.url} pid={self.pid} dir={self.data_root}>"


@pytest.fixture
def victoria_factory(tmp_path) -> Iterator[ServiceFactory]:
    """Call with keyword options (see this module's docstring) to get a running VictoriaMetrics."""
    factory = ServiceFactory(tmp_path, VictoriaMetrics, 'victoria')
    yield factory
    factory.close()


@pytest.fixture
def victoria(victoria_factory) -> VictoriaMetrics:
    """A running VictoriaMetrics accepting the InfluxDB v2 write API at ``.url``."""
    return victoria_factory()
