"""``battery``: a laptop's own battery, for a laptop used as a hub's gateway.

Read from ``/sys/class/power_supply`` (root injectable for tests). No battery, no sample.

Metrics (measurement ``battery``, tags hub, host): ``charge_percent``, ``plugged``,
``runtime_seconds`` (only while discharging and when the kernel reports a rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.confload import Section
from agent.probes import ProbeContext
from agent.wire import Sample


def read_uevent(path: Path) -> dict[str, str]:
    """``POWER_SUPPLY_*`` keys of a supply's ``uevent`` file, prefix removed."""
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("POWER_SUPPLY_"):
            values[key[len("POWER_SUPPLY_"):]] = value.strip()
    return values


def _number(values: dict[str, str], key: str) -> float | None:
    try:
        return float(values[key])
    except (KeyError, ValueError):
        return None


def parse_battery(battery: dict[str, str], mains_online: bool | None) -> dict[str, float | bool] | None:
    """The ``battery`` fields from one battery's uevent values (None when it is not present)."""
    if battery.get("PRESENT", "1") != "1":
        return None
    status = battery.get("STATUS", "Unknown")
    charge = _number(battery, "CAPACITY")
    now, full = _number(battery, "ENERGY_NOW"), _number(battery, "ENERGY_FULL")
    rate = _number(battery, "POWER_NOW")
    if now is None:  # batteries that report charge (µAh) and current (µA) instead of energy
        now, full, rate = _number(battery, "CHARGE_NOW"), _number(battery, "CHARGE_FULL"), _number(battery, "CURRENT_NOW")
    if charge is None and now is not None and full:
        charge = 100.0 * now / full
    if charge is None:
        return None
    plugged = mains_online if mains_online is not None else status in ("Charging", "Full", "Not charging")
    fields: dict[str, float | bool] = {"charge_percent": round(min(100.0, max(0.0, charge)), 2), "plugged": plugged}
    if status == "Discharging" and now is not None and rate:
        fields["runtime_seconds"] = round(3600.0 * now / abs(rate), 1)
    return fields


class BatteryProbe:
    name = "battery"
    measurements = ("battery",)

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "BatteryProbe.Config":
        parent.section(key).done()
        return cls.Config()

    def __init__(self, config: Config, context: ProbeContext):
        self._context = context

    def collect(self) -> list[Sample]:
        now = self._context.clock_ns()
        base = Path(self._context.sys_root) / "class" / "power_supply"
        if not base.is_dir():
            return []
        batteries, mains = [], None
        for supply in sorted(base.iterdir()):
            try:
                values = read_uevent(supply / "uevent")
            except OSError:
                continue
            kind = values.get("TYPE")
            if kind == "Battery" and values.get("SCOPE", "System") == "System":
                batteries.append(values)
            elif kind == "Mains":
                online = values.get("ONLINE") == "1"
                mains = online if mains is None else (mains or online)
        samples = []
        for battery in batteries[:1]:  # the system battery; a second one is rare and summed by UPower, not here
            fields = parse_battery(battery, mains)
            if fields is not None:
                samples.append(Sample("battery", now, {}, fields))
        return samples
