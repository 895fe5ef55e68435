"""Shared test fixtures. Real services live in tests/services/, one module each."""

from __future__ import annotations

from typing import Iterable

import pytest

from agent.catalogue import check_sample
from agent.wire import Sample

pytest_plugins = [
    "tests.services.mosquitto",
    "tests.services.influx",
    "tests.services.nut",
    "tests.services.snmpsim",
    "tests.services.victoria",
]

@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Stop the hubwatch processes (collectors, agents) a test started and left running.
    Services (brokers, databases, upsd) belong to their fixtures, some of them module-wide."""
    from tests.services.common import ServiceProcess
    before = len(ServiceProcess.started)
    yield
    for proc in ServiceProcess.started[before:]:
        if proc.name.startswith(("collector-", "agent-")):
            proc.stop(timeout=5)


#: Every sample any probe emitted during this test session (see test_zz_catalogue_coverage).
EMITTED: list[Sample] = []


@pytest.fixture
def emitted():
    """Record samples a probe emitted: each must agree with the catalogue.

    Probe tests pass what they got through this, so the catalogue test at the end of the
    session can check every declared field was emitted by some test.
    """
    def record(samples: Iterable[Sample]) -> list[Sample]:
        samples = list(samples)
        for sample in samples:
            problems = check_sample(sample.measurement, sample.tags, sample.fields)
            assert not problems, f"{sample} disagrees with the catalogue: {problems}"
        EMITTED.extend(samples)
        return samples
    return record


#: True when this session runs the whole suite (no file, -k or -m selection).
FULL_SUITE = {"value": False}


def pytest_collection_modifyitems(config, items):
    # The catalogue coverage check needs every other test to have run first.
    last = [i for i in items if i.module.__name__.endswith("test_zz_catalogue_coverage")]
    items[:] = [i for i in items if i not in last] + last
    selected = config.getoption("keyword") or config.getoption("markexpr") or config.getoption("lf", False)
    explicit = [a for a in config.args if a not in ("tests", "tests/", str(config.rootpath / "tests"))]
    FULL_SUITE["value"] = not selected and not explicit
    if not FULL_SUITE["value"]:
        # Judged over the whole suite only: on a partial run they are left out (deselected,
        # as -k would), not run against a partial record.
        partial = [i for i in items if i.get_closest_marker("whole_suite")]
        if partial:
            config.hook.pytest_deselected(items=partial)
            items[:] = [i for i in items if i not in partial]


def pytest_configure(config):
    config.addinivalue_line("markers", "whole_suite: judged over the whole suite; deselected on a partial run")
