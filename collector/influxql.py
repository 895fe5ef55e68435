"""Reading InfluxDB with InfluxQL (``/query``): InfluxDB 1.x, and 2.x/3.x through their v1
compatibility API (``api: v2`` sends the token and uses the bucket as the database, which
needs a DBRP mapping there). The outage engine, the alert engine and the report read
through this one client.

Queries are POSTed (a long hub list never makes a URL too long) and answered in chunks, so a
server's ``max-row-limit`` never cuts an answer short; a series split over several chunks is
put back together.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    from collector.config import InfluxConfig

CHUNK_SIZE = 20000


class QueryError(RuntimeError):
    """InfluxDB could not be reached, or refused the query."""


def quote_string(value: str) -> str:
    """An InfluxQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxQL:
    """InfluxQL over HTTP with the collector's ``influxdb`` settings."""

    def __init__(self, config: "InfluxConfig"):
        self.config = config
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 8086)
        self._path = parts.path.rstrip("/") + "/query"
        self.database = config.bucket if config.api == "v2" else config.database
        self._headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if config.token is not None:
            self._headers["Authorization"] = f"Token {config.token.reveal()}"
        elif config.username:
            password = config.password.reveal() if config.password else ""
            basic = base64.b64encode(f"{config.username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"

    @property
    def url(self) -> str:
        return self.config.url

    def measurement(self, name: str) -> str:
        """``name`` qualified with the configured retention policy, quoted."""
        if self.config.api == "v1" and self.config.retention_policy:
            return f"{quote_ident(self.config.retention_policy)}.{quote_ident(name)}"
        return quote_ident(name)

    def _post(self, influxql: str, chunked: bool = True) -> str:
        params = {"q": influxql, "db": self.database, "epoch": "ns"}
        if chunked:
            params.update(chunked="true", chunk_size=str(CHUNK_SIZE))
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.config.timeout)
        try:
            conn.request("POST", self._path, body=urlencode(params), headers=self._headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc)
                                                                          if isinstance(exc, OSError) else str(exc))
            raise QueryError(f"cannot reach InfluxDB at {self.config.url}: {reason}") from None
        finally:
            conn.close()
        if response.status in (401, 403):
            raise QueryError(f"InfluxDB at {self.config.url} refused the credentials "
                             f"(HTTP {response.status}): {_error_text(text)}")
        if response.status != 200:
            raise QueryError(f"InfluxDB at {self.config.url} answered HTTP {response.status}: {_error_text(text)}")
        return text

    def statements(self, influxql: str) -> dict[int, list[dict]]:
        """Run one or more ``;``-separated statements; the series of each, by statement id.
        A series split over several chunks comes back as several entries with the same name
        and tags (:meth:`query` joins them)."""
        out: dict[int, list[dict]] = {}
        for answer in _json_objects(self._post(influxql)):
            if "error" in answer:
                raise QueryError(f"InfluxDB at {self.config.url}: {answer['error']}")
            for result in answer.get("results", []):
                if "error" in result:
                    raise QueryError(f"InfluxDB at {self.config.url} (database {self.database!r}): "
                                     f"{result['error']}")
                out.setdefault(result.get("statement_id", 0), []).extend(result.get("series") or [])
        return out

    def query(self, influxql: str) -> list[dict[str, Any]]:
        """One ``{"series": [...]}`` per statement, in order, each series whole."""
        by_id = self.statements(influxql)
        results = []
        for statement_id in range(max(by_id, default=-1) + 1 if by_id else influxql.count(";") + 1):
            joined: dict[tuple, dict] = {}
            for series in by_id.get(statement_id, []):
                key = (series.get("name"), tuple(sorted((series.get("tags") or {}).items())))
                if key in joined:
                    joined[key]["values"].extend(series.get("values") or [])
                else:
                    joined[key] = {**series, "values": list(series.get("values") or [])}
            results.append({"series": list(joined.values())})
        return results

    def execute(self, statement: str) -> None:
        """A statement that changes data (DELETE, CREATE ...)."""
        for answer in _json_objects(self._post(statement, chunked=False)):
            for result in answer.get("results", []):
                if "error" in result:
                    raise QueryError(f"InfluxDB at {self.config.url}: {result['error']}")


def series_rows(result: dict[str, Any]) -> list[tuple[dict[str, str], list[dict[str, Any]]]]:
    """``(tags, rows)`` per series of one statement's result; rows are dicts by column."""
    out = []
    for series in result.get("series") or []:
        columns = series["columns"]
        out.append((series.get("tags") or {}, [dict(zip(columns, values)) for values in series.get("values", [])]))
    return out


def _error_text(text: str) -> str:
    try:
        return str(json.loads(text).get("error", text)).strip()[:300]
    except (ValueError, AttributeError):
        return text.strip()[:300] or "(no body)"


def _json_objects(text: str) -> Iterator[dict]:
    """The JSON objects of a chunked answer (one after another, newline separated)."""
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            raise QueryError(f"InfluxDB answered something that is not JSON: {text[i:i + 120]!r}") from None
        yield obj
