"""Hostile and malformed input: the collector stays up, counts each under its reason, stores
no garbage point, and stores legal-but-tricky values exactly as sent."""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter

from agent import wire
from agent.wire import Sample
from tests.collector_harness import count_points, envelope, start_collector, wait_for

HUB, HOST = "skardu-01", "gw01"
NOW = time.time_ns()


def topic(kind="metrics", hub=HUB, host=HOST):
    return wire.topic("hubwatch", hub, host, kind)


def env(samples, hub=HUB, host=HOST, seq=1, **override) -> bytes:
    obj = {"v": 1, "hub": hub, "host": host, "seq": seq, "sent_at": time.time(), "samples": samples}
    obj.update(override)
    return json.dumps(obj).encode()


def sample(m="custom", t=None, tags=None, f=None):
    return {"m": m, "t": NOW if t is None else t, "tags": tags or {}, "f": {"v": 1.0} if f is None else f}


BAD = [  # (what, topic, payload, reason)
    ("plain text", topic(), b"hello, collector", "zlib"),
    ("broken json", topic(), b"{not json", "json"),
    ("json array", topic(), b"[1, 2, 3]", "zlib"),
    ("zlib bomb", topic(), zlib.compress(b"{" + b" " * 50_000_000 + b"}", 9), "too_large"),
    ("1 MiB payload", topic(), b"{" + b" " * (1024 * 1024) + b"}", "too_large"),
    ("zlib garbage", topic(), b"\x78\x9c" + bytes(range(256)), "zlib"),
    ("truncated zlib", topic(), zlib.compress(env([sample()]))[:-6], "zlib"),
    ("unknown version", topic(), env([sample()], v=2), "version"),
    ("no version", topic(), json.dumps({"hub": HUB, "host": HOST, "seq": 1, "samples": []}).encode(), "version"),
    ("hub disagrees with topic", topic(), env([sample()], hub="gilgit-sco-01"), "topic_mismatch"),
    ("host disagrees with topic", topic(), env([sample()], host="lab99"), "topic_mismatch"),
    ("negative seq", topic(), env([sample()], seq=-5), "shape"),
    ("string seq", topic(), env([sample()], seq="7"), "shape"),
    ("samples not a list", topic(), env({"m": "x"}), "shape"),
    ("empty samples", topic(), env([]), "empty"),
    ("sample not an object", topic(), env(["ups 1"]), "shape"),
    ("sample with unknown key", topic(), env([{**sample(), "x": 1}]), "shape"),
    ("measurement with space", topic(), env([sample(m="bad name")]), "name"),
    ("measurement with comma", topic(), env([sample(m="a,b")]), "name"),
    ("measurement upper case", topic(), env([sample(m="UPS")]), "name"),
    ("measurement with quote", topic(), env([sample(m='u"ps')]), "name"),
    ("measurement with newline", topic(), env([sample(m="ups\nevil,hub=x v=1")]), "name"),
    ("measurement with backslash", topic(), env([sample(m="ups\\")]), "name"),
    ("field name with space", topic(), env([sample(f={"a b": 1.0})]), "name"),
    ("field name time", topic(), env([sample(f={"time": 1.0})]), "name"),
    ("tag key with equals", topic(), env([sample(tags={"a=b": "x"})]), "name"),
    ("tag value with newline", topic(), env([sample(tags={"ups": "a\nb"})]), "tag_value"),
    ("tag value ending in backslash", topic(), env([sample(tags={"ups": "trail\\"})]), "tag_value"),
    ("empty tag value", topic(), env([sample(tags={"ups": ""})]), "tag_value"),
    ("300-char tag value", topic(), env([sample(tags={"ups": "x" * 300})]), "tag_value"),
    ("control char in tag", topic(), env([sample(tags={"ups": "a\x07b"})]), "tag_value"),
    ("NaN", topic(), b'{"v":1,"hub":"%s","host":"%s","seq":1,"sent_at":1,"samples":[{"m":"custom","t":%d,"f":{"v":NaN}}]}'
     % (HUB.encode(), HOST.encode(), NOW), "json"),
    ("Infinity", topic(), b'{"v":1,"hub":"%s","host":"%s","seq":1,"sent_at":1,"samples":[{"m":"custom","t":%d,"f":{"v":-Infinity}}]}'
     % (HUB.encode(), HOST.encode(), NOW), "json"),
    ("1e999 overflows to inf", topic(), b'{"v":1,"hub":"%s","host":"%s","seq":1,"sent_at":1,"samples":[{"m":"custom","t":%d,"f":{"v":1e999}}]}'
     % (HUB.encode(), HOST.encode(), NOW), "field_value"),
    ("list value", topic(), env([sample(f={"v": [1, 2]})]), "field_type"),
    ("object value", topic(), env([sample(f={"v": {"a": 1}})]), "field_type"),
    ("null value", topic(), env([sample(f={"v": None})]), "field_type"),
    ("2 KiB string", topic(), env([sample(f={"note": "x" * 2048})]), "field_value"),
    ("string with newline", topic(), env([sample(f={"note": "a\nb"})]), "field_value"),
    ("int beyond int64", topic(), env([sample(f={"n": 2**70})]), "field_value"),
    ("a day ahead", topic(), env([sample(t=NOW + 86400 * 10**9)]), "future"),
    ("epoch zero", topic(), env([sample(t=0)]), "time"),
    ("float time", topic(), env([sample(t=1.5e18)]), "time"),
    ("negative time", topic(), env([sample(t=-1)]), "time"),
    ("10,000 fields", topic(), env([sample(f={f"f{i}": 1.0 for i in range(10_000)})]), "too_many_fields"),
    ("no fields", topic(), env([sample(f={})]), "shape"),
    ("spoofed alert", topic(), env([sample(m="alert", f={"state": "firing"})]), "reserved"),
    ("catalogue type mismatch", topic(), env([sample(m="ups", tags={"ups": "u", "source": "nut"},
                                                     f={"battery_charge_percent": "80"})]), "field_type"),
    ("hub tag spoof", topic(), env([sample(tags={"hub": "gilgit-sco-01"})]), "topic_mismatch"),
    ("bad status", topic("status"), b"rebooting", "status"),
    ("type conflict in InfluxDB", topic(), env([sample(m="conflict", f={"v": 7})]), "type_conflict"),
]

TRICKY_TAGS = ["a,b", "k=v", "with space", 'dq"uote', "in\\ner", "ümlaut ✓", "=,= ,"]
TRICKY_STRINGS = ['say "hi"', "back\\slash", "trailing\\", "ünïcode ✓"]


def test_hostile_corpus_is_counted_and_never_stored(tmp_path, mosquitto, influx):
    assert len({what for what, *_ in BAD}) >= 40
    influx.create_database("hubwatch")
    influx.write("hubwatch", f"conflict,hub={HUB},host={HOST} v=1.5 {NOW - 10**9}")  # v is a float forever
    collector = start_collector(tmp_path, mosquitto, influx, instance="hostile")
    good_tags = [Sample("custom", NOW + i, {"label": value}, {"v": float(i)}) for i, value in enumerate(TRICKY_TAGS)]
    good_strings = [Sample("custom", NOW + 100 + i, {"label": "strings"}, {"note": value})
                    for i, value in enumerate(TRICKY_STRINGS)]
    with mosquitto.client() as agent:
        for what, where, payload, _ in BAD:
            assert agent.publish(where, payload).value == 0, what
        agent.publish(topic(), envelope(HUB, HOST, 2, good_tags + good_strings))
    expected = Counter(reason for *_, reason in BAD)
    dead_path = tmp_path / "hostile.deadletter.jsonl"

    def reasons():
        if not dead_path.exists():
            return Counter()
        reasons = Counter()
        for line in dead_path.read_text().splitlines():
            try:  # a line being written right now may be incomplete
                reasons[json.loads(line)["reason"]] += 1
            except ValueError:
                pass
        return reasons
    wait_for(lambda: reasons() == expected, 20, f"every rejection counted: {expected}")
    assert collector.running, collector.log_tail()

    # exactly the good points, nothing else
    rows = influx.rows("SELECT * FROM custom", db="hubwatch")
    assert len(rows) == len(good_tags) + len(good_strings), rows
    stored_labels = {r["label"] for r in rows}
    assert stored_labels == set(TRICKY_TAGS) | {"strings"}
    assert sorted(r["note"] for r in rows if r["note"] is not None) == sorted(TRICKY_STRINGS)
    measurements = {r["name"] for r in influx.rows("SHOW MEASUREMENTS", db="hubwatch")}
    assert measurements <= {"custom", "conflict", "hubwatch_collector"}, measurements
    assert count_points(influx, "hubwatch", "conflict") == 1
    # and the self-metrics count by reason
    def counted():
        rows = influx.rows("SELECT last(rejected_total) AS n FROM hubwatch_collector WHERE reason != '' "
                           "GROUP BY reason", db="hubwatch")
        return {r["reason"]: r["n"] for r in rows}
    wait_for(lambda: counted() == dict(expected), 10, "rejections by reason in hubwatch_collector")
    log = collector.log_path.read_text()
    assert "rejected hubwatch/v1/skardu-01/gw01/metrics: topic_mismatch" in log
