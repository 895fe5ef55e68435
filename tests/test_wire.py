"""The wire format both sides import: topics, envelope, compression, hostile payloads."""

from __future__ import annotations

import json
import zlib

import pytest

from agent import wire
from agent.wire import Envelope, Sample, WireError, decode, encode, parse_topic, topic
from agent.wire_dict import DICT_ID, DICTIONARY

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


def deflate(plain: bytes, zdict: bytes | None = None) -> bytes:
    deflater = zlib.compressobj(6, zdict=zdict) if zdict else zlib.compressobj(6)
    return deflater.compress(plain) + deflater.flush()


def test_encode_picks_the_smaller_form():
    for env in (Envelope("h", "g", 1, 1.0, ()), envelope(1), envelope(20)):
        plain = encode(env, compress=False)
        assert len(encode(env)) == min(len(plain), len(deflate(plain, DICTIONARY)))
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


@pytest.mark.parametrize("zdict", [None, DICTIONARY])
def test_zlib_bomb_is_refused_without_inflating_it_all(zdict):
    bomb = deflate(b"{" + b" " * (64 * 1024 * 1024) + b"}", zdict)
    assert len(bomb) < wire.MAX_PAYLOAD_BYTES
    with pytest.raises(WireError) as info:
        decode(bomb)
    assert info.value.reason == "too_large"


def default_probe_cycle(i: int) -> list[Sample]:
    """One cycle of the default probes' samples, in the shape the agent sends them."""
    t = T + i * 10**10
    hh = {"hub": "gilgit-sco-01", "host": "gw01"}
    return [
        Sample("system", t, hh, {"uptime_seconds": 10657.64 + 10 * i, "boot_time_seconds": 1795577164.0,
                                 "memory_used_percent": 2.94 + i / 100, "load1": 1.45, "disk_used_percent": 22.34,
                                 "cpu_percent": 9.52 - i / 10, "clock_synced": True}),
        *(Sample("net", t + 1, {"iface": iface, **hh},
                 {"rx_bytes_total": 387078903 + 1517 * i, "rx_packets_total": 11622 + 9 * i, "rx_errors_total": 0,
                  "rx_drops_total": 0, "tx_bytes_total": 996520 + 733 * i, "tx_packets_total": 8969 + 7 * i,
                  "tx_errors_total": 0, "tx_drops_total": 0, "link_up": True}) for iface in ("eth0", "wlan0")),
        *(Sample("ping", t + 2, {"target": name, "address": address, **hh},
                 {"loss_percent": 0.0, "reachable": True, "method": "icmp", "rtt_min_ms": 11.9 + i,
                  "rtt_avg_ms": 12.4 + i, "rtt_max_ms": 13.1 + i})
          for name, address in (("gateway", "192.168.1.1"), ("internet", "1.1.1.1"))),
        Sample("ups", t + 3, {"ups": "hubups", "source": "nut", **hh},
               {"battery_charge_percent": 100.0, "battery_runtime_seconds": 1980.0 - i, "battery_voltage_volts": 27.2,
                "input_voltage_volts": 229.0 + i % 3, "load_percent": 12.0, "status": "OL", "on_line": True,
                "on_battery": False, "low_battery": False, "charging": False, "discharging": False,
                "replace_battery": False, "overload": False}),
        Sample("agent", t + 4, hh, {"outbox_samples": 7.0 * i, "outbox_messages": 0.0, "outbox_bytes": 45056.0,
                                    "mqtt_connected": True, "clock_trusted": True, "messages_published_total": 1234 + i,
                                    "messages_acked_total": 1233 + i, "dropped_samples_total": 0}),
    ]


@pytest.mark.parametrize("cycles,saving", [(1, 0.3), (6, 0.1)])
def test_the_preset_dictionary_pays_for_a_cycle_and_for_a_minute(cycles, saving):
    env = Envelope("gilgit-sco-01", "gw01", 1042, 1795545022.12,
                   tuple(s for i in range(cycles) for s in default_probe_cycle(i)))
    packed = encode(env)
    plain = encode(env, compress=False)
    assert packed[1] & 0x20 and int.from_bytes(packed[2:6], "big") == DICT_ID, "FDICT with our dictionary's id"
    assert len(packed) <= (1 - saving) * len(deflate(plain)), (len(packed), len(deflate(plain)))
    assert decode(packed) == env


def test_streams_without_a_dictionary_still_decode_and_an_unknown_one_is_named():
    env = envelope(20)
    plain = encode(env, compress=False)
    assert decode(deflate(plain)) == env  # what agents before the dictionary sent
    foreign = b'{"m":"something else entirely"}'
    with pytest.raises(WireError) as info:
        decode(deflate(plain, foreign))
    assert info.value.reason == "zlib" and "unknown preset dictionary" in str(info.value)
    assert f"{zlib.adler32(foreign):#010x}" in str(info.value)


def test_the_dictionary_never_changes():
    # Payloads name it only by this id: changing its bytes would make every reader refuse them.
    assert DICT_ID == zlib.adler32(DICTIONARY) == 0x7A8A66CE and len(DICTIONARY) == 1877


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
