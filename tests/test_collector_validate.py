"""The collector's converter on its own: a sample shaped like one accepted before takes a
faster path, and must still be checked as strictly as the first."""

from __future__ import annotations

import time

import pytest

from agent.wire import Topic
from collector.validate import Converter

TOPIC = Topic("hubwatch", "skardu-01", "gw01", "metrics")
NOW = time.time_ns()
GOOD = {"m": "ups", "t": NOW, "tags": {"ups": "hubups", "source": "nut"},
        "f": {"battery_charge_percent": 80.0, "status": "OL", "on_line": True}}


def like_good(**changes):
    sample = {**GOOD, "f": dict(GOOD["f"])}
    sample.update(changes)
    return sample


@pytest.mark.parametrize("sample, reason", [
    (like_good(f={"battery_charge_percent": float("inf"), "status": "OL", "on_line": True}), "field_value"),
    (like_good(f={"battery_charge_percent": float("nan"), "status": "OL", "on_line": True}), "field_value"),
    (like_good(f={"battery_charge_percent": "80", "status": "OL", "on_line": True}), "field_type"),
    (like_good(f={"battery_charge_percent": 80, "status": "OL", "on_line": True}), "field_type"),
    (like_good(f={"battery_charge_percent": 80.0, "status": "a\nb", "on_line": True}), "field_value"),
    (like_good(f={"battery_charge_percent": 80.0, "status": "x" * 2000, "on_line": True}), "field_value"),
    (like_good(f={"battery_charge_percent": 80.0, "status": None, "on_line": True}), "field_type"),
    (like_good(f=["battery_charge_percent", "status", "on_line"]), "shape"),  # same names, not an object
    (like_good(t=NOW + 86400 * 10**9), "future"),
    (like_good(t=float(NOW)), "time"),
    (like_good(t=True), "time"),
    (like_good(t=-1), "time"),
    (like_good(x=1), "shape"),
    (like_good(tags=None), "shape"),
    (like_good(tags={"ups": "hubups", "source": "nut", "hub": "gilgit-sco-01"}), "topic_mismatch"),
])
def test_a_sample_shaped_like_an_accepted_one_is_still_checked(sample, reason):
    converter = Converter()
    first = converter.convert([GOOD], TOPIC, NOW)
    assert len(first.lines) == 1 and not first.rejections
    out = converter.convert([GOOD, sample, GOOD], TOPIC, NOW)
    assert [r.reason for r in out.rejections] == [reason]
    assert out.lines == first.lines * 2


def test_line_protocol_of_a_known_shape_equals_the_first():
    converter = Converter()
    [line] = converter.convert([GOOD], TOPIC, NOW).lines
    assert line == (f"ups,host=gw01,hub=skardu-01,source=nut,ups=hubups "
                    f'battery_charge_percent=80.0,status="OL",on_line=true {NOW}')
    assert converter.convert([GOOD], TOPIC, NOW).lines == [line]
    other_host = Topic("hubwatch", "skardu-01", "lab02", "metrics")
    assert converter.convert([GOOD], other_host, NOW).lines == [line.replace("host=gw01", "host=lab02")]
