"""Everything a message must satisfy before any of it reaches InfluxDB.

The hub and host of a point come from the topic the broker authorised, never from the
payload alone: a payload that disagrees with its topic is rejected whole. Within an accepted
message, a bad sample is rejected alone (counted, with its reason) and the rest is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.catalogue import MEASUREMENTS
from agent.wire import NAME_PATTERN, Envelope, Topic
from collector.lineproto import check_value, format_line, unwritable

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


class MessageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def check_envelope(envelope: Envelope, topic: Topic) -> None:
    """MessageRejected when the envelope as a whole cannot be trusted."""
    if envelope.hub != topic.hub or envelope.host != topic.host:
        raise MessageRejected("topic_mismatch", f"payload says {envelope.hub}/{envelope.host}, "
                                                f"topic says {topic.hub}/{topic.host}")
    if not envelope.samples:
        raise MessageRejected("empty", "message carries no samples")


def _check_sample(measurement: str, tags, fields, time_ns: int, topic: Topic, now_ns: int) -> Rejection | None:
    if measurement in RESERVED_MEASUREMENTS:
        return Rejection("reserved", f"measurement {measurement!r} is written by the collector only")
    if time_ns > now_ns + MAX_FUTURE_NS:
        return Rejection("future", f"{measurement} at {time_ns} is {(time_ns - now_ns) / 1e9:.0f}s in the future")
    if time_ns < MIN_TIME_NS:
        return Rejection("time", f"{measurement} at {time_ns} is before the year 2000")
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
    if len(fields) > MAX_FIELDS:
        return Rejection("too_many_fields", f"{measurement} has {len(fields)} fields (max {MAX_FIELDS})")
    spec = MEASUREMENTS.get(measurement)
    for key, value in fields.items():
        if not NAME_PATTERN.fullmatch(key) or key in RESERVED_NAMES:
            return Rejection("name", f"{measurement}: field name {key!r} is not a valid name")
        why = check_value(value)
        if why:
            return Rejection("field_value", f"{measurement}.{key}: {why}")
        if isinstance(value, str):
            if len(value) > MAX_STRING_FIELD:
                return Rejection("field_value", f"{measurement}.{key}: string longer than {MAX_STRING_FIELD}")
            why = unwritable(value)
            if why:
                return Rejection("field_value", f"{measurement}.{key} {why}")
        if spec is not None:
            fspec = spec.fields.get(key)
            if fspec is not None and not fspec.accepts(value):
                return Rejection("field_type", f"{measurement}.{key} must be {fspec.type}, "
                                               f"got {type(value).__name__}")
    return None


def convert(envelope: Envelope, topic: Topic, now_ns: int | None = None) -> Converted:
    """Line protocol for every valid sample of a message that passed :func:`check_envelope`."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    out = Converted()
    for sample in envelope.samples:
        rejection = _check_sample(sample.measurement, sample.tags, sample.fields, sample.time_ns, topic, now_ns)
        if rejection is not None:
            out.rejections.append(rejection)
            continue
        tags = dict(sample.tags)
        tags["hub"], tags["host"] = topic.hub, topic.host
        out.lines.append(format_line(sample.measurement, tags, sample.fields, sample.time_ns))
        if sample.time_ns > out.newest_ns:
            out.newest_ns = sample.time_ns
    return out
