"""Grafana's InfluxQL macro and template-variable expansion, done the way Grafana does it.

A dashboard's raw InfluxQL is not what reaches InfluxDB. Grafana rewrites it in two steps,
and the dashboard tests replay both so that the text they send to a real ``influxd`` is the
text Grafana would send:

1. **Template variables** (frontend, ``templateSrv.replace(query, vars, 'regex')``):
   ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]`` become the variable's value. The
   InfluxDB data source asks for the ``regex`` format: each value is regex-escaped (``\\``
   ``^ $ * + ? . ( ) | [ ] { } /``) and several values become ``(a|b)``, so ``/^$hub$/``
   turns into ``/^(a|b)$/``. "All" without a custom all-value means every value.
   ``${__from}``/``${__to}`` are the range ends in epoch ms (``:date:seconds`` gives seconds).
   A name that is not a variable is left as it is: ``$timeFilter``, ``$__interval`` (the
   backend owns those), and alias patterns such as ``$col`` or ``$tag_hub``.
2. **Macros** (backend, ``pkg/tsdb/influxdb/models/query.go``): ``$timeFilter`` becomes
   ``time >= <from>ms and time <= <to>ms``; ``$interval`` and ``$__interval`` the panel's
   interval in Grafana's duration form (``10s``, ``1m``, ``2h``), ``$__interval_ms`` the
   same in milliseconds.

The older browser path (``mode="browser"``) writes a relative range as
``time >= now() - 6h and time <= now()`` instead; both must work on InfluxDB.

The interval is Grafana's: range / max data points, rounded to a "nice" step
(``kbn.round_interval``), never below the panel's or data source's minimum interval.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Sequence, Union

VariableValue = Union[str, Sequence[str]]

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "M": 2_592_000_000, "y": 31_536_000_000}
_DURATION = re.compile(r"^(\d+)(ms|[smhdwMy])$")
_RELATIVE = re.compile(r"^now-(\d+)([smhd])$")


def duration_ms(text: str) -> int:
    """``10s`` -> 10000 (Grafana's interval syntax)."""
    match = _DURATION.match(text.strip().lstrip(">"))
    if not match:
        raise ValueError(f"{text!r} is not a Grafana duration like 10s, 5m, 1h")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


@dataclass(frozen=True)
class TimeRange:
    """A dashboard time range: absolute ends in ms, and the raw form when it is relative."""

    from_ms: int
    to_ms: int
    raw_from: str | None = None  # "now-6h"
    raw_to: str | None = None    # "now"

    @classmethod
    def last(cls, span: str, now_ms: int | None = None) -> "TimeRange":
        """The range ``now-<span>`` to ``now`` (e.g. ``TimeRange.last("6h")``)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return cls(now_ms - duration_ms(span), now_ms, f"now-{span}", "now")

    @property
    def span_ms(self) -> int:
        return self.to_ms - self.from_ms


# Grafana's kbn.round_interval: upper bound (exclusive, ms) -> interval chosen (ms).
_ROUNDING = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
    (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
    (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
    (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
    (32400000, 21600000), (86400000, 43200000), (604800000, 86400000), (1814400000, 604800000),
    (3628800000, 2592000000),
]


def round_interval(ms: float) -> int:
    for bound, chosen in _ROUNDING:
        if ms < bound:
            return chosen
    return 31_536_000_000


def calculate_interval_ms(time_range: TimeRange, max_data_points: int = 1000, min_interval: str | None = None) -> int:
    """The ``$__interval`` Grafana picks for a panel (in ms)."""
    interval = round_interval(time_range.span_ms / max(1, max_data_points))
    if min_interval:
        interval = max(interval, duration_ms(min_interval))
    return interval


def format_interval(ms: int) -> str:
    """Grafana backend's ``gtime.FormatInterval``: the largest whole unit, ``1ms`` at least."""
    for unit, size in (("y", 31_536_000_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms" if ms >= 1 else "1ms"


_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")


def regex_escape(value: str) -> str:
    """Grafana's ``kbn.regexEscape``."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def format_value(value: VariableValue, fmt: str | None) -> str:
    """A variable's value in one of Grafana's formats (the ones an InfluxQL query can use)."""
    values = [value] if isinstance(value, str) else list(value)
    if fmt in (None, "regex"):
        escaped = [regex_escape(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt == "raw":
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    raise ValueError(f"variable format {fmt!r} is not one this helper knows")


# templateSrv's variable syntax: $name, [[name]] / [[name:fmt]], ${name} / ${name:fmt}.
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


def _time_macro(ms: int, fmt: str | None) -> str:
    if fmt is None:
        return str(ms)
    if fmt == "date:seconds":
        return str(ms // 1000)
    if fmt in ("date", "date:iso"):
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    raise ValueError(f"time format {fmt!r} is not one this helper knows")


def interpolate_variables(text: str, variables: Mapping[str, VariableValue], time_range: TimeRange,
                          fmt: str = "regex") -> str:
    """Step 1: replace dashboard variables and ``${__from}``/``${__to}``; leave every other ``$name``."""
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        explicit_fmt = match.group(3) or match.group(6)
        if name in ("__from", "__to"):
            return _time_macro(time_range.from_ms if name == "__from" else time_range.to_ms, explicit_fmt)
        if name not in variables:
            return match.group(0)
        return format_value(variables[name], explicit_fmt or fmt)

    return _VARIABLE.sub(replace, text)


def time_filter(time_range: TimeRange, mode: str = "backend") -> str:
    """What ``$timeFilter`` becomes."""
    if mode == "browser":
        def end(raw: str | None, ms: int) -> str:
            if raw == "now":
                return "now()"
            match = _RELATIVE.match(raw or "")
            return f"now() - {match.group(1)}{match.group(2)}" if match else f"{ms}ms"
        start, stop = end(time_range.raw_from, time_range.from_ms), end(time_range.raw_to, time_range.to_ms)
        return f"time >= {start} and time <= {stop}"
    return f"time >= {time_range.from_ms}ms and time <= {time_range.to_ms}ms"


def expand_macros(text: str, time_range: TimeRange, interval_ms: int, mode: str = "backend") -> str:
    """Step 2: ``$timeFilter``, ``$interval``, ``$__interval_ms``, ``$__interval`` (in that order, as Grafana)."""
    interval = format_interval(interval_ms)
    text = text.replace("$timeFilter", time_filter(time_range, mode))
    text = text.replace("$interval", interval)
    text = text.replace("$__interval_ms", str(interval_ms))
    return text.replace("$__interval", interval)


def expand(query: str, *, variables: Mapping[str, VariableValue], time_range: TimeRange,
           interval_ms: int, mode: str = "backend") -> str:
    """The InfluxQL Grafana sends for ``query`` (both steps)."""
    if mode not in ("backend", "browser"):
        raise ValueError(f"mode must be 'backend' or 'browser', not {mode!r}")
    return expand_macros(interpolate_variables(query, variables, time_range), time_range, interval_ms, mode)


def variable_names(text: str) -> set[str]:
    """Every variable name ``text`` refers to, in any of Grafana's syntaxes."""
    return {m.group(1) or m.group(2) or m.group(4) for m in _VARIABLE.finditer(text)}
