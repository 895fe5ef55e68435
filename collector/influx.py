"""Writing line protocol to InfluxDB: the v1 ``/write`` API, or the v2 API via influxdb-client.

A writer either writes a batch (perhaps minus points InfluxDB refused one by one) or raises:

- :class:`InfluxUnavailable` — down, timing out, 5xx: try the same batch again later;
- :class:`InfluxRefused` — credentials or database wrong: also retried (an engineer may fix
  it while we wait), but logged as what it is.

A batch InfluxDB rejects as unparseable is split in halves until the bad points are alone,
so one bad line never costs the batch around it.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode, urlsplit

from collector.config import InfluxConfig

log = logging.getLogger(__name__)

_CONFLICT = re.compile(r'input field "(?P<field>[^"]+)" on measurement "(?P<measurement>[^"]+)"')
_DROPPED = re.compile(r"dropped=(\d+)")


class InfluxUnavailable(Exception):
    """Try again later."""


class InfluxRefused(Exception):
    """Credentials, permissions or database are wrong; retrying helps only once someone fixes it."""


@dataclass
class LineRejection:
    line: str
    reason: str
    detail: str


@dataclass
class WriteOutcome:
    written: int = 0
    rejected: list[LineRejection] = field(default_factory=list)
    dropped_unidentified: int = 0  # refused by InfluxDB in a partial write, lines not identifiable


def _measurement_and_fields(line: str) -> tuple[str, str]:
    head, _, rest = line.partition(" ")
    return head.split(",", 1)[0], rest


def _split_write(lines: list[str], send: Callable[[list[str]], tuple[int, str]], outcome: WriteOutcome) -> None:
    """Write ``lines``; on a 400 that is not a partial write, bisect to isolate the bad lines."""
    status, body = send(lines)
    try:  # InfluxDB answers {"error": "..."}; read the message itself
        body = json.loads(body).get("error", body) if body.startswith("{") else body
    except ValueError:
        pass
    if status in (200, 204):
        outcome.written += len(lines)
        return
    if status == 400 and "partial write" in body:
        dropped = int(m.group(1)) if (m := _DROPPED.search(body)) else 0
        conflict = _CONFLICT.search(body)
        culprits = []
        if conflict:
            field_name, measurement = conflict.group("field"), conflict.group("measurement")
            culprits = [l for l in lines if _measurement_and_fields(l)[0] == measurement
                        and re.search(rf"(^|[ ,]){re.escape(field_name)}=", _measurement_and_fields(l)[1])]
        reason = "type_conflict" if "type conflict" in body else "influx_partial"
        detail = body.strip()[:300]
        identified = culprits[:dropped] if dropped else culprits
        outcome.rejected.extend(LineRejection(l, reason, detail) for l in identified)
        outcome.dropped_unidentified += max(0, dropped - len(identified))
        outcome.written += len(lines) - max(dropped, len(identified))
        return
    if status in (400, 413, 422):
        if len(lines) == 1:
            outcome.rejected.append(LineRejection(lines[0], "influx_rejected", body.strip()[:300]))
            return
        middle = len(lines) // 2
        _split_write(lines[:middle], send, outcome)
        _split_write(lines[middle:], send, outcome)
        return
    if status in (401, 403):
        raise InfluxRefused(f"InfluxDB refused the credentials ({status}): {body.strip()[:200]}")
    if status == 404:
        raise InfluxRefused(f"InfluxDB: {body.strip()[:200] or 'not found'} (does the database exist?)")
    raise InfluxUnavailable(f"InfluxDB answered {status}: {body.strip()[:200]}")


class V1Writer:
    """``POST /write`` of InfluxDB 1.x (also 2.x/3.x v1 compatibility), gzip, keep-alive."""

    def __init__(self, config: InfluxConfig):
        self._config = config
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (8086 if not self._https else 443)
        self._base = parts.path.rstrip("/")
        query = {"db": config.database, "precision": "ns"}
        if config.retention_policy:
            query["rp"] = config.retention_policy
        self._path = f"{self._base}/write?{urlencode(query)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if config.gzip:
            self._headers["Content-Encoding"] = "gzip"
        if config.username:
            password = config.password.reveal() if config.password else ""
            token = base64.b64encode(f"{config.username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        elif config.token:
            self._headers["Authorization"] = f"Token {config.token.reveal()}"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._config.timeout)
        return self._conn

    def _send(self, lines: list[str]) -> tuple[int, str]:
        body = ("\n".join(lines) + "\n").encode()
        if self._config.gzip:
            body = gzip.compress(body, compresslevel=1)
        for attempt in (1, 2):  # a keep-alive connection the server closed is retried once
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                response = conn.getresponse()
                text = response.read().decode("utf-8", "replace")
                return response.status, text
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or isinstance(exc, (socket.timeout, ConnectionRefusedError)):
                    raise InfluxUnavailable(f"cannot reach InfluxDB at {self._config.url}: {exc}") from None
        raise AssertionError("unreachable")

    def write(self, lines: list[str]) -> WriteOutcome:
        outcome = WriteOutcome()
        if lines:
            _split_write(lines, self._send, outcome)
        return outcome

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class V2Writer:
    """The InfluxDB v2 write API through influxdb-client (2.x, 1.8+, 3.x, Cloud)."""

    def __init__(self, config: InfluxConfig):
        from influxdb_client import InfluxDBClient  # collector-only dependency
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._config = config
        token = config.token.reveal() if config.token else None
        if token is None and config.username:
            token = f"{config.username}:{config.password.reveal() if config.password else ''}"
        self._client = InfluxDBClient(url=config.url, token=token or "", org=config.org,
                                      timeout=int(config.timeout * 1000), enable_gzip=config.gzip)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def _send(self, lines: list[str]) -> tuple[int, str]:
        from influxdb_client.client.write_api import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            self._api.write(bucket=self._config.bucket, org=self._config.org, record="\n".join(lines),
                            write_precision=WritePrecision.NS)
            return 204, ""
        except ApiException as exc:
            return exc.status or 500, (exc.body if isinstance(exc.body, str) else str(exc.reason or exc))
        except Exception as exc:  # urllib3 connection and timeout errors
            raise InfluxUnavailable(f"cannot reach InfluxDB at {self._config.url}: {exc}") from None

    def write(self, lines: list[str]) -> WriteOutcome:
        outcome = WriteOutcome()
        if lines:
            _split_write(lines, self._send, outcome)
        return outcome

    def close(self) -> None:
        self._client.close()


def make_writer(config: InfluxConfig) -> V1Writer | V2Writer:
    return V2Writer(config) if config.api == "v2" else V1Writer(config)
