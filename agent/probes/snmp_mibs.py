"""What the ``snmp_ups`` probe reads from each UPS MIB, and how values become ``ups`` fields.

Pure functions only: no SNMP library here. The probe fetches the OIDs a :class:`MibSpec`
names (scalars with GET, table columns by walking them) into a mapping of OID tuple to plain
Python value (``int``, ``bytes`` or an OID ``tuple``) and hands it to the spec's ``parse``.

Three MIBs, each verified against its published text:

- ``ups-mib``: the IETF UPS-MIB, RFC 1628 (``1.3.6.1.2.1.33``).
- ``apc``: APC PowerNet-MIB, upsBasic / upsAdv / upsHighPrec (``1.3.6.1.4.1.318.1.1.1``);
  the high-precision (tenths) objects are preferred where the card has them.
- ``eaton-xups``: Eaton (Powerware) XUPS-MIB (``1.3.6.1.4.1.534.1``).

Unknown values are left out, never written as numbers: real cards answer -1 (or 2^31-1,
2^32-1) for "unknown", and some answer values outside the MIB's own range or outside what a
UPS can physically show (a 2369 V mains line, a 500 Hz input). Every reading passes a
range check; what fails it is absent.

Status is a NUT-style token string (``OL``, ``OB DISCHRG``, ``LB``, ``RB``, ``OVER``...),
translated from the MIBs' enumerations and alarm tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

OID = tuple[int, ...]
Value = int | bytes | tuple  # what the probe stores per OID
Values = Mapping[OID, Value]


def oid(text: str) -> OID:
    return tuple(int(part) for part in text.strip(".").split("."))


SYS_OBJECT_ID = oid("1.3.6.1.2.1.1.2.0")
ENTERPRISES = oid("1.3.6.1.4.1")

#: Raw integers that cards send for "unknown".
UNKNOWN_SENTINELS = frozenset({-1, 2**31 - 1, 2**32 - 1})

# Physical bounds (after unit conversion). Values outside are treated as unknown: a UPS
# is low-voltage equipment (<= 1000 V AC or DC) on 50/60 Hz mains.
VOLTS_AC = (0.0, 1000.0)
VOLTS_DC = (0.0, 1000.0)
HERTZ = (0.0, 100.0)
CELSIUS = (-50.0, 150.0)
PERCENT = (0.0, 100.0)
LOAD_PERCENT = (0.0, 200.0)   # UPS-MIB and XUPS-MIB: INTEGER (0..200)
RUNTIME_SECONDS = (0.0, 30 * 86400.0)
WATTS = (0.0, 10_000_000.0)


@dataclass(frozen=True)
class Reading:
    """What one UPS said, already in ``ups`` field units; ``None`` means unknown."""

    gauges: Mapping[str, float | None]
    status: str | None
    mib: str


@dataclass(frozen=True)
class MibSpec:
    name: str
    title: str
    scalars: tuple[OID, ...]          # read with one GET
    columns: tuple[OID, ...]          # table columns, each walked to its end
    presence: tuple[OID, ...]         # any of these answering means the MIB is implemented
    parse: Callable[[Values], Reading]


# --- value helpers ------------------------------------------------------------------------

def as_int(value: object) -> int | None:
    """``value`` as a known integer: None when absent, not an integer or an "unknown" sentinel."""
    if not isinstance(value, int) or isinstance(value, bool) or value in UNKNOWN_SENTINELS:
        return None
    return value


def integer(values: Values, key: OID) -> int | None:
    return as_int(values.get(key))


def scaled(raw: int | None, divisor: float, bounds: tuple[float, float]) -> float | None:
    """``raw / divisor`` when it lies within ``bounds``, else None (unknown)."""
    if raw is None:
        return None
    value = raw / divisor
    return value if bounds[0] <= value <= bounds[1] else None


def column(values: Values, col: OID) -> list[tuple[OID, Value]]:
    """The rows of table column ``col`` as (index, value), in index order."""
    n = len(col)
    return sorted((key[n:], value) for key, value in values.items()
                  if len(key) > n and key[:n] == col)


def column_ints(values: Values, col: OID) -> list[int | None]:
    return [as_int(v) for _, v in column(values, col)]


def first_row(values: Values, col: OID, divisor: float, bounds: tuple[float, float]) -> float | None:
    """The first row's value (line or phase 1), converted and range-checked."""
    rows = column_ints(values, col)
    return scaled(rows[0], divisor, bounds) if rows else None


def largest_row(values: Values, col: OID, divisor: float, bounds: tuple[float, float]) -> float | None:
    """The largest valid row: the most loaded phase is the one that trips the UPS."""
    rows = [scaled(v, divisor, bounds) for v in column_ints(values, col)]
    known = [v for v in rows if v is not None]
    return max(known) if known else None


def row_sum(values: Values, col: OID, bounds: tuple[float, float]) -> float | None:
    """Sum over all rows; unknown if any row is unknown (a partial sum would mislead)."""
    rows = column_ints(values, col)
    if not rows or any(v is None or v < 0 for v in rows):
        return None
    return scaled(sum(rows), 1, bounds)  # type: ignore[arg-type]


def first_known(*candidates: float | None) -> float | None:
    for value in candidates:
        if value is not None:
            return value
    return None


_TOKEN_ORDER = ("OL", "OB", "OFF", "BYPASS", "BOOST", "TRIM", "CHRG", "DISCHRG", "LB", "RB",
                "OVER", "CAL", "ALARM")


def status_string(tokens: Iterable[str]) -> str | None:
    """Tokens deduplicated in NUT's usual order (``OB DISCHRG LB``); None when there are none."""
    unique = set(tokens)
    if "OL" in unique and "OB" in unique:  # the output source wins over an alarm
        unique.discard("OB")
    if "OB" in unique:
        unique.discard("CHRG")
    ordered = sorted(unique, key=lambda t: _TOKEN_ORDER.index(t) if t in _TOKEN_ORDER else len(_TOKEN_ORDER))
    return " ".join(ordered) or None


def _alarm_tokens(descrs: Iterable[Value], prefix: OID, mapped: Mapping[int, tuple[str, ...]],
                  quiet: frozenset[int]) -> list[str]:
    """Tokens for the alarm table's description OIDs (well-known alarms under ``prefix``)."""
    tokens: list[str] = []
    n = len(prefix)
    for descr in descrs:
        if isinstance(descr, tuple) and len(descr) == n + 1 and descr[:n] == prefix:
            number = descr[n]
            if number in quiet:
                continue
            tokens.extend(mapped.get(number, ("ALARM",)))
        else:
            tokens.append("ALARM")  # a vendor-specific alarm: something is wrong, say so
    return tokens


# --- UPS-MIB (RFC 1628) -------------------------------------------------------------------

UPS_MIB = oid("1.3.6.1.2.1.33.1")
UPS_BATTERY_STATUS = UPS_MIB + (2, 1, 0)          # unknown(1) normal(2) low(3) depleted(4)
UPS_MINUTES_REMAINING = UPS_MIB + (2, 3, 0)       # PositiveInteger, minutes
UPS_CHARGE_REMAINING = UPS_MIB + (2, 4, 0)        # INTEGER (0..100), percent
UPS_BATTERY_VOLTAGE = UPS_MIB + (2, 5, 0)         # NonNegativeInteger, 0.1 V DC
UPS_BATTERY_TEMPERATURE = UPS_MIB + (2, 7, 0)     # Integer32, degrees Centigrade
UPS_INPUT_FREQUENCY = UPS_MIB + (3, 3, 1, 2)      # column, 0.1 Hz
UPS_INPUT_VOLTAGE = UPS_MIB + (3, 3, 1, 3)        # column, RMS volts
UPS_OUTPUT_SOURCE = UPS_MIB + (4, 1, 0)           # other(1) none(2) normal(3) bypass(4) battery(5) booster(6) reducer(7)
UPS_OUTPUT_VOLTAGE = UPS_MIB + (4, 4, 1, 2)       # column, RMS volts
UPS_OUTPUT_POWER = UPS_MIB + (4, 4, 1, 4)         # column, watts
UPS_OUTPUT_PERCENT_LOAD = UPS_MIB + (4, 4, 1, 5)  # column, INTEGER (0..200) percent
UPS_ALARM_DESCR = UPS_MIB + (6, 2, 1, 2)          # column of AutonomousType (well-known alarm OIDs)
UPS_WELL_KNOWN_ALARMS = UPS_MIB + (6, 3)

_UPS_MIB_SOURCE = {2: ("OFF",), 3: ("OL",), 4: ("OL", "BYPASS"), 5: ("OB", "DISCHRG"),
                   6: ("OL", "BOOST"), 7: ("OL", "TRIM")}
_UPS_MIB_BATTERY = {3: ("LB",), 4: ("LB",)}
# upsWellKnownAlarms: 1 batteryBad, 2 onBattery, 3 lowBattery, 4 depletedBattery,
# 8 outputOverload, 9 onBypass, 14 upsOutputOff; 24 testInProgress is not a fault.
_UPS_MIB_ALARMS = {1: ("RB",), 2: ("OB", "DISCHRG"), 3: ("LB",), 4: ("LB",), 8: ("OVER",),
                   9: ("BYPASS",), 14: ("OFF",), 24: ("CAL",)}


def ups_mib_status(values: Values) -> str | None:
    tokens = list(_UPS_MIB_SOURCE.get(integer(values, UPS_OUTPUT_SOURCE) or 0, ()))
    tokens += _UPS_MIB_BATTERY.get(integer(values, UPS_BATTERY_STATUS) or 0, ())
    tokens += _alarm_tokens((v for _, v in column(values, UPS_ALARM_DESCR)), UPS_WELL_KNOWN_ALARMS,
                            _UPS_MIB_ALARMS, frozenset())
    return status_string(tokens)


def parse_ups_mib(values: Values) -> Reading:
    minutes = integer(values, UPS_MINUTES_REMAINING)
    if minutes is not None and minutes < 1:  # PositiveInteger: 0 is out of range, not "empty"
        minutes = None
    gauges = {
        "battery_charge_percent": scaled(integer(values, UPS_CHARGE_REMAINING), 1, PERCENT),
        "battery_runtime_seconds": scaled(minutes * 60 if minutes is not None else None, 1, RUNTIME_SECONDS),
        "battery_voltage_volts": scaled(integer(values, UPS_BATTERY_VOLTAGE), 10, VOLTS_DC),
        "temperature_celsius": scaled(integer(values, UPS_BATTERY_TEMPERATURE), 1, CELSIUS),
        "input_frequency_hz": first_row(values, UPS_INPUT_FREQUENCY, 10, HERTZ),
        "input_voltage_volts": first_row(values, UPS_INPUT_VOLTAGE, 1, VOLTS_AC),
        "output_voltage_volts": first_row(values, UPS_OUTPUT_VOLTAGE, 1, VOLTS_AC),
        "load_percent": largest_row(values, UPS_OUTPUT_PERCENT_LOAD, 1, LOAD_PERCENT),
        "realpower_watts": row_sum(values, UPS_OUTPUT_POWER, WATTS),
    }
    return Reading(gauges, ups_mib_status(values), "ups-mib")


UPS_MIB_SPEC = MibSpec(
    name="ups-mib", title="UPS-MIB (RFC 1628)",
    scalars=(UPS_BATTERY_STATUS, UPS_MINUTES_REMAINING, UPS_CHARGE_REMAINING, UPS_BATTERY_VOLTAGE,
             UPS_BATTERY_TEMPERATURE, UPS_OUTPUT_SOURCE),
    columns=(UPS_INPUT_FREQUENCY, UPS_INPUT_VOLTAGE, UPS_OUTPUT_VOLTAGE, UPS_OUTPUT_POWER,
             UPS_OUTPUT_PERCENT_LOAD, UPS_ALARM_DESCR),
    presence=(UPS_BATTERY_STATUS, UPS_OUTPUT_SOURCE),
    parse=parse_ups_mib,
)


# --- APC PowerNet-MIB ---------------------------------------------------------------------

APC_UPS = oid("1.3.6.1.4.1.318.1.1.1")
APC_BASIC_BATTERY_STATUS = APC_UPS + (2, 1, 1, 0)        # unknown(1) normal(2) low(3) inFaultCondition(4)
APC_ADV_BATTERY_CAPACITY = APC_UPS + (2, 2, 1, 0)        # Gauge, percent
APC_ADV_BATTERY_TEMPERATURE = APC_UPS + (2, 2, 2, 0)     # Gauge, Celsius (internal UPS temperature)
APC_ADV_BATTERY_RUNTIME = APC_UPS + (2, 2, 3, 0)         # TimeTicks (1/100 s)
APC_ADV_BATTERY_REPLACE = APC_UPS + (2, 2, 4, 0)         # noBatteryNeedsReplacing(1) batteryNeedsReplacing(2)
APC_ADV_BATTERY_VOLTAGE = APC_UPS + (2, 2, 8, 0)         # INTEGER, volts
APC_HP_BATTERY_CAPACITY = APC_UPS + (2, 3, 1, 0)         # Gauge, tenths of percent
APC_HP_BATTERY_TEMPERATURE = APC_UPS + (2, 3, 2, 0)      # Gauge, tenths of Celsius
APC_HP_BATTERY_VOLTAGE = APC_UPS + (2, 3, 4, 0)          # INTEGER, tenths of volts
APC_ADV_INPUT_VOLTAGE = APC_UPS + (3, 2, 1, 0)           # Gauge, VAC
APC_ADV_INPUT_FREQUENCY = APC_UPS + (3, 2, 4, 0)         # Gauge, Hz
APC_HP_INPUT_VOLTAGE = APC_UPS + (3, 3, 1, 0)            # Gauge, tenths of VAC
APC_HP_INPUT_FREQUENCY = APC_UPS + (3, 3, 4, 0)          # Gauge, tenths of Hz
APC_BASIC_OUTPUT_STATUS = APC_UPS + (4, 1, 1, 0)         # see _APC_OUTPUT_STATUS
APC_ADV_OUTPUT_VOLTAGE = APC_UPS + (4, 2, 1, 0)          # Gauge, VAC
APC_ADV_OUTPUT_LOAD = APC_UPS + (4, 2, 3, 0)             # Gauge, percent of rated capacity
APC_ADV_OUTPUT_ACTIVE_POWER = APC_UPS + (4, 2, 8, 0)     # INTEGER, watts (all phases)
APC_HP_OUTPUT_VOLTAGE = APC_UPS + (4, 3, 1, 0)           # Gauge, tenths of VAC
APC_HP_OUTPUT_LOAD = APC_UPS + (4, 3, 3, 0)              # Gauge, tenths of percent

# upsBasicOutputStatus: unknown(1) onLine(2) onBattery(3) onSmartBoost(4) timedSleeping(5)
# softwareBypass(6) off(7) rebooting(8) switchedBypass(9) hardwareFailureBypass(10)
# sleepingUntilPowerReturn(11) onSmartTrim(12) ecoMode(13) hotStandby(14) onBatteryTest(15)
# emergencyStaticBypass(16) staticBypassStandby(17) powerSavingMode(18) spotMode(19)
# eConversion(20) chargerSpotmode(21) inverterSpotmode(22). A self-test runs on battery with
# the mains present: it is reported as on line, discharging, calibrating - not an outage.
_APC_OUTPUT_STATUS = {2: ("OL",), 3: ("OB", "DISCHRG"), 4: ("OL", "BOOST"), 5: ("OFF",),
                      6: ("OL", "BYPASS"), 7: ("OFF",), 9: ("OL", "BYPASS"), 10: ("OL", "BYPASS"),
                      11: ("OFF",), 12: ("OL", "TRIM"), 13: ("OL",), 14: ("OL",),
                      15: ("OL", "DISCHRG", "CAL"), 16: ("OL", "BYPASS"), 17: ("OL",), 18: ("OL",),
                      20: ("OL",)}
_APC_BATTERY_STATUS = {3: ("LB",), 4: ("RB",)}


def apc_status(values: Values) -> str | None:
    tokens = list(_APC_OUTPUT_STATUS.get(integer(values, APC_BASIC_OUTPUT_STATUS) or 0, ()))
    tokens += _APC_BATTERY_STATUS.get(integer(values, APC_BASIC_BATTERY_STATUS) or 0, ())
    if integer(values, APC_ADV_BATTERY_REPLACE) == 2:
        tokens.append("RB")
    return status_string(tokens)


def parse_apc(values: Values) -> Reading:
    def prefer(high: OID, adv: OID, bounds: tuple[float, float]) -> float | None:
        return first_known(scaled(integer(values, high), 10, bounds), scaled(integer(values, adv), 1, bounds))

    gauges = {
        "battery_charge_percent": prefer(APC_HP_BATTERY_CAPACITY, APC_ADV_BATTERY_CAPACITY, PERCENT),
        "battery_runtime_seconds": scaled(integer(values, APC_ADV_BATTERY_RUNTIME), 100, RUNTIME_SECONDS),
        "battery_voltage_volts": prefer(APC_HP_BATTERY_VOLTAGE, APC_ADV_BATTERY_VOLTAGE, VOLTS_DC),
        "temperature_celsius": prefer(APC_HP_BATTERY_TEMPERATURE, APC_ADV_BATTERY_TEMPERATURE, CELSIUS),
        "input_voltage_volts": prefer(APC_HP_INPUT_VOLTAGE, APC_ADV_INPUT_VOLTAGE, VOLTS_AC),
        "input_frequency_hz": prefer(APC_HP_INPUT_FREQUENCY, APC_ADV_INPUT_FREQUENCY, HERTZ),
        "output_voltage_volts": prefer(APC_HP_OUTPUT_VOLTAGE, APC_ADV_OUTPUT_VOLTAGE, VOLTS_AC),
        "load_percent": prefer(APC_HP_OUTPUT_LOAD, APC_ADV_OUTPUT_LOAD, LOAD_PERCENT),
        "realpower_watts": scaled(integer(values, APC_ADV_OUTPUT_ACTIVE_POWER), 1, WATTS),
    }
    return Reading(gauges, apc_status(values), "apc")


APC_SPEC = MibSpec(
    name="apc", title="APC PowerNet-MIB",
    scalars=(APC_BASIC_BATTERY_STATUS, APC_ADV_BATTERY_CAPACITY, APC_ADV_BATTERY_TEMPERATURE,
             APC_ADV_BATTERY_RUNTIME, APC_ADV_BATTERY_REPLACE, APC_ADV_BATTERY_VOLTAGE,
             APC_HP_BATTERY_CAPACITY, APC_HP_BATTERY_TEMPERATURE, APC_HP_BATTERY_VOLTAGE,
             APC_ADV_INPUT_VOLTAGE, APC_ADV_INPUT_FREQUENCY, APC_HP_INPUT_VOLTAGE, APC_HP_INPUT_FREQUENCY,
             APC_BASIC_OUTPUT_STATUS, APC_ADV_OUTPUT_VOLTAGE, APC_ADV_OUTPUT_LOAD,
             APC_ADV_OUTPUT_ACTIVE_POWER, APC_HP_OUTPUT_VOLTAGE, APC_HP_OUTPUT_LOAD),
    columns=(),
    presence=(APC_BASIC_OUTPUT_STATUS, APC_BASIC_BATTERY_STATUS),
    parse=parse_apc,
)


# --- Eaton XUPS-MIB -----------------------------------------------------------------------

XUPS = oid("1.3.6.1.4.1.534.1")
XUPS_BAT_TIME_REMAINING = XUPS + (2, 1, 0)     # Integer32, seconds
XUPS_BAT_VOLTAGE = XUPS + (2, 2, 0)            # Integer32, volts DC
XUPS_BAT_CAPACITY = XUPS + (2, 4, 0)           # Integer32 (0..100), percent
XUPS_BATTERY_ABM_STATUS = XUPS + (2, 5, 0)     # charging(1) discharging(2) floating(3) resting(4) unknown(5) disconnected(6) underTest(7) checkBattery(8)
XUPS_BATTERY_FAILURE = XUPS + (2, 7, 0)        # yes(1) no(2)
XUPS_BATTERY_LOW_CAPACITY = XUPS + (2, 10, 0)  # yes(1) no(2)
XUPS_INPUT_FREQUENCY = XUPS + (3, 1, 0)        # Integer32, 0.1 Hz
XUPS_INPUT_VOLTAGE = XUPS + (3, 4, 1, 2)       # column, RMS volts
XUPS_OUTPUT_LOAD = XUPS + (4, 1, 0)            # Integer32 (0..200), percent of rated capacity
XUPS_OUTPUT_VOLTAGE = XUPS + (4, 4, 1, 2)      # column, RMS volts
XUPS_OUTPUT_WATTS = XUPS + (4, 4, 1, 4)        # column, watts
XUPS_OUTPUT_SOURCE = XUPS + (4, 5, 0)          # see _XUPS_OUTPUT_SOURCE
XUPS_ENV_AMBIENT_TEMP = XUPS + (6, 1, 0)       # Integer32 (-100..200), degrees Centigrade
XUPS_ALARM_DESCR = XUPS + (7, 2, 1, 2)         # column of well-known alarm OIDs
XUPS_ALARM = XUPS + (7,)

# xupsOutputSource: other(1) none(2) normal(3) bypass(4) battery(5) booster(6) reducer(7)
# parallelCapacity(8) parallelRedundant(9) highEfficiencyMode(10) maintenanceBypass(11) essMode(12)
_XUPS_OUTPUT_SOURCE = {2: ("OFF",), 3: ("OL",), 4: ("OL", "BYPASS"), 5: ("OB", "DISCHRG"),
                       6: ("OL", "BOOST"), 7: ("OL", "TRIM"), 8: ("OL",), 9: ("OL",), 10: ("OL",),
                       11: ("OL", "BYPASS"), 12: ("OL",)}
_XUPS_ABM = {1: ("CHRG",), 2: ("DISCHRG",), 7: ("CAL",), 8: ("RB",)}
# Well-known alarms under xupsAlarm: 3 onBattery, 4 lowBattery, 7 outputOverload,
# 9 batteryDischarged, 11 onBypass, 13 outputOff, 23 alarmBatteryBad, 28 testInProgress,
# 44 onMaintenanceBypass. Notices that are not faults stay quiet: 5 utilityPowerRestored,
# 6 returnFromLowBattery, 17 onInverter, 21/22 alarm entry added/removed.
_XUPS_ALARMS = {3: ("OB", "DISCHRG"), 4: ("LB",), 7: ("OVER",), 9: ("LB",), 11: ("BYPASS",),
                13: ("OFF",), 23: ("RB",), 28: ("CAL",), 44: ("BYPASS",)}
_XUPS_QUIET_ALARMS = frozenset({5, 6, 17, 21, 22})


def xups_status(values: Values) -> str | None:
    tokens = list(_XUPS_OUTPUT_SOURCE.get(integer(values, XUPS_OUTPUT_SOURCE) or 0, ()))
    tokens += _XUPS_ABM.get(integer(values, XUPS_BATTERY_ABM_STATUS) or 0, ())
    if integer(values, XUPS_BATTERY_FAILURE) == 1:
        tokens.append("RB")
    if integer(values, XUPS_BATTERY_LOW_CAPACITY) == 1:
        tokens.append("LB")
    tokens += _alarm_tokens((v for _, v in column(values, XUPS_ALARM_DESCR)), XUPS_ALARM,
                            _XUPS_ALARMS, _XUPS_QUIET_ALARMS)
    return status_string(tokens)


def parse_xups(values: Values) -> Reading:
    gauges = {
        "battery_charge_percent": scaled(integer(values, XUPS_BAT_CAPACITY), 1, PERCENT),
        "battery_runtime_seconds": scaled(integer(values, XUPS_BAT_TIME_REMAINING), 1, RUNTIME_SECONDS),
        "battery_voltage_volts": scaled(integer(values, XUPS_BAT_VOLTAGE), 1, VOLTS_DC),
        "temperature_celsius": scaled(integer(values, XUPS_ENV_AMBIENT_TEMP), 1, CELSIUS),
        "input_frequency_hz": scaled(integer(values, XUPS_INPUT_FREQUENCY), 10, HERTZ),
        "input_voltage_volts": first_row(values, XUPS_INPUT_VOLTAGE, 1, VOLTS_AC),
        "output_voltage_volts": first_row(values, XUPS_OUTPUT_VOLTAGE, 1, VOLTS_AC),
        "load_percent": scaled(integer(values, XUPS_OUTPUT_LOAD), 1, LOAD_PERCENT),
        "realpower_watts": row_sum(values, XUPS_OUTPUT_WATTS, WATTS),
    }
    return Reading(gauges, xups_status(values), "eaton-xups")


XUPS_SPEC = MibSpec(
    name="eaton-xups", title="Eaton XUPS-MIB",
    scalars=(XUPS_BAT_TIME_REMAINING, XUPS_BAT_VOLTAGE, XUPS_BAT_CAPACITY, XUPS_BATTERY_ABM_STATUS,
             XUPS_BATTERY_FAILURE, XUPS_BATTERY_LOW_CAPACITY, XUPS_INPUT_FREQUENCY, XUPS_OUTPUT_LOAD,
             XUPS_OUTPUT_SOURCE, XUPS_ENV_AMBIENT_TEMP),
    columns=(XUPS_INPUT_VOLTAGE, XUPS_OUTPUT_VOLTAGE, XUPS_OUTPUT_WATTS, XUPS_ALARM_DESCR),
    presence=(XUPS_BAT_CAPACITY, XUPS_OUTPUT_SOURCE),
    parse=parse_xups,
)


# --- choosing a MIB -----------------------------------------------------------------------

SPECS: Mapping[str, MibSpec] = {s.name: s for s in (UPS_MIB_SPEC, APC_SPEC, XUPS_SPEC)}
MIB_CHOICES = ("auto",) + tuple(SPECS)

#: sysObjectID enterprise number -> the MIB that vendor's cards speak best.
_VENDOR_MIB = {318: "apc", 534: "eaton-xups"}


def detection_oids() -> tuple[OID, ...]:
    """What ``mib: auto`` asks for in one GET: sysObjectID and each MIB's presence OIDs."""
    return (SYS_OBJECT_ID,) + tuple(o for spec in SPECS.values() for o in spec.presence)


def choose_mib(values: Values) -> MibSpec | None:
    """The MIB to read, from sysObjectID's enterprise first, else whichever answers.

    The vendor's own MIB is preferred only if it actually answers (an APC card in a PDU
    has no upsBasic group); otherwise the standard UPS-MIB, then the others.
    """
    order = ["ups-mib", "eaton-xups", "apc"]
    sys_oid = values.get(SYS_OBJECT_ID)
    if isinstance(sys_oid, tuple) and len(sys_oid) > len(ENTERPRISES) and sys_oid[:len(ENTERPRISES)] == ENTERPRISES:
        vendor = _VENDOR_MIB.get(sys_oid[len(ENTERPRISES)])
        if vendor is not None:
            order.remove(vendor)
            order.insert(0, vendor)
    for name in order:
        spec = SPECS[name]
        if any(values.get(o) is not None for o in spec.presence):
            return spec
    return None


def answered(spec: MibSpec, values: Values) -> bool:
    """Did the device answer any of the objects this MIB reads?"""
    return any(o in values for o in spec.scalars) or any(column(values, c) for c in spec.columns)
