"""The catalogue and the probes agree: every emitted sample is declared (checked as each
test records it through the ``emitted`` fixture), and every declared field is emitted by
some test. Runs last; meaningful only after the whole suite."""

from __future__ import annotations

import pytest

from agent import probes
from agent.catalogue import MEASUREMENTS
from tests.conftest import EMITTED


@pytest.mark.whole_suite
def test_every_declared_field_is_emitted_by_some_test():
    from agent.catalogue import COLLECTOR_MEASUREMENTS
    emitted = {(s.measurement, f) for s in EMITTED for f in s.fields}
    declared = {(m, f) for m, spec in MEASUREMENTS.items() for f in spec.fields if m not in COLLECTOR_MEASUREMENTS}
    missing = sorted(f"{m}.{f}" for m, f in declared - emitted)
    assert not missing, f"declared in the catalogue but emitted by no test: {missing}"


@pytest.mark.whole_suite
def test_every_emitted_measurement_is_declared_by_a_probe():
    declared_by = {}
    for name in probes.REGISTRY:
        for measurement in probes.probe_class(name).measurements:
            declared_by.setdefault(measurement, []).append(name)
    undeclared = {s.measurement for s in EMITTED} - set(declared_by) - {"agent"}
    assert not undeclared, f"emitted but declared by no probe: {sorted(undeclared)}"
    assert set(declared_by) <= set(MEASUREMENTS), "a probe declares a measurement the catalogue lacks"


def test_catalogue_names_follow_the_house_rules():
    for m, spec in MEASUREMENTS.items():
        for name, field in spec.fields.items():
            if name.endswith("_total"):
                assert field.type == "int", f"{m}.{name}: counters are ints"
            if field.type == "float":
                assert field.unit or name in ("load1",), f"{m}.{name}: a gauge names its unit"


def test_metrics_reference_is_generated_from_the_catalogue():
    from pathlib import Path

    from agent.catalogue import render_markdown
    doc = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
    assert doc.read_text() == render_markdown(), "run: python -m agent.catalogue > docs/metrics.md"
