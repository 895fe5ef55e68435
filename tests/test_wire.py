"""The wire format both sides import: topics, envelope, compression, hostile payloads."""

from __future__ import annotations

import json
import zlib

import pytest

from agent import wire
from agent.wire import Envelope, Sample, WireError, decode, encode, parse_topic, topic

T = 1795545020000000000


def envelope(n=3, **kw):
    samples = tuple(Sample("ups", T + i, {"ups": "hubups", "source": "nut"},
                           {"battery_charge_percent": 80.0 - i, "status": "OB DISCHRG", "on_battery": True})
                    for i in range(n))
    return Envelope(kw.get("hub", "gilgit-sco-01"), kw.get("host", "gw01"), kw.get("seq", 1042), 1795545022.12, samples)


def test_topics_build_and_parse():
    t = topic("hubwatch", "gilgit-sco-01", "gw01", "metrics")
    assert t == "hubwatch/v1/gilgit-sco-01/gw01/metrics"
    parsed = parse_topic("hubwatch", t)
    assert (parsed.hub, parsed.host, parsed.kind) == ("gilgit-sco-01", "gw01", "metrics")
    assert wire.subscription("hubwatch", "status") == "hubwatch/v1/+/+/status"


@pytest.mark.parametrize("hub,host,kind", [("Gilgit", "gw01", "metrics"), ("a/b", "gw", "metrics"),
                                           ("hub", "+", "metrics"), ("hub", "gw", "secrets"), ("", "gw", "ack")])
def test_topic_refuses_parts_that_would_break_the_tree(hub, host, kind):
    with pytest.raises(ValueError):
        topic("hubwatch", hub, host, kind)


@pytest.mark.parametrize("name", ["hubwatch/v2/h/g/metrics", "other/v1/h/g/metrics", "hubwatch/v1/h/g/x/metrics",
                                  "hubwatch/v1/H/g/metrics", "hubwatch/v1/h/g/nope"])
def test_foreign_topics_are_rejected(name):
    with pytest.raises(WireError) as info:
        parse_topic("hubwatch", name)
    assert info.value.reason == "topic"


def test_round_trip_plain_and_compressed():
    env = envelope(50)
    packed = encode(env)
    assert packed[:1] != b"{", "50 similar samples compress smaller, so zlib is chosen"
    assert decode(packed) == env
    plain = encode(env, compress=False)
    assert plain[:1] == b"{" and decode(plain) == env
    assert json.loads(plain)["samples"][0] == {"m": "ups", "t": T, "tags": {"ups": "hubups", "source": "nut"},
                                               "f": {"battery_charge_percent": 80.0, "status": "OB DISCHRG",
                                                     "on_battery": True}}


def test_encode_picks_the_smaller_form():
    for env in (Envelope("h", "g", 1, 1.0, ()), envelope(1), envelope(20)):
        plain = encode(env, compress=False)
        assert len(encode(env)) == min(len(plain), len(zlib.compress(plain, 6)))
    assert encode(envelope(1), compress=True)[:1] == b"x" and encode(envelope(1), compress=False)[:1] == b"{"


def test_sample_types_survive_the_round_trip():
    s = Sample("net", T, {"iface": "eth0"}, {"rx_bytes_total": 2**53 + 1, "link_up": True, "speed_mbps": 100.0})
    [back] = decode(encode(Envelope("h", "g", 1, 1.0, (s,)))).samples
    assert back.fields["rx_bytes_total"] == 2**53 + 1 and isinstance(back.fields["speed_mbps"], float)
    assert back.fields["link_up"] is True


def test_samples_are_immutable():
    s = Sample("system", T, {}, {"load1": 0.5})
    with pytest.raises(Exception):
        s.fields["load1"] = 9.0  # type: ignore[index]
    with pytest.raises(Exception):
        s.measurement = "x"  # type: ignore[misc]


@pytest.mark.parametrize("payload,reason", [
    (b"", "shape"),
    (b"{not json", "json"),
    (b"[1,2]", "json"),  # starts with '[': not '{', so it is inflated and fails as zlib... see below
    (b'{"v": 2, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": []}', "version"),
    (b'{"v": 1, "hub": "H!", "host": "g", "seq": 1, "sent_at": 1, "samples": []}', "shape"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": -1, "sent_at": 1, "samples": []}', "shape"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": [{"m": "Bad Name", "t": 1, "f": {"a": 1}}]}', "name"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": [{"m": "ups", "t": 1, "f": {"a": NaN}}]}', "json"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": [{"m": "ups", "t": 1, "f": {"a": [1]}}]}', "field_type"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": [{"m": "ups", "t": "now", "f": {"a": 1}}]}', "time"),
    (b'{"v": 1, "hub": "h", "host": "g", "seq": 1, "sent_at": 1, "samples": [{"m": "ups", "t": 1, "f": {}}]}', "shape"),
    (b"\x78\x9c\x01\x02", "zlib"),
])
def test_malformed_payloads_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(WireError) as info:
        decode(payload)
    if payload == b"[1,2]":
        assert info.value.reason == "zlib"
    else:
        assert info.value.reason == reason, info.value


def test_zlib_bomb_is_refused_without_inflating_it_all():
    bomb = zlib.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", 9)
    assert len(bomb) < wire.MAX_PAYLOAD_BYTES
    with pytest.raises(WireError) as info:
        decode(bomb)
    assert info.value.reason == "too_large"


def test_oversized_payload_is_refused():
    with pytest.raises(WireError) as info:
        decode(b"{" + b" " * wire.MAX_PAYLOAD_BYTES + b"}")
    assert info.value.reason == "too_large"


def test_ack_ranges_round_trip():
    seqs = [5, 1, 2, 3, 9, 10, 7]
    assert wire.seq_ranges(seqs) == [[1, 3], [5, 5], [7, 7], [9, 10]]
    assert wire.decode_ack(wire.encode_ack(seqs)) == [(1, 3), (5, 5), (7, 7), (9, 10)]


@pytest.mark.parametrize("payload", [b"nope", b'{"v":1}', b'{"v":1,"ranges":[[3,1]]}', b'{"v":1,"ranges":[[-1,2]]}',
                                     b'{"v":1,"ranges":[[1,true]]}', b'{"v":2,"ranges":[]}'])
def test_bad_acks_are_rejected(payload):
    with pytest.raises(WireError):
        wire.decode_ack(payload)


def test_status_values():
    assert wire.decode_status(wire.encode_status("online")) == "online"
    with pytest.raises(WireError):
        wire.decode_status(b"rebooting")
