"""What the NUT and SNMP UPS probes share: status tokens and the ``ups`` sample's shape.

NUT's ``ups.status`` is a space-separated list of tokens (``OL``, ``OB``, ``LB``, ``CHRG``,
``DISCHRG``, ``RB``, ``OVER``, ``ALARM``...). Flags are read by exact token, never by
substring: ``DISCHRG`` contains ``CHRG`` but does not mean charging. The SNMP probe speaks
the same tokens, translated from the MIBs' enumerations, so both sources look alike.
"""

from __future__ import annotations

import math
from typing import Mapping

from agent.wire import Sample

#: ups boolean field -> the status token that sets it
STATUS_FLAGS = {
    "on_line": "OL",
    "on_battery": "OB",
    "low_battery": "LB",
    "charging": "CHRG",
    "discharging": "DISCHRG",
    "replace_battery": "RB",
    "overload": "OVER",
}

#: ups gauge fields a source may fill (all floats, units in the names)
GAUGE_FIELDS = (
    "battery_charge_percent", "battery_charge_low_percent", "battery_runtime_seconds",
    "battery_voltage_volts", "input_voltage_volts", "input_frequency_hz", "output_voltage_volts",
    "load_percent", "temperature_celsius", "realpower_watts",
)


def status_tokens(status: str) -> frozenset[str]:
    return frozenset(status.split())


def status_flags(status: str) -> dict[str, bool]:
    """The boolean ``ups`` fields for a status string, by exact token."""
    tokens = status_tokens(status)
    return {name: token in tokens for name, token in STATUS_FLAGS.items()}


def ups_sample(ups: str, source: str, time_ns: int, gauges: Mapping[str, float | None],
               status: str | None) -> Sample:
    """Build a ``ups`` sample: absent or non-finite gauges are left out, never written as 0."""
    fields: dict[str, float | bool | str] = {}
    for name in GAUGE_FIELDS:
        value = gauges.get(name)
        if value is not None and math.isfinite(value):
            fields[name] = float(value)
    if status is not None and status.strip():
        status = " ".join(status.split())
        fields["status"] = status
        fields.update(status_flags(status))
    return Sample("ups", time_ns, {"ups": ups, "source": source}, fields)
