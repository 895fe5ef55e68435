"""Reading InfluxDB with InfluxQL (``/query``): InfluxDB 1.x, and 2.x/3.x through their v1
compatibility API. The outage engine, the alert engine and the report read through this."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from collector.config import InfluxConfig


class QueryError(RuntimeError):
    """InfluxDB could not be reached, or refused the query."""


def quote_string(value: str) -> str:
    """An InfluxQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxQL:
    def __init__(self, config: InfluxConfig):
        self._config = config
        self._url = config.url.rstrip("/") + "/query"
        self._db = config.database if config.api == "v1" else config.bucket
        self._headers = {}
        if config.username:
            password = config.password.reveal() if config.password else ""
            self._headers["Authorization"] = "Basic " + base64.b64encode(
                f"{config.username}:{password}".encode()).decode()
        elif config.token:
            self._headers["Authorization"] = f"Token {config.token.reveal()}"

    @property
    def url(self) -> str:
        return self._config.url

    def _call(self, query: str, write: bool) -> list[dict[str, Any]]:
        params = urlencode({"db": self._db, "q": query, "epoch": "ns"})
        if write:
            request = urllib.request.Request(self._url, data=params.encode(), headers=self._headers)
        else:
            request = urllib.request.Request(f"{self._url}?{params}", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self._config.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")[:300]
            raise QueryError(f"InfluxDB at {self._config.url} answered {exc.code}: {body}") from None
        except (OSError, ValueError) as exc:
            raise QueryError(f"cannot query InfluxDB at {self._config.url}: {exc}") from None
        if "error" in answer:
            raise QueryError(f"InfluxDB: {answer['error']}")
        for result in answer.get("results", []):
            if "error" in result:
                raise QueryError(f"InfluxDB: {result['error']}")
        return answer.get("results", [])

    def query(self, query: str) -> list[dict[str, Any]]:
        """The ``results`` of a read-only query (several statements may be joined with ';')."""
        return self._call(query, write=False)

    def execute(self, statement: str) -> None:
        """A statement that changes data (DELETE, CREATE ...)."""
        self._call(statement, write=True)


def series_rows(result: dict[str, Any]) -> list[tuple[dict[str, str], list[dict[str, Any]]]]:
    """``(tags, rows)`` per series of one statement's result; rows are dicts by column."""
    out = []
    for series in result.get("series") or []:
        columns = series["columns"]
        out.append((series.get("tags") or {}, [dict(zip(columns, values)) for values in series.get("values", [])]))
    return out
