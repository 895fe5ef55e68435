"""InfluxDB line protocol, escaped per the spec.

    measurement[,tag=value...] field=value[,field=value...] timestamp_ns

- measurement: escape comma and space;
- tag keys, tag values, field keys: escape comma, equals sign and space;
- string field values: double quotes, escape ``"`` and ``\\``;
- integers end in ``i``; booleans are ``true``/``false``; floats in shortest round-trip form.

Line protocol cannot carry a newline anywhere, nor a tag value that ends in a backslash
(InfluxDB 1.x answers 400 to it however it is escaped): :func:`unwritable` names those, and
the validator rejects such points before they reach a batch.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ "})
_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def escape_measurement(name: str) -> str:
    return name.translate(_MEASUREMENT)


def escape_key(text: str) -> str:
    """Tag keys, tag values and field keys."""
    return text.translate(_KEY)


def format_value(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.translate(_STRING) + '"'
    raise TypeError(f"cannot write a {type(value).__name__} to line protocol")


def unwritable(text: str, is_tag_value: bool = False) -> str | None:
    """Why ``text`` cannot be carried by line protocol, or None when it can."""
    if "\n" in text or "\r" in text:
        return "contains a newline"
    if _CONTROL.search(text):
        return "contains a control character"
    if is_tag_value and text.endswith("\\"):
        return "ends in a backslash"
    return None


def format_line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, object], time_ns: int) -> str:
    """One point. Tags are sorted by key, as InfluxDB recommends for write performance."""
    head = escape_measurement(measurement)
    if tags:
        head += "," + ",".join(f"{escape_key(k)}={escape_key(tags[k])}" for k in sorted(tags))
    body = ",".join(f"{escape_key(k)}={format_value(v)}" for k, v in fields.items())
    return f"{head} {body} {time_ns}"


def check_value(value: object) -> str | None:
    """Why a field value cannot be written, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else "integer out of int64 range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        return None
    return f"unsupported type {type(value).__name__}"
