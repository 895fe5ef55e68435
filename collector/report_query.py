"""Reading what a report needs from InfluxDB with InfluxQL (the ``/query`` API).

InfluxDB 1.x, or 2.x/3.x through their v1 compatibility API (``api: v2`` sends the token and
uses the bucket as the database, which needs a DBRP mapping there). Answers are read in
chunks, so a server's ``max-row-limit`` never cuts a month of outages short.

An outage is stored at its start time, so one that began before the window but lasts into it
is found by looking back (``lookback``, 31 days by default) and keeping only those that end
after the window's start or are still ongoing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from collector.influxql import InfluxQL, QueryError
from collector.influxql import quote_ident as _ident
from collector.influxql import quote_string as _string
from collector.report import OutageRecord

DEFAULT_LOOKBACK_S = 31 * 86400.0

_OUTAGE_COLUMNS = ("duration_seconds", "end_seconds", "ongoing", "cause", "min_battery_charge_percent", "blip",
                   "hub", "host", "kind", "ups")

#: Measurements every running agent writes to each cycle (and the collector's status points):
#: a hub with a point in any of them during the window took part in it.
_PRESENCE = (("agent", "outbox_samples"), ("system", "uptime_seconds"), ("ups", "status"), ("status", "state"))


#: Kept under the names the report code uses.
ReportSourceError = QueryError
InfluxQuery = InfluxQL


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _series_rows(series_list: list[dict]) -> Iterator[dict]:
    """The rows of some series as dicts (series tags included)."""
    for series in series_list:
        tags = series.get("tags") or {}
        columns = series["columns"]
        for values in series.get("values") or []:
            row = dict(zip(columns, values))
            row.update(tags)
            yield row


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
