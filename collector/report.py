"""Outage report arithmetic: the outages of a window -> per-hub availability, MTTR, MTBF.

Pure computation, no I/O: :mod:`collector.report_query` reads the ``outage`` measurement,
:mod:`collector.report_render` turns a :class:`Report` into text, CSV, JSON or HTML.

Definitions (docs/report.md says the same in words):

- The *window* is ``[start, end)``; the part that is *measured* ends at ``measured_end``,
  the earlier of ``end`` and the time the report is made (the future is not counted).
- Every outage is clipped to the measured window. An ongoing outage lasts until
  ``measured_end``.
- Power downtime is the union of the hub's power outages that are not blips (several UPSes
  on battery at once count once). Hub downtime is the union of ``hub_dark`` outages.
  Uplink downtime is the union of ``uplink`` outages and of ``hub_dark`` outages whose cause
  is ``uplink``. Availability = 100 × (1 − downtime / measured window).
- A *power failure* is one stretch of that power-downtime union. MTTR = power downtime /
  power failures; MTBF = (measured window − power downtime) / power failures, so
  MTTR + MTBF = window / failures. Both are None without a power failure.
- Blips (power outages flagged ``blip``) are counted apart and left out of the outage list,
  the availability, MTTR and MTBF; they do count for longest time on battery and lowest charge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

#: Availability categories, in report order.
CATEGORIES = ("power", "hub", "uplink")


@dataclass(frozen=True)
class OutageRecord:
    """One ``outage`` point as stored (times in seconds since the epoch)."""

    hub: str
    host: str
    kind: str
    start: float
    end: float | None  # None while ongoing
    ongoing: bool = False
    cause: str | None = None
    ups: str | None = None
    duration_seconds: float | None = None  # as stored: length so far, or in all
    min_battery_charge_percent: float | None = None
    blip: bool = False


@dataclass(frozen=True)
class ReportOutage:
    """An outage as the report shows it: clipped to the measured window."""

    kind: str
    host: str
    start: float  # clipped
    end: float  # clipped (measured_end for an ongoing outage)
    duration_seconds: float  # end - start, inside the window
    ongoing: bool
    cause: str | None
    ups: str | None
    actual_start: float
    actual_end: float | None  # None while ongoing
    min_battery_charge_percent: float | None


@dataclass(frozen=True)
class HubReport:
    hub: str
    availability_percent: dict[str, float | None]
    downtime_seconds: dict[str, float]
    outages: tuple[ReportOutage, ...]
    blips: int
    blip_seconds: float
    power_failures: int
    mttr_seconds: float | None
    mtbf_seconds: float | None
    longest_on_battery_seconds: float | None
    lowest_battery_charge_percent: float | None
    blip_starts: tuple[float, ...] = ()

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outages if o.kind == kind)


@dataclass(frozen=True)
class Report:
    start: float
    end: float
    measured_end: float
    generated_at: float
    hubs: tuple[HubReport, ...] = field(default_factory=tuple)

    @property
    def measured_seconds(self) -> float:
        return max(0.0, self.measured_end - self.start)


def union_length(intervals: Iterable[tuple[float, float]]) -> tuple[float, int]:
    """Total length covered by ``intervals`` and the number of separate stretches they form."""
    total, stretches = 0.0, 0
    current: list[float] | None = None
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if current is not None and a <= current[1]:
            current[1] = max(current[1], b)
            continue
        if current is not None:
            total += current[1] - current[0]
        current = [a, b]
        stretches += 1
    if current is not None:
        total += current[1] - current[0]
    return total, stretches


def _effective_end(record: OutageRecord, measured_end: float) -> float:
    if record.ongoing or record.end is None:
        return max(record.start, measured_end)
    return max(record.start, record.end)


def clip(record: OutageRecord, start: float, measured_end: float) -> ReportOutage | None:
    """``record`` seen through the window, or None when it lies outside it."""
    if record.start >= measured_end:
        return None
    actual_end = _effective_end(record, measured_end)
    # an outage of zero length counts when it starts inside the window
    if actual_end <= start and not (record.start >= start):
        return None
    a, b = max(record.start, start), min(actual_end, measured_end)
    ongoing = record.ongoing or record.end is None
    return ReportOutage(kind=record.kind, host=record.host, start=a, end=b, duration_seconds=max(0.0, b - a),
                        ongoing=ongoing, cause=record.cause, ups=record.ups, actual_start=record.start,
                        actual_end=None if ongoing else actual_end,
                        min_battery_charge_percent=record.min_battery_charge_percent)


def hub_report(hub: str, records: Sequence[OutageRecord], start: float, measured_end: float) -> HubReport:
    window = max(0.0, measured_end - start)
    listed: list[ReportOutage] = []
    power, dark, uplink = [], [], []
    blip_starts: list[float] = []
    blip_seconds = 0.0
    on_battery: list[float] = []
    charges: list[float] = []
    for record in records:
        clipped = clip(record, start, measured_end)
        if clipped is None:
            continue
        span = (clipped.start, clipped.end)
        if record.kind == "power":
            on_battery.append(clipped.duration_seconds)
            if record.min_battery_charge_percent is not None:
                charges.append(record.min_battery_charge_percent)
            if record.blip:
                blip_starts.append(clipped.start)
                blip_seconds += clipped.duration_seconds
                continue
            power.append(span)
        elif record.kind == "hub_dark":
            dark.append(span)
            if record.cause == "uplink":
                uplink.append(span)
        elif record.kind == "uplink":
            uplink.append(span)
        listed.append(clipped)
    power_down, failures = union_length(power)
    downtime = {"power": power_down, "hub": union_length(dark)[0], "uplink": union_length(uplink)[0]}
    availability = {k: (100.0 * (1.0 - downtime[k] / window) if window > 0 else None) for k in CATEGORIES}
    listed.sort(key=lambda o: (o.start, o.kind, o.host, o.ups or ""))
    return HubReport(
        hub=hub, availability_percent=availability, downtime_seconds=downtime, outages=tuple(listed),
        blips=len(blip_starts), blip_seconds=blip_seconds, power_failures=failures,
        mttr_seconds=power_down / failures if failures else None,
        mtbf_seconds=(window - power_down) / failures if failures else None,
        longest_on_battery_seconds=max(on_battery) if on_battery else None,
        lowest_battery_charge_percent=min(charges) if charges else None,
        blip_starts=tuple(sorted(blip_starts)),
    )


def build_report(records: Iterable[OutageRecord], hubs: Iterable[str], start: float, end: float,
                 now: float) -> Report:
    """The report for ``hubs`` (plus any hub an outage names) over ``[start, end)`` as of ``now``."""
    measured_end = max(start, min(end, now))
    by_hub: dict[str, list[OutageRecord]] = {hub: [] for hub in hubs}
    for record in records:
        if record.hub in by_hub or clip(record, start, measured_end) is not None:
            by_hub.setdefault(record.hub, []).append(record)
    reports = tuple(hub_report(hub, by_hub[hub], start, measured_end) for hub in sorted(by_hub))
    return Report(start=start, end=end, measured_end=measured_end, generated_at=now, hubs=reports)
