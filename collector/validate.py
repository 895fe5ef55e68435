"""Everything a message must satisfy before any of it reaches InfluxDB.

The hub and host of a point come from the topic the broker authorised, never from the
payload alone: a payload that disagrees with its topic is rejected whole. Within an accepted
message, a bad sample is rejected alone (counted, with its reason) and the rest is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.catalogue import MEASUREMENTS
from agent.wire import NAME_PATTERN, RawEnvelope, Topic, WireError, check_sample_shape
from collector.lineproto import (INT64_MAX, INT64_MIN, escape_key, escape_measurement, format_value,
                                unwritable)

MAX_FUTURE_NS = 5 * 60 * 10**9
MIN_TIME_NS = 946_684_800 * 10**9  # 2000-01-01: anything older is a clock that was never set
MAX_TAGS = 32
MAX_FIELDS = 256
MAX_TAG_VALUE = 256
MAX_STRING_FIELD = 1024
#: Measurements only the collector writes; an agent claiming them is spoofing.
RESERVED_MEASUREMENTS = frozenset({"outage", "alert", "hubwatch_collector", "status"})
#: Names InfluxDB gives a meaning of its own.
RESERVED_NAMES = frozenset({"time", "_measurement", "_field", "_value", "_start", "_stop"})


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


@dataclass
class Converted:
    """The writable lines of one message and the samples rejected from it."""

    lines: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    newest_ns: int = 0
    oldest_ns: int = 0


class MessageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def check_envelope(envelope: RawEnvelope, topic: Topic) -> None:
    """MessageRejected when the envelope as a whole cannot be trusted."""
    if envelope.hub != topic.hub or envelope.host != topic.host:
        raise MessageRejected("topic_mismatch", f"payload says {envelope.hub}/{envelope.host}, "
                                                f"topic says {topic.hub}/{topic.host}")
    if not envelope.samples:
        raise MessageRejected("empty", "message carries no samples")


_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}
_CACHE_LIMIT = 100_000


class Converter:
    """Validates raw samples and turns them into line protocol in one pass.

    Hubs send the same tag sets and field names every cycle, so the validated, escaped
    ``measurement,tags`` head of each (hub, host, measurement, tags) and each field's
    escaped key and expected type are computed once and cached: validation costs little
    more than formatting. Caches are bounded (cleared when full).
    """

    def __init__(self) -> None:
        self._heads: dict[tuple, str | Rejection] = {}
        self._keys: dict[tuple[str, str], tuple[str, str | None] | Rejection] = {}

    def _head(self, measurement: str, tags: dict[str, str], topic: Topic) -> str | Rejection:
        if measurement in RESERVED_MEASUREMENTS:
            return Rejection("reserved", f"measurement {measurement!r} is written by the collector only")
        if len(tags) > MAX_TAGS:
            return Rejection("too_many_tags", f"{measurement} has {len(tags)} tags (max {MAX_TAGS})")
        for key, value in tags.items():
            if not NAME_PATTERN.fullmatch(key) or key in RESERVED_NAMES:
                return Rejection("name", f"{measurement}: tag key {key!r} is not a valid name")
            if key in ("hub", "host") and value != getattr(topic, key):
                return Rejection("topic_mismatch", f"{measurement}: tag {key}={value!r} disagrees with the topic")
            if not value or len(value) > MAX_TAG_VALUE:
                return Rejection("tag_value", f"{measurement}: tag {key} must be 1..{MAX_TAG_VALUE} characters")
            why = unwritable(value, is_tag_value=True)
            if why:
                return Rejection("tag_value", f"{measurement}: tag {key} {why}")
        full = dict(tags)
        full["hub"], full["host"] = topic.hub, topic.host
        return escape_measurement(measurement) + "," + ",".join(
            f"{escape_key(k)}={escape_key(full[k])}" for k in sorted(full))

    def _key(self, measurement: str, name: str) -> tuple[str, str | None] | Rejection:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
            return Rejection("name", f"{measurement}: field name {name!r} is not a valid name")
        spec = MEASUREMENTS.get(measurement)
        fspec = spec.fields.get(name) if spec is not None else None
        return escape_key(name) + "=", fspec.type if fspec is not None else None

    def convert(self, samples: list, topic: Topic, now_ns: int | None = None) -> Converted:
        """Line protocol for every valid sample of a message that passed :func:`check_envelope`."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        latest = now_ns + MAX_FUTURE_NS
        out = Converted()
        heads, keys = self._heads, self._keys
        if len(heads) > _CACHE_LIMIT or len(keys) > _CACHE_LIMIT:
            heads.clear()
            keys.clear()
        for obj in samples:
            try:
                measurement, time_ns, tags, fields = check_sample_shape(obj)
            except WireError as exc:
                out.rejections.append(Rejection(exc.reason, str(exc)))
                continue
            if time_ns > latest:
                out.rejections.append(Rejection(
                    "future", f"{measurement} at {time_ns} is {(time_ns - now_ns) / 1e9:.0f}s in the future"))
                continue
            if time_ns < MIN_TIME_NS:
                out.rejections.append(Rejection("time", f"{measurement} at {time_ns} is before the year 2000"))
                continue
            head_key = (topic.hub, topic.host, measurement, *tags.items())
            head = heads.get(head_key)
            if head is None:
                head = heads[head_key] = self._head(measurement, tags, topic)
            if type(head) is Rejection:
                out.rejections.append(head)
                continue
            if len(fields) > MAX_FIELDS:
                out.rejections.append(Rejection("too_many_fields",
                                                f"{measurement} has {len(fields)} fields (max {MAX_FIELDS})"))
                continue
            parts = []
            rejection = None
            for name, value in fields.items():
                entry = keys.get((measurement, name))
                if entry is None:
                    entry = keys[(measurement, name)] = self._key(measurement, name)
                if type(entry) is Rejection:
                    rejection = entry
                    break
                prefix, expected = entry
                kind = type(value)
                if kind is float:
                    if value != value or value in (_INF, _NINF):
                        rejection = Rejection("field_value", f"{measurement}.{name}: not a finite number")
                        break
                    text = repr(value)
                elif kind is bool:
                    text = "true" if value else "false"
                elif kind is int:
                    if not INT64_MIN <= value <= INT64_MAX:
                        rejection = Rejection("field_value", f"{measurement}.{name}: integer out of int64 range")
                        break
                    text = f"{value}i"
                elif kind is str:
                    if len(value) > MAX_STRING_FIELD:
                        rejection = Rejection("field_value",
                                              f"{measurement}.{name}: string longer than {MAX_STRING_FIELD}")
                        break
                    why = unwritable(value)
                    if why:
                        rejection = Rejection("field_value", f"{measurement}.{name} {why}")
                        break
                    text = format_value(value)
                else:
                    rejection = Rejection("field_type", f"{measurement}.{name}: unsupported value type "
                                                        f"{kind.__name__}")
                    break
                if expected is not None and _TYPE_NAMES[kind] != expected:
                    rejection = Rejection("field_type", f"{measurement}.{name} must be {expected}, "
                                                        f"got {_TYPE_NAMES[kind]}")
                    break
                parts.append(prefix + text)
            if rejection is not None:
                out.rejections.append(rejection)
                continue
            out.lines.append(f"{head} {','.join(parts)} {time_ns}")
            if time_ns > out.newest_ns:
                out.newest_ns = time_ns
            if not out.oldest_ns or time_ns < out.oldest_ns:
                out.oldest_ns = time_ns
        return out


_INF, _NINF = float("inf"), float("-inf")
