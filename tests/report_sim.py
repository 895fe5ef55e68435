"""Simulated outage history for report tests and the report benchmark.

Deterministic (seeded) outages of every kind for a set of hubs, as the outage engine would
store them in the ``outage`` measurement: power cuts (some long enough to run the battery
flat, some blips), dark periods, uplink losses, silent lab machines and unclean reboots.
Times are whole seconds, so a test can check the report second by second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY = 86400

#: Fourteen hubs, as in Gilgit-Baltistan.
GB_HUBS = ("gilgit-sco-01", "gilgit-stp-02", "skardu-stp-01", "skardu-school-02", "diamer-chilas-01",
           "ghizer-gahkuch-01", "nagar-school-01", "hunza-aliabad-01", "astore-eidgah-01", "kharmang-01",
           "shigar-01", "ghanche-khaplu-01", "gupis-01", "nagar-quiet-02")


@dataclass(frozen=True)
class SimOutage:
    hub: str
    host: str
    kind: str
    start: int
    end: int | None  # None: ongoing
    cause: str
    ups: str | None = None
    min_charge: float | None = None
    blip: bool = False

    def line(self, so_far_until: int) -> str:
        """The outage as a line-protocol point (ongoing: length so far up to ``so_far_until``)."""
        tags = f"outage,hub={self.hub},host={self.host},kind={self.kind}" + (f",ups={self.ups}" if self.ups else "")
        end = self.end if self.end is not None else so_far_until
        fields = [f"duration_seconds={float(end - self.start)}", f"ongoing={'true' if self.end is None else 'false'}",
                  f'cause="{self.cause}"']
        if self.end is not None:
            fields.append(f"end_seconds={float(self.end)}")
        if self.kind == "power":
            fields.append(f"blip={'true' if self.blip else 'false'}")
            if self.min_charge is not None:
                fields.append(f"min_battery_charge_percent={self.min_charge}")
        return f"{tags} {','.join(fields)} {self.start * 10**9}"


def _poisson_times(rng: random.Random, start: int, end: int, mean_gap: float) -> list[int]:
    times, t = [], float(start)
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= end:
            return times
        times.append(int(t))


def simulate_hub(hub: str, start: int, end: int, seed: object, two_ups: bool = False,
                 power_per_day: float = 1.5) -> list[SimOutage]:
    """Random outages of one hub from ``start`` to ``end`` (some straddle either edge)."""
    rng = random.Random(f"{seed}-{hub}")
    out: list[SimOutage] = []
    t = start
    while True:  # one UPS is on battery at most once at a time: cuts follow each other
        t += int(rng.expovariate(power_per_day / DAY)) + 1
        if t >= end:
            break
        if rng.random() < 0.3:
            length = rng.randint(2, 25)
            out.append(SimOutage(hub, "gw01", "power", t, t + length, "mains_failure", "hubups", 99.0, blip=True))
            t += length
            continue
        length = rng.randint(60, 5 * 3600)
        flat_after = 150 * 60  # the battery lasts two and a half hours
        charge = round(max(3.0, 100.0 - 95.0 * min(length, flat_after) / flat_after), 1)
        out.append(SimOutage(hub, "gw01", "power", t, t + length, "mains_failure", "hubups", charge))
        if two_ups:  # a second UPS in the same building sees the same cut, not quite at the same instants
            second = t + rng.randint(0, 90)
            out.append(SimOutage(hub, "lab01", "power", second, max(second + 30, t + length + rng.randint(-50, 400)),
                                 "mains_failure", "labups", charge))
        if length > flat_after:
            out.append(SimOutage(hub, "gw01", "hub_dark", t + flat_after, t + length + rng.randint(60, 300),
                                 "battery_exhausted"))
        t += length + 400
    for t in _poisson_times(rng, start, end, 6 * DAY):
        out.append(SimOutage(hub, "gw01", "hub_dark", t, t + rng.randint(300, 3 * 3600), "uplink"))
    for t in _poisson_times(rng, start, end, 3 * DAY):
        out.append(SimOutage(hub, "gw01", "uplink", t, t + rng.randint(120, 2 * 3600), "internet_unreachable"))
    for host in ("lab01", "lab02", "lab03"):
        for t in _poisson_times(rng, start, end, 5 * DAY):
            out.append(SimOutage(hub, host, "host_down", t, t + rng.randint(600, 8 * 3600), "agent_silent"))
    for t in _poisson_times(rng, start, end, 8 * DAY):
        out.append(SimOutage(hub, rng.choice(("gw01", "lab02")), "reboot", t, t + rng.randint(40, 240),
                             "unclean_restart"))
    # An outage is keyed by its start: keep one per series and start, as InfluxDB would.
    unique = {(o.hub, o.host, o.kind, o.ups, o.start): o for o in out}
    return sorted(unique.values(), key=lambda o: o.start)


def simulate(hubs: tuple[str, ...] | list[str], window_start: int, window_end: int, seed: object = 5,
             quiet_hubs: int = 1) -> list[SimOutage]:
    """A month (or any window) of outages for ``hubs``, from five days before the window.

    The last ``quiet_hubs`` hubs have no outage at all; the fourth hub has two UPSes.
    Special cases the report must get right: the first hub's power cut still ongoing at the
    window's end, the second hub dark from before the window into it, the third hub with an
    outage wholly before the window and one starting just after it.
    """
    outages: list[SimOutage] = []
    noisy = list(hubs[:len(hubs) - quiet_hubs])
    for i, hub in enumerate(noisy):
        outages += simulate_hub(hub, window_start - 5 * DAY, window_end, seed, two_ups=(i == 3))
    if len(noisy) >= 3:
        outages.append(SimOutage(noisy[0], "gw01", "power", window_end - 7200, None, "mains_failure", "hubups", 41.0))
        outages.append(SimOutage(noisy[1], "gw01", "hub_dark", window_start - 3 * 3600, window_start + 2 * 3600,
                                 "uplink"))
        outages.append(SimOutage(noisy[2], "gw01", "power", window_start - 10 * DAY, window_start - 9 * DAY,
                                 "mains_failure", "hubups", 5.0))
        outages.append(SimOutage(noisy[2], "gw01", "power", window_end + 3600, window_end + 7200, "mains_failure",
                                 "hubups", 60.0))
    return outages


def presence_lines(hubs: tuple[str, ...] | list[str], start: int, end: int, every: int = DAY) -> list[str]:
    """``system`` points of each hub's gateway, so the report knows the hub took part."""
    return [f"system,hub={hub},host=gw01 uptime_seconds={float(t - start)} {t * 10**9}"
            for hub in hubs for t in range(start, end, every)]
