"""Reading what a report needs from InfluxDB with InfluxQL (the ``/query`` API).

InfluxDB 1.x, or 2.x/3.x through their v1 compatibility API (``api: v2`` sends the token and
uses the bucket as the database, which needs a DBRP mapping there). Answers are read in
chunks, so a server's ``max-row-limit`` never cuts a month of outages short.

An outage is stored at its start time, so one that began before the window but lasts into it
is found by looking back (``lookback``, 31 days by default) and keeping only those that end
after the window's start or are still ongoing.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlencode, urlsplit

from collector.config import InfluxConfig
from collector.influxql import quote_ident as _ident
from collector.influxql import quote_string as _string
from collector.report import OutageRecord

DEFAULT_LOOKBACK_S = 31 * 86400.0
CHUNK_SIZE = 20000

_OUTAGE_COLUMNS = ("duration_seconds", "end_seconds", "ongoing", "cause", "min_battery_charge_percent", "blip",
                   "hub", "host", "kind", "ups")

#: Measurements every running agent writes to each cycle (and the collector's status points):
#: a hub with a point in any of them during the window took part in it.
_PRESENCE = (("agent", "outbox_samples"), ("system", "uptime_seconds"), ("ups", "status"), ("status", "state"))


class ReportSourceError(Exception):
    """InfluxDB could not be read (down, refused, or it answered with an error)."""


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class InfluxQuery:
    """InfluxQL over HTTP with the collector's ``influxdb`` settings."""

    def __init__(self, config: InfluxConfig):
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

    def measurement(self, name: str) -> str:
        """``name`` qualified with the configured retention policy, quoted."""
        if self.config.api == "v1" and self.config.retention_policy:
            return f"{_ident(self.config.retention_policy)}.{_ident(name)}"
        return _ident(name)

    def _post(self, influxql: str) -> str:
        body = urlencode({"q": influxql, "db": self.database, "epoch": "ns", "chunked": "true",
                          "chunk_size": str(CHUNK_SIZE)})
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.config.timeout)
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc)
                                                                          if isinstance(exc, OSError) else str(exc))
            raise ReportSourceError(f"cannot reach InfluxDB at {self.config.url}: {reason}") from None
        finally:
            conn.close()
        if response.status in (401, 403):
            raise ReportSourceError(f"InfluxDB at {self.config.url} refused the credentials "
                                    f"(HTTP {response.status}): {_error_text(text)}")
        if response.status != 200:
            raise ReportSourceError(f"InfluxDB at {self.config.url} answered HTTP {response.status}: "
                                    f"{_error_text(text)}")
        return text

    def statements(self, influxql: str) -> dict[int, list[dict]]:
        """Run one or more ``;``-separated statements; the series of each, by statement id.
        A series split over several chunks comes back as several entries with the same name
        and tags, which callers simply concatenate."""
        text = self._post(influxql)
        out: dict[int, list[dict]] = {}
        for answer in _json_objects(text):
            if "error" in answer:
                raise ReportSourceError(f"InfluxDB at {self.config.url}: {answer['error']}")
            for result in answer.get("results", []):
                if "error" in result:
                    raise ReportSourceError(f"InfluxDB at {self.config.url} (database {self.database!r}): "
                                            f"{result['error']}")
                out.setdefault(result.get("statement_id", 0), []).extend(result.get("series") or [])
        return out



def _series_rows(series_list: list[dict]) -> Iterator[dict]:
    """The rows of some series as dicts (series tags included)."""
    for series in series_list:
        tags = series.get("tags") or {}
        columns = series["columns"]
        for values in series.get("values") or []:
            row = dict(zip(columns, values))
            row.update(tags)
            yield row


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
            raise ReportSourceError(f"InfluxDB answered something that is not JSON: {text[i:i + 120]!r}") from None
        yield obj


def known_hubs(client: InfluxQuery) -> set[str]:
    """Every hub InfluxDB holds a point for, in any measurement, at any time."""
    hubs = set()
    for series in client.statements('SHOW TAG VALUES WITH KEY = "hub"').get(0, []):
        for values in series.get("values") or []:
            hubs.add(values[1])
    return hubs


def _hub_condition(hubs: Iterable[str] | None) -> str:
    if not hubs:
        return ""
    return " AND (" + " OR ".join(f'"hub" = {_string(h)}' for h in sorted(set(hubs))) + ")"


def active_hubs(client: InfluxQuery, start: float, end: float, hubs: Iterable[str] | None = None) -> set[str]:
    """Hubs with at least one point during ``[start, end)`` in the measurements agents write
    every cycle (one point per hub is read, so this stays cheap over a long window)."""
    where = f"time >= {_ns(start)} AND time < {_ns(end)}{_hub_condition(hubs)}"
    query = "; ".join(f"SELECT {_ident(f)} FROM {client.measurement(m)} WHERE {where} GROUP BY \"hub\" LIMIT 1"
                      for m, f in _PRESENCE)
    found = set()
    for series_list in client.statements(query).values():
        for series in series_list:
            hub = (series.get("tags") or {}).get("hub")
            if hub:
                found.add(hub)
    return found


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def record_from_row(row: dict) -> OutageRecord | None:
    """An :class:`OutageRecord` from a query row; None when the row is not a usable outage."""
    if not row.get("hub") or not row.get("kind") or not isinstance(row.get("time"), int):
        return None
    start = row["time"] / 1e9
    ongoing = row.get("ongoing") is True
    end = None if ongoing else _float(row.get("end_seconds"))
    duration = _float(row.get("duration_seconds"))
    if end is None and not ongoing:
        if duration is None:
            return None
        end = start + duration  # closed, but written without an end: trust the length
    cause = row.get("cause")
    return OutageRecord(hub=row["hub"], host=row.get("host") or "", kind=row["kind"], start=start, end=end,
                        ongoing=ongoing, cause=cause if isinstance(cause, str) and cause else None,
                        ups=row.get("ups") or None, duration_seconds=duration,
                        min_battery_charge_percent=_float(row.get("min_battery_charge_percent")),
                        blip=row.get("blip") is True)


@dataclass(frozen=True)
class OutageQuery:
    start: float
    end: float
    hubs: tuple[str, ...] = ()
    lookback: float = DEFAULT_LOOKBACK_S

    def influxql(self, client: InfluxQuery) -> str:
        """Two statements: outages starting inside the window, and those that started in the
        look-back before it and either end inside it or are still going."""
        select = f"SELECT {','.join(_ident(c) for c in _OUTAGE_COLUMNS)} FROM {client.measurement('outage')}"
        hubs = _hub_condition(self.hubs)
        inside = f"{select} WHERE time >= {_ns(self.start)} AND time < {_ns(self.end)}{hubs}"
        before = (f"{select} WHERE time >= {_ns(self.start - self.lookback)} AND time < {_ns(self.start)} "
                  f'AND ("end_seconds" >= {self.start!r} OR "ongoing" = true){hubs}')
        return f"{inside}; {before}"


def read_outages(client: InfluxQuery, query: OutageQuery) -> list[OutageRecord]:
    """Every outage that overlaps ``[query.start, query.end)`` (some may need clipping)."""
    records = []
    for series_list in client.statements(query.influxql(client)).values():
        for row in _series_rows(series_list):
            record = record_from_row(row)
            if record is None:
                continue
            if not record.ongoing and record.end is not None and record.end < query.start:
                continue
            records.append(record)
    return records
