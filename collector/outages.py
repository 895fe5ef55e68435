"""Outages, derived from the stored series: recomputable and idempotent.

The pure part (``derive``) turns one hub's series over a window into outages; the engine
part (``OutageEngine``) reads those series from InfluxDB, deletes the hub's outage points in
the window and writes the recomputed ones. An outage point is keyed by its start time, so a
rerun overwrites rather than adds; deleting first also removes an outage whose kind or
cause changed (a ``hub_dark`` period reclassified once the hub replays its outbox).

Kinds (DESIGN.md "Outages"):

- ``power``: a UPS on battery until it is back on line; shorter than ``min_power_s`` is a
  blip (``blip=true``), reported apart. Cause ``mains_failure``.
- ``hub_dark``: a gateway agent offline (Last Will / silence) until it is back. Samples
  taken during the dark period (replayed later) mean it was alive but cut off: cause
  ``uplink``. None, with the UPS last seen on battery and low: ``battery_exhausted``. None
  otherwise: ``agent_silent``. While it lasts: ``unknown``.
- ``host_down``: the same for a lab machine (any host not matching ``gateway_hosts``).
- ``uplink``: every ``internet`` ping target unreachable while the agent was running.
- ``reboot``: boot time changed without a clean stop (``stopped`` status) in between.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from collector.influxql import quote_string, series_rows
from collector.lineproto import format_line

log = logging.getLogger(__name__)

NS = 1_000_000_000


@dataclass(frozen=True)
class OutageParams:
    min_power_s: float = 30.0
    agent_interval_s: float = 10.0
    silence_intervals: float = 3.0
    #: The agents' buffer.batch_max_age: their newest sample can be this much older than usual.
    agent_batch_max_age_s: float = 60.0
    low_charge_percent: float = 20.0
    gateway_hosts: tuple[str, ...] = ("*gw*", "*gateway*")
    internet_targets: tuple[str, ...] = ("internet",)
    boot_jitter_s: float = 5.0

    def is_gateway(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, g) for g in self.gateway_hosts)


@dataclass(frozen=True)
class UpsPoint:
    t: int
    on_battery: bool
    charge: float | None = None
    low_battery: bool = False


@dataclass
class HubSeries:
    """What the derivation reads for one hub (every list sorted by time, ns)."""

    hub: str
    ups: dict[tuple[str, str], list[UpsPoint]] = field(default_factory=dict)  # (host, ups) ->
    status: dict[str, list[tuple[int, str]]] = field(default_factory=dict)    # host -> (t, state)
    alive: dict[str, list[int]] = field(default_factory=dict)                  # host -> system sample times
    boot: dict[str, list[tuple[int, float]]] = field(default_factory=dict)    # host -> (t, boot_time_seconds)
    internet: dict[str, list[tuple[int, str, bool]]] = field(default_factory=dict)  # host -> (t, target, reachable)


@dataclass(frozen=True)
class Outage:
    hub: str
    host: str
    kind: str
    start_ns: int
    end_ns: int | None
    cause: str
    ups: str | None = None
    min_charge: float | None = None
    blip: bool = False

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What identifies its point in InfluxDB: the series (kind, host, ups) and the time."""
        return self.kind, self.host, self.ups or "", self.start_ns

    @property
    def ongoing(self) -> bool:
        return self.end_ns is None

    def duration_s(self, now_ns: int) -> float:
        return max(0.0, ((self.end_ns if self.end_ns is not None else now_ns) - self.start_ns) / NS)

    def line(self, now_ns: int) -> str:
        tags = {"hub": self.hub, "host": self.host, "kind": self.kind}
        if self.ups:
            tags["ups"] = self.ups
        fields: dict[str, object] = {"duration_seconds": round(self.duration_s(now_ns), 3),
                                     "ongoing": self.ongoing, "cause": self.cause}
        if self.end_ns is not None:
            fields["end_seconds"] = self.end_ns / NS
        if self.min_charge is not None:
            fields["min_battery_charge_percent"] = float(self.min_charge)
        if self.kind == "power":
            fields["blip"] = self.blip
        return format_line("outage", tags, fields, self.start_ns)


# --- derivation (pure) ----------------------------------------------------------------------

def power_outages(hub: str, host: str, ups: str, points: list[UpsPoint], params: OutageParams) -> list[Outage]:
    out = []
    start: int | None = None
    lowest: float | None = None
    for p in points:
        if p.on_battery:
            if start is None:
                start, lowest = p.t, p.charge
            elif p.charge is not None:
                lowest = p.charge if lowest is None else min(lowest, p.charge)
        elif start is not None:
            blip = (p.t - start) / NS < params.min_power_s
            out.append(Outage(hub, host, "power", start, p.t, "mains_failure", ups, lowest, blip))
            start, lowest = None, None
    if start is not None:
        out.append(Outage(hub, host, "power", start, None, "mains_failure", ups, lowest))
    return out


def dark_periods(status: list[tuple[int, str]], alive: list[int], params: OutageParams,
                 now_ns: int) -> list[tuple[int, int | None]]:
    """When the agent was not connected: ``offline`` status until ``online``, plus gaps in its
    samples longer than the silence limit (merged). ``stopped`` is a clean stop, not dark."""
    periods: list[list[int | None]] = []
    since: int | None = None
    for t, state in status:
        if state == "offline" and since is None:
            since = t
        elif state in ("online", "stopped") and since is not None:
            periods.append([since, t])
            since = None
    if since is not None:
        periods.append([since, None])
    limit = int(params.silence_intervals * params.agent_interval_s * NS)
    stops = [t for t, state in status if state == "stopped"]
    for before, after in zip(alive, alive[1:]):
        if after - before > limit and not any(before <= s <= after for s in stops):
            periods.append([before + int(params.agent_interval_s * NS), after])
    if alive and now_ns - alive[-1] > limit and not any(s >= alive[-1] for s in stops):
        periods.append([alive[-1] + int(params.agent_interval_s * NS), None])
    # merge overlaps
    periods.sort(key=lambda p: p[0])
    merged: list[list[int | None]] = []
    for start, end in periods:
        if merged and (merged[-1][1] is None or start <= merged[-1][1]):
            if merged[-1][1] is not None:
                merged[-1][1] = None if end is None else max(merged[-1][1], end)
            continue
        merged.append([start, end])
    return [(s, e) for s, e in merged]


def classify_dark(start: int, end: int | None, alive: list[int], ups: Iterable[list[UpsPoint]],
                  params: OutageParams, boots: list[tuple[int, float]] = ()) -> str:
    if end is None:
        return "unknown"
    # Samples taken during the dark period prove the machine was up but cut off — unless it
    # booted during it (it had lost power), or they were taken just before it reconnected
    # (a restarted agent measures a moment before it says online).
    rebooted = {t for t, boot in boots if boot * NS > start}
    margin = int(params.silence_intervals * params.agent_interval_s * NS)
    if any(start < t < end - margin and t not in rebooted for t in alive):
        return "uplink"
    last = None
    for points in ups:
        before = [p for p in points if p.t <= start]
        if before and (last is None or before[-1].t > last.t):
            last = before[-1]
    if last is not None and last.on_battery and (
            last.low_battery or (last.charge is not None and last.charge <= params.low_charge_percent)):
        return "battery_exhausted"
    return "agent_silent"


def uplink_outages(hub: str, host: str, pings: list[tuple[int, str, bool]], params: OutageParams) -> list[Outage]:
    """Runs of cycles in which every internet target was unreachable."""
    by_time: dict[int, list[bool]] = {}
    for t, target, reachable in pings:
        if target in params.internet_targets:
            by_time.setdefault(t, []).append(reachable)
    out = []
    start: int | None = None
    for t in sorted(by_time):
        down = not any(by_time[t])
        if down and start is None:
            start = t
        elif not down and start is not None:
            out.append(Outage(hub, host, "uplink", start, t, "internet_unreachable"))
            start = None
    if start is not None:
        out.append(Outage(hub, host, "uplink", start, None, "internet_unreachable"))
    return out


def reboots(hub: str, host: str, boot: list[tuple[int, float]], status: list[tuple[int, str]],
            params: OutageParams) -> list[Outage]:
    out = []
    stops = [t for t, state in status if state == "stopped"]
    for (t1, b1), (t2, b2) in zip(boot, boot[1:]):
        if abs(b2 - b1) <= params.boot_jitter_s:
            continue
        if any(t1 <= s <= t2 for s in stops):
            continue  # a clean stop: the machine was shut down on purpose
        end = int(b2 * NS)
        if not t1 < end <= t2:
            end = t2
        out.append(Outage(hub, host, "reboot", t1, end, "unclean_restart"))
    return out


def derive(series: HubSeries, params: OutageParams, now_ns: int) -> list[Outage]:
    """Every outage of one hub visible in its series."""
    hub = series.hub
    outages: list[Outage] = []
    for (host, ups), points in series.ups.items():
        outages += power_outages(hub, host, ups, points, params)
    hosts = set(series.status) | set(series.alive)
    for host in sorted(hosts):
        alive = series.alive.get(host, [])
        status = series.status.get(host, [])
        kind = "hub_dark" if params.is_gateway(host) else "host_down"
        ups_of_hub = list(series.ups.values())
        for start, end in dark_periods(status, alive, params, now_ns):
            cause = classify_dark(start, end, alive, ups_of_hub, params, series.boot.get(host, []))
            outages.append(Outage(hub, host, kind, start, end, cause))
        outages += reboots(hub, host, series.boot.get(host, []), status, params)
    for host, pings in series.internet.items():
        outages += uplink_outages(hub, host, pings, params)
    return sorted(outages, key=lambda o: (o.start_ns, o.kind, o.host))


# --- engine (reads and writes InfluxDB) ------------------------------------------------------

class OutageEngine:
    """Recomputes one hub's outages over a window and replaces its outage points there."""

    def __init__(self, params: OutageParams, influxql, write_lines, window_s: float = 6 * 3600,
                 margin_s: float = 3600):
        self.params = params
        self._q = influxql
        self._write = write_lines
        self.window_ns = int(window_s * NS)
        self.margin_ns = int(margin_s * NS)

    def read(self, hub: str, since_ns: int, until_ns: int, stored_since_ns: int | None = None
             ) -> tuple[HubSeries, dict[tuple[str, str, str, int], bool]]:
        """The hub's series, and the outage points stored from ``stored_since_ns`` on (none
        when None): key -> ongoing."""
        h = quote_string(hub)
        where = f"hub = {h} AND time >= {since_ns} AND time <= {until_ns}"
        targets = "|".join(t.replace("/", "") for t in self.params.internet_targets)
        statements = [
            f'SELECT "on_battery", "battery_charge_percent", "low_battery" FROM "ups" WHERE {where} GROUP BY "host", "ups"',
            f'SELECT "state" FROM "status" WHERE {where} GROUP BY "host"',
            f'SELECT "boot_time_seconds" FROM "system" WHERE {where} GROUP BY "host"',
            f'SELECT "reachable" FROM "ping" WHERE {where} AND "target" =~ /^({targets})$/ GROUP BY "host", "target"',
            f'SELECT "ongoing" FROM "outage" WHERE hub = {h} AND time >= '
            f'{stored_since_ns if stored_since_ns is not None else until_ns + 1} GROUP BY "kind", "host", "ups"',
        ]
        ups_r, status_r, system_r, ping_r, outage_r = self._q.query(";".join(statements))
        stored = {(tags.get("kind", ""), tags.get("host", ""), tags.get("ups", ""), r["time"]): bool(r.get("ongoing"))
                  for tags, rows in series_rows(outage_r) for r in rows}
        series = HubSeries(hub)
        for tags, rows in series_rows(ups_r):
            series.ups[(tags.get("host", ""), tags.get("ups", ""))] = [
                UpsPoint(r["time"], bool(r["on_battery"]), r.get("battery_charge_percent"), bool(r.get("low_battery")))
                for r in rows if r.get("on_battery") is not None]
        for tags, rows in series_rows(status_r):
            series.status[tags.get("host", "")] = [(r["time"], r["state"]) for r in rows if r.get("state")]
        for tags, rows in series_rows(system_r):
            host = tags.get("host", "")
            series.alive[host] = [r["time"] for r in rows]
            series.boot[host] = [(r["time"], r["boot_time_seconds"]) for r in rows
                                 if r.get("boot_time_seconds") is not None]
        for tags, rows in series_rows(ping_r):
            series.internet.setdefault(tags.get("host", ""), []).extend(
                (r["time"], tags.get("target", ""), bool(r["reachable"])) for r in rows if r.get("reachable") is not None)
        for pings in series.internet.values():
            pings.sort()
        return series, stored

    def _earliest_ongoing(self, hub: str) -> int | None:
        result = self._q.query(f'SELECT "duration_seconds" FROM "outage" WHERE hub = {quote_string(hub)} '
                               f'AND "ongoing" = true ORDER BY time ASC LIMIT 1')[0]
        rows = [r for _, rs in series_rows(result) for r in rs]
        return rows[0]["time"] if rows else None

    def recompute(self, hub: str, since_ns: int | None = None, now_ns: int | None = None) -> list[Outage]:
        """Derive the hub's outages from ``since_ns`` (default: the window) and store them."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        start = min(since_ns if since_ns is not None else now_ns, now_ns - self.window_ns)
        ongoing = self._earliest_ongoing(hub)
        if ongoing is not None:
            start = min(start, ongoing)
        series, stored = self.read(hub, start - self.margin_ns, now_ns, stored_since_ns=start)
        outages = [o for o in derive(series, self.params, now_ns) if o.start_ns >= start]
        # A point keyed like a stored one overwrites it, field by field. Only an outage that is
        # no longer derived (late data merged or removed it), or one open again after it was
        # closed (its end fields would stay), needs InfluxDB's DELETE, which is slow: it was
        # most of the engine's cost in the fleet benchmark when run on every recompute.
        derived = {o.key: o.ongoing for o in outages}
        if any(key not in derived or (derived[key] and not was_ongoing) for key, was_ongoing in stored.items()):
            self._q.execute(f'DELETE FROM "outage" WHERE hub = {quote_string(hub)} AND time >= {start}')
        if outages:
            self._write([o.line(now_ns) for o in outages])
        return outages
