"""The wire format, defined once and imported by both the agent and the collector.

Topics::

    {prefix}/v1/{hub}/{host}/metrics   batched samples, QoS 1, not retained
    {prefix}/v1/{hub}/{host}/events    UPS status changes and on-battery samples, QoS 1
    {prefix}/v1/{hub}/{host}/status    retained online / offline / stopped (offline = Last Will)
    {prefix}/v1/{hub}/{host}/ack       collector -> agent: seqs safely stored

Payload: a JSON envelope, or the same JSON compressed with zlib. A reader tells them
apart by the first byte: ``{`` is plain JSON (a zlib stream never starts with it).

The agent compresses with a preset dictionary (RFC 1950 ``FDICT``: the header's flag bit
0x20, then the dictionary's adler32 in four bytes), ``agent.wire_dict.DICTIONARY``: envelope
JSON with every catalogue name, so the names of even a one-cycle message cost back-references
instead of literals (measured on the default probes: a one-cycle message 741 -> 401 bytes, a
60 s batch 1,947 -> 1,547). A reader picks the dictionary by that id from
``agent.wire_dict.DICTIONARIES`` and still reads streams without one; an unknown id is a
WireError ``zlib`` that says so.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Union

from agent.wire_dict import DICTIONARIES, DICTIONARY

WIRE_VERSION = 1
TOPIC_VERSION = "v1"
KINDS = ("metrics", "events", "status", "ack")
STATUS_VALUES = ("online", "offline", "stopped")

#: Hub and host identifiers: they become MQTT topic levels and InfluxDB tags.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: Measurement, tag and field names.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: Limits a reader enforces before it trusts a payload.
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_DECOMPRESSED_BYTES = 4 * 1024 * 1024

FieldValue = Union[float, int, bool, str]


class WireError(ValueError):
    """A topic or payload that does not follow the wire format; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement taken at one instant: immutable once made.

    ``time_ns`` is fixed when the sample is taken, so a replayed sample lands on the same
    InfluxDB point (redelivery overwrites, never duplicates).
    """

    measurement: str
    time_ns: int
    tags: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, FieldValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def with_tags(self, **tags: str) -> "Sample":
        """A copy with ``tags`` added (existing keys overwritten)."""
        return Sample(self.measurement, self.time_ns, {**self.tags, **tags}, self.fields)

    def to_json(self) -> dict[str, Any]:
        """The envelope's sample shape: ``{"m", "t", "tags", "f"}``."""
        return {"m": self.measurement, "t": self.time_ns, "tags": dict(self.tags), "f": dict(self.fields)}

    @classmethod
    def from_json(cls, obj: Any) -> "Sample":
        """Parse one sample of an envelope; WireError names what is wrong."""
        m, t, tags, fields = check_sample_shape(obj)
        for name, value in fields.items():
            if not isinstance(value, (bool, int, float, str)):
                raise WireError("field_type", f"field {name!r} has unsupported value type {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise WireError("field_value", f"field {name!r} is not a finite number")
        return cls(m, t, tags, fields)


def check_sample_shape(obj: Any) -> tuple[str, int, dict[str, str], dict[str, Any]]:
    """The parts of one raw sample ``{"m", "t", "tags", "f"}`` after checking its shape
    (field values are left to the caller). WireError names what is wrong."""
    if type(obj) is not dict:
        raise WireError("shape", "a sample must be a JSON object")
    if len(obj) > 4 or not obj.keys() <= _SAMPLE_KEYS:
        raise WireError("shape", f"sample has unknown keys {sorted(set(obj) - _SAMPLE_KEYS)}")
    m, t, tags, fields = obj.get("m"), obj.get("t"), obj.get("tags", {}), obj.get("f")
    if type(m) is not str or not NAME_PATTERN.fullmatch(m):
        raise WireError("name", f"measurement name {m!r} is not [a-z][a-z0-9_]{{0,63}}")
    if type(t) is not int or t < 0:
        raise WireError("time", f"sample time {t!r} is not a non-negative integer of nanoseconds")
    if type(tags) is not dict or not all(type(k) is str and type(v) is str for k, v in tags.items()):
        raise WireError("shape", "sample tags must be an object of strings")
    if type(fields) is not dict or not fields:
        raise WireError("shape", "sample fields must be a non-empty object")
    return m, t, tags, fields


_SAMPLE_KEYS = frozenset({"m", "t", "tags", "f"})


# --- topics -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Topic:
    prefix: str
    hub: str
    host: str
    kind: str

    def __str__(self) -> str:
        return f"{self.prefix}/{TOPIC_VERSION}/{self.hub}/{self.host}/{self.kind}"


def topic(prefix: str, hub: str, host: str, kind: str) -> str:
    """Build a topic; ValueError when a part would break the topic tree."""
    for what, value in (("hub", hub), ("host", host)):
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"{what} {value!r} does not match {ID_PATTERN.pattern}")
    if kind not in KINDS:
        raise ValueError(f"topic kind {kind!r} is not one of {KINDS}")
    check_prefix(prefix)
    return str(Topic(prefix, hub, host, kind))


def check_prefix(prefix: str) -> None:
    if not prefix or any(c in prefix for c in "+#\0") or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty, without wildcards or outer slashes")


def parse_topic(prefix: str, name: str) -> Topic:
    """Split a received topic into its parts; WireError when it is not one of ours."""
    head = f"{prefix}/{TOPIC_VERSION}/"
    if not name.startswith(head):
        raise WireError("topic", f"topic {name!r} is not under {head!r}")
    parts = name[len(head):].split("/")
    if len(parts) != 3:
        raise WireError("topic", f"topic {name!r} is not {head}HUB/HOST/KIND")
    hub, host, kind = parts
    if not ID_PATTERN.fullmatch(hub) or not ID_PATTERN.fullmatch(host):
        raise WireError("topic", f"topic {name!r} has an invalid hub or host")
    if kind not in KINDS:
        raise WireError("topic", f"topic {name!r} has unknown kind {kind!r}")
    return Topic(prefix, hub, host, kind)


def subscription(prefix: str, kind: str, hub: str = "+", host: str = "+") -> str:
    """A subscription filter, e.g. ``hubwatch/v1/+/+/metrics``."""
    check_prefix(prefix)
    return f"{prefix}/{TOPIC_VERSION}/{hub}/{host}/{kind}"


# --- envelope -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Envelope:
    hub: str
    host: str
    seq: int
    sent_at: float
    samples: tuple[Sample, ...]

    def to_json(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "hub": self.hub, "host": self.host, "seq": self.seq,
                "sent_at": self.sent_at, "samples": [s.to_json() for s in self.samples]}


def encode(envelope: Envelope, compress: bool | None = None) -> bytes:
    """Serialise an envelope. ``compress=None`` uses zlib only when it is smaller."""
    plain = json.dumps(envelope.to_json(), separators=(",", ":"), ensure_ascii=False,
                       allow_nan=False).encode()
    if compress is False:
        return plain
    deflater = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)
    packed = deflater.compress(plain) + deflater.flush()
    if compress or len(packed) < len(plain):
        return packed
    return plain


def _inflate(payload: bytes) -> bytes:
    if len(payload) >= 2 and payload[1] & 0x20:  # FDICT: a preset dictionary, named by its adler32
        if len(payload) < 6:
            raise WireError("zlib", "zlib stream is truncated")
        dict_id = int.from_bytes(payload[2:6], "big")
        zdict = DICTIONARIES.get(dict_id)
        if zdict is None:
            raise WireError("zlib", f"payload was compressed with an unknown preset dictionary (adler32 "
                                    f"{dict_id:#010x}); this reader knows "
                                    f"{', '.join(f'{k:#010x}' for k in DICTIONARIES)} (upgrade hubwatch here?)")
        inflater = zlib.decompressobj(zdict=zdict)
    else:
        inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_DECOMPRESSED_BYTES + 1)
    except zlib.error as exc:
        raise WireError("zlib", f"payload is neither JSON nor valid zlib: {exc}") from None
    if len(out) > MAX_DECOMPRESSED_BYTES or inflater.unconsumed_tail:
        raise WireError("too_large", f"payload inflates past {MAX_DECOMPRESSED_BYTES} bytes")
    if not inflater.eof:
        raise WireError("zlib", "zlib stream is truncated")
    return out


@dataclass(frozen=True, slots=True)
class RawEnvelope:
    """An envelope whose header is checked and whose samples are still raw JSON objects
    (the collector validates and converts them in one pass)."""

    hub: str
    host: str
    seq: int
    sent_at: float
    samples: list[Any]


def decode_raw(payload: bytes) -> RawEnvelope:
    """Parse a payload's envelope header; WireError (with a reason code) on anything wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("too_large", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if not payload:
        raise WireError("shape", "empty payload")
    text = payload if payload[:1] == b"{" else _inflate(payload)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("json", f"payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("shape", "envelope must be a JSON object")
    if obj.get("v") != WIRE_VERSION:
        raise WireError("version", f"envelope version {obj.get('v')!r} is not {WIRE_VERSION}")
    hub, host, seq, sent_at, samples = (obj.get(k) for k in ("hub", "host", "seq", "sent_at", "samples"))
    if not isinstance(hub, str) or not ID_PATTERN.fullmatch(hub):
        raise WireError("shape", f"envelope hub {hub!r} is invalid")
    if not isinstance(host, str) or not ID_PATTERN.fullmatch(host):
        raise WireError("shape", f"envelope host {host!r} is invalid")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WireError("shape", f"envelope seq {seq!r} is not a non-negative integer")
    if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool):
        raise WireError("shape", "envelope sent_at is not a number")
    if not isinstance(samples, list):
        raise WireError("shape", "envelope samples is not a list")
    return RawEnvelope(hub, host, seq, float(sent_at), samples)


def decode(payload: bytes) -> Envelope:
    """Parse a payload into an Envelope of Samples; WireError (with a reason code) on anything wrong."""
    raw = decode_raw(payload)
    return Envelope(raw.hub, raw.host, raw.seq, raw.sent_at, tuple(Sample.from_json(s) for s in raw.samples))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


# --- acknowledgements (collector -> agent) ------------------------------------------------
# Payload: {"v": 1, "ranges": [[first, last], ...]}: the seqs, inclusive ranges, now safely in
# InfluxDB. Ranges keep an ack small when a backlog of thousands of messages drains.

MAX_ACK_RANGES = 10_000


def seq_ranges(seqs: "list[int] | set[int]") -> list[list[int]]:
    """Collapse seqs into sorted inclusive ``[first, last]`` ranges."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def merge_ranges(ranges: "list[tuple[int, int]]") -> list[tuple[int, int]]:
    """Inclusive ``(first, last)`` ranges, sorted, with overlapping and adjacent ones joined."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def encode_ack(seqs: "list[int] | set[int]") -> bytes:
    return json.dumps({"v": WIRE_VERSION, "ranges": seq_ranges(seqs)}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> list[tuple[int, int]]:
    """The acknowledged ``(first, last)`` ranges; WireError when the payload is not an ack."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("json", f"ack is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != WIRE_VERSION or not isinstance(obj.get("ranges"), list):
        raise WireError("shape", "ack must be {\"v\": 1, \"ranges\": [[first, last], ...]}")
    ranges = obj["ranges"]
    if len(ranges) > MAX_ACK_RANGES:
        raise WireError("too_large", f"ack has more than {MAX_ACK_RANGES} ranges")
    out = []
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or r[0] < 0 or r[1] < r[0]):
            raise WireError("shape", f"ack range {r!r} is not [first, last] with 0 <= first <= last")
        out.append((r[0], r[1]))
    return out


def encode_status(status: str) -> bytes:
    if status not in STATUS_VALUES:
        raise ValueError(f"status {status!r} is not one of {STATUS_VALUES}")
    return status.encode()


def decode_status(payload: bytes) -> str:
    text = payload.decode("ascii", "replace").strip()
    if text not in STATUS_VALUES:
        raise WireError("status", f"status {text[:40]!r} is not one of {STATUS_VALUES}")
    return text
