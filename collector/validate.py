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


_TYPES = {"float": float, "int": int, "bool": bool, "str": str}
_CACHE_LIMIT = 100_000
_NO_TAGS: dict[str, str] = {}


class Converter:
    """Validates raw samples and turns them into line protocol in one pass.

    Hubs send the same tag sets and field names every cycle, so what depends only on names is
    checked once and cached: the escaped ``measurement,tags`` head of each (hub, host,
    measurement, tags), for each (measurement, field names) the escaped ``name=`` keys and the
    catalogued types, and each accepted shape (hub, host, measurement, tags, field names). A
    sample of an accepted shape needs only its time and values checked; any other takes the
    full path, which names the problem. Caches are bounded (cleared when full).
    """

    def __init__(self) -> None:
        self._shapes: dict[tuple, tuple[str, tuple]] = {}  # accepted shapes only
        self._heads: dict[tuple, str | Rejection] = {}
        self._schemas: dict[tuple, tuple[tuple[str, str, type | None], ...] | Rejection] = {}
        self._strings: dict[str, str] = {}  # valid short string values, quoted and escaped

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

    @staticmethod
    def _schema(measurement: str, names) -> tuple[tuple[str, str, type | None], ...] | Rejection:
        """Per field, in order: the escaped ``name=`` (``,name=`` after the first), the name and
        the catalogued type (None for a field the catalogue does not know)."""
        spec = MEASUREMENTS.get(measurement)
        out = []
        for name in names:
            if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
                return Rejection("name", f"{measurement}: field name {name!r} is not a valid name")
            fspec = spec.fields.get(name) if spec is not None else None
            out.append((("," if out else "") + escape_key(name) + "=", name,
                        _TYPES[fspec.type] if fspec is not None else None))
        return tuple(out)

    def _string(self, measurement: str, name: str, value: str) -> str | Rejection:
        """A string field value quoted and escaped, or why it cannot be written (cached:
        status strings repeat)."""
        text = self._strings.get(value)
        if text is None:
            if len(value) > MAX_STRING_FIELD:
                return Rejection("field_value", f"{measurement}.{name}: string longer than {MAX_STRING_FIELD}")
            why = unwritable(value)
            if why:
                return Rejection("field_value", f"{measurement}.{name} {why}")
            text = format_value(value)
            if len(value) <= 64:
                self._strings[value] = text
        return text

    def _shape(self, measurement: str, time_ns: int, tags: dict[str, str], fields: dict, topic: Topic,
               now_ns: int, latest: int) -> tuple[str, tuple] | Rejection:
        """The line head (``measurement,tags `` ) and field schema of a sample whose shape
        passed :func:`check_sample_shape`, cached for the next sample shaped like it; or why
        it is rejected, apart from its field values."""
        if time_ns > latest:
            return Rejection("future", f"{measurement} at {time_ns} is {(time_ns - now_ns) / 1e9:.0f}s in the future")
        if time_ns < MIN_TIME_NS:
            return Rejection("time", f"{measurement} at {time_ns} is before the year 2000")
        head_key = (topic.hub, topic.host, measurement, *tags.items())
        head = self._heads.get(head_key)
        if head is None:
            head = self._heads[head_key] = self._head(measurement, tags, topic)
        if type(head) is Rejection:
            return head
        if len(fields) > MAX_FIELDS:
            return Rejection("too_many_fields", f"{measurement} has {len(fields)} fields (max {MAX_FIELDS})")
        schema_key = (measurement, *fields)
        schema = self._schemas.get(schema_key)
        if schema is None:
            schema = self._schemas[schema_key] = self._schema(measurement, fields)
        if type(schema) is Rejection:
            return schema
        shape = self._shapes[(topic.hub, topic.host, measurement, *tags.items(), *fields)] = (head + " ", schema)
        return shape

    def convert(self, samples: list, topic: Topic, now_ns: int | None = None) -> Converted:
        """Line protocol for every valid sample of a message that passed :func:`check_envelope`."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        latest = now_ns + MAX_FUTURE_NS
        out = Converted()
        lines, rejections = out.lines, out.rejections
        shapes = self._shapes
        if max(len(shapes), len(self._heads), len(self._schemas), len(self._strings)) > _CACHE_LIMIT:
            for cache in (shapes, self._heads, self._schemas, self._strings):
                cache.clear()
        hub, host = topic.hub, topic.host
        newest, oldest = 0, 0
        for obj in samples:
            # Fast path: a sample shaped like an accepted one (same measurement, tags and field
            # names from the same hub and host) needs only its time and values checked.
            try:
                measurement, time_ns, fields = obj["m"], obj["t"], obj["f"]
                tags = obj.get("tags", _NO_TAGS)
                shape = shapes.get((hub, host, measurement, *tags.items(), *fields))
            except (TypeError, KeyError, AttributeError):  # not a dict, a key missing, unhashable
                shape = None
            if (shape is None or len(obj) != (3 if tags is _NO_TAGS else 4) or type(time_ns) is not int
                    or not MIN_TIME_NS <= time_ns <= latest or type(fields) is not dict):
                try:
                    measurement, time_ns, tags, fields = check_sample_shape(obj)
                except WireError as exc:
                    rejections.append(Rejection(exc.reason, str(exc)))
                    continue
                shape = self._shape(measurement, time_ns, tags, fields, topic, now_ns, latest)
                if type(shape) is Rejection:
                    rejections.append(shape)
                    continue
            head, schema = shape
            parts = [head]
            rejection = None
            for (key, name, expected), value in zip(schema, fields.values()):
                kind = type(value)
                if kind is float:
                    text = repr(value)
                    if "n" in text:  # inf, -inf and nan are the only float reprs with an "n"
                        rejection = Rejection("field_value", f"{measurement}.{name}: "
                                                             "not a finite number")
                        break
                elif kind is bool:
                    text = "true" if value else "false"
                elif kind is str:
                    text = self._string(measurement, name, value)
                    if type(text) is Rejection:
                        rejection = text
                        break
                elif kind is int:
                    if not INT64_MIN <= value <= INT64_MAX:
                        rejection = Rejection("field_value", f"{measurement}.{name}: "
                                                             "integer out of int64 range")
                        break
                    text = f"{value}i"
                else:
                    rejection = Rejection("field_type", f"{measurement}.{name}: "
                                                        f"unsupported value type {kind.__name__}")
                    break
                if kind is not expected and expected is not None:
                    rejection = Rejection("field_type", f"{measurement}.{name} must be "
                                                        f"{expected.__name__}, got {kind.__name__}")
                    break
                parts.append(key)
                parts.append(text)
            if rejection is not None:
                rejections.append(rejection)
                continue
            parts.append(f" {time_ns}")
            lines.append("".join(parts))
            if time_ns > newest:
                newest = time_ns
            if not oldest or time_ns < oldest:
                oldest = time_ns
        out.newest_ns, out.oldest_ns = newest, oldest
        return out
