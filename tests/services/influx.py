"""pytest fixtures: a real InfluxDB 1.x (``influxd`` from Debian's ``influxdb``) on loopback.

Fixtures
--------
``influx_factory(auth=False, admin_user="admin", admin_password="admin-secret", http_log=False)
-> InfluxServer``
    A new ``influxd`` per call: meta, data and wal in its own temp dir, HTTP on a free
    loopback port, the RPC (backup) service on another. With ``auth=True`` the HTTP API
    requires credentials and an admin user is created; the handle's own calls use it.
    Every server is stopped when the test ends.

``influx -> InfluxServer``
    One server without auth.

Start-up takes about 30 ms here, so every test gets its own server: no session-scoped
server is needed. ``fresh_database()`` still gives a uniquely named database when one test
wants several.

Handle: ``.url`` (``http://127.0.0.1:PORT``), ``.host``, ``.port``, ``.rpc_port``,
``.query(influxql, db=None, epoch="ns")`` -> the ``results`` list of the JSON answer,
``.rows(influxql, db=...)`` -> flat list of dicts (tags included), ``.create_database(name)``,
``.fresh_database(prefix)``, ``.write(db, lines, precision="ns")``, ``.stop()``,
``.start()`` (same data), ``.kill()`` (SIGKILL), ``.restart()``, ``.pid``, ``.log_tail()``.
Failed requests raise ``InfluxError`` with the server's message.
"""

from __future__ import annotations

import base64
import itertools
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from tests.services.common import LOOPBACK, ManagedService, ServiceFactory, ServiceProcess, free_port

INFLUXD = "/usr/bin/influxd"


class InfluxError(RuntimeError):
    """InfluxDB answered with an error (HTTP status or an ``error`` in a result)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


class InfluxServer(ManagedService):
    """One ``influxd`` process, everything it stores under ``data_root``."""

    def __init__(self, data_root: Path, *, auth: bool = False, admin_user: str = "admin",
                 admin_password: str = "admin-secret", http_log: bool = False):
        self.data_root = Path(data_root)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = free_port()
        self.rpc_port = free_port()
        self.auth = auth
        self.username = admin_user if auth else None
        self.password = admin_password if auth else None
        self.config_path = self.data_root / "influxdb.conf"
        self.config_path.write_text(self._config(http_log))
        self.process = ServiceProcess("influxd", [INFLUXD, "-config", str(self.config_path)], self.data_root)
        self._names = itertools.count(1)
        self._admin_created = False

    def _config(self, http_log: bool) -> str:
        def q(value: object) -> str:
            return json.dumps(str(value))  # a TOML basic string

        return f"""\
# written by tests/services/influx.py
# Debian's build knows 'reporting-enabled' (off by default); upstream's key is 'reporting-disabled'.
reporting-enabled = false
reporting-disabled = true
bind-address = {q(f"{self.host}:{self.rpc_port}")}

[meta]
  dir = {q(self.data_root / "meta")}
  logging-enabled = false

[data]
  dir = {q(self.data_root / "data")}
  wal-dir = {q(self.data_root / "wal")}
  query-log-enabled = false

[monitor]
  # no _internal database: SHOW DATABASES lists only what tests made
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = {q(f"{self.host}:{self.port}")}
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = {"true" if http_log else "false"}
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  log-enabled = false
"""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ping(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout=0.5)
        return status == 204

    ready = ping

    @property
    def ready_what(self) -> str:
        return f"answering GET {self.url}/ping with 204"

    def _after_start(self) -> None:
        if self.auth and not self._admin_created:
            # With auth on and no users yet, influxd accepts exactly this statement unauthenticated.
            self._request("POST", "/query", {"q": f"CREATE USER {_ident(self.username)} WITH PASSWORD "
                                                   f"{_string(self.password)} WITH ALL PRIVILEGES"},
                          credentials=False)
            self._admin_created = True

    def _request(self, method: str, path: str, params: dict[str, str], body: bytes | None = None,
                 credentials: bool = True, expect: tuple[int, ...] = (200, 204)) -> bytes:
        headers = {}
        if credentials and self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if body is not None:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        status, answer = _http(method, f"{self.url}{path}?{urllib.parse.urlencode(params)}", body, headers)
        if status not in expect:
            raise InfluxError(f"{method} {path} -> HTTP {status}: {answer.decode(errors='replace').strip()}", status)
        return answer

    def query(self, influxql: str, db: str | None = None, epoch: str | None = "ns") -> list[dict[str, Any]]:
        """Run InfluxQL; the parsed ``results`` list (one dict per statement, each with
        ``series`` when rows matched). Times are integers in ``epoch`` units (``None``: RFC 3339).
        Raises ``InfluxError`` if any statement failed."""
        params = {"q": influxql}
        if db:
            params["db"] = db
        if epoch:
            params["epoch"] = epoch
        read_only = influxql.lstrip().upper().startswith(("SELECT", "SHOW"))
        answer = json.loads(self._request("GET" if read_only else "POST", "/query", params))
        if "error" in answer:
            raise InfluxError(answer["error"])
        results = answer.get("results", [])
        for result in results:
            if "error" in result:
                raise InfluxError(f"{influxql!r}: {result['error']}")
        return results

    def rows(self, influxql: str, db: str | None = None, epoch: str | None = "ns") -> list[dict[str, Any]]:
        """All rows of all series of the first statement, as dicts: ``{"time": ..., column: value,
        tag: value (from GROUP BY), "name": measurement}``."""
        out = []
        for series in (self.query(influxql, db, epoch)[0].get("series") or []):
            for values in series.get("values", []):
                row = {"name": series.get("name"), **series.get("tags", {})}
                row.update(zip(series["columns"], values))
                out.append(row)
        return out

    def create_database(self, name: str) -> str:
        self.query(f"CREATE DATABASE {_ident(name)}")
        return name

    def fresh_database(self, prefix: str = "test") -> str:
        """Create a database with a name no other call used; returns the name."""
        return self.create_database(f"{prefix}_{next(self._names)}")

    def databases(self) -> list[str]:
        return [row["name"] for row in self.rows("SHOW DATABASES")]

    def write(self, db: str, lines: str | bytes | Iterable[str], precision: str = "ns",
              retention_policy: str | None = None) -> None:
        """Write line protocol through the v1 ``/write`` API; raises ``InfluxError`` unless 204."""
        if isinstance(lines, str):
            body = lines.encode()
        elif isinstance(lines, bytes):
            body = lines
        else:
            body = "\n".join(lines).encode()
        params = {"db": db, "precision": precision}
        if retention_policy:
            params["rp"] = retention_policy
        self._request("POST", "/write", params, body, expect=(204,))

    def __repr__(self) -> str:
        return f"<InfluxServer {self.url} pid={self.pid} dir={self.data_root}>"


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture
def influx_factory(tmp_path) -> Iterator[ServiceFactory]:
    """Call with keyword options (see this module's docstring) to get a running influxd."""
    factory = ServiceFactory(tmp_path, InfluxServer, 'influxd')
    yield factory
    factory.close()


@pytest.fixture
def influx(influx_factory) -> InfluxServer:
    """A running influxd 1.x without auth: ``.url``, ``.query()``, ``.write()``, ``.create_database()``."""
    return influx_factory()
