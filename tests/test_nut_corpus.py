"""The NUT parsers on real recorded data: every ``upsc`` dump of the device library.

Each of the 718 dumps goes through ``parse_upsc_dump`` and ``parse_vars`` without an
exception, every value that comes out is a finite float within its field's bounds, and the
field coverage (how many dumps yield each ``ups`` field) is printed (``pytest -s``) and kept
in docs/probes/nut.md. Regenerate that table with ``python -m tests.test_nut_corpus``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from agent.probes.nut import VARIABLE_MAP, parse_upsc_dump, parse_vars
from agent.probes.upsfields import GAUGE_FIELDS, status_flags

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nut-ddl"
DOC = Path(__file__).resolve().parents[1] / "docs" / "probes" / "nut.md"
TABLE_START = "<!-- corpus-coverage:start -->"
TABLE_END = "<!-- corpus-coverage:end -->"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.rglob("*.dev"))


def coverage() -> tuple[int, Counter]:
    """(number of dumps, dumps yielding each ups field; ``("unusable", field)``: dumps that
    have the variable but no value the probe keeps)."""
    counts: Counter = Counter()
    files = corpus_files()
    for path in files:
        variables = parse_upsc_dump(path.read_text(errors="replace"))
        gauges, status = parse_vars(variables)
        counts.update(gauges.keys())
        counts.update(("unusable", f) for f, (names, _lo, _hi) in VARIABLE_MAP.items()
                      if f not in gauges and any(variables.get(n, "") != "" for n in names))
        if status is not None:
            counts["status"] += 1
            counts.update(name for name, on in status_flags(status).items() if on)
    return len(files), counts


def render_table(total: int, counts: Counter) -> str:
    lines = [f"Of the {total} dumps in the NUT device library, how many yield each field (and how many",
             "have the variable with a value that is left out: not a number, or out of bounds):", "",
             "| field | from | dumps | share | left out |", "|---|---|---:|---:|---:|"]
    for field in GAUGE_FIELDS:
        names = " or ".join(f"`{n}`" for n in VARIABLE_MAP[field][0])
        lines.append(f"| `{field}` | {names} | {counts[field]} | {100 * counts[field] / total:.0f}% "
                     f"| {counts[('unusable', field)]} |")
    lines.append(f"| `status` | `ups.status` | {counts['status']} | {100 * counts['status'] / total:.0f}% | |")
    flags = ", ".join(f"`{f}` {counts[f]}" for f in ("on_line", "on_battery", "charging", "discharging",
                                                     "low_battery", "replace_battery", "overload"))
    lines += ["", f"Status flags set in the recorded dumps: {flags}."]
    return "\n".join(lines)


@pytest.fixture
def needs_corpus():
    if not CORPUS.is_dir():
        pytest.fail(f"device library not found at {CORPUS} (shared/data/nut-ddl beside the repository)")


@pytest.mark.usefixtures("needs_corpus")
def test_every_dump_parses_into_sane_fields():
    files = corpus_files()
    assert len(files) == 718, f"expected the 718 dumps of the library, found {len(files)}"
    for path in files:
        variables = parse_upsc_dump(path.read_text(errors="replace"))
        assert variables, f"{path.name}: no variables"
        gauges, status = parse_vars(variables)
        for field, value in gauges.items():
            _names, minimum, maximum = VARIABLE_MAP[field]
            assert isinstance(value, float) and math.isfinite(value), (path.name, field, value)
            assert minimum <= value <= maximum, (path.name, field, value)
        assert status is None or (status.strip() == status and "  " not in status), (path.name, status)


@pytest.mark.usefixtures("needs_corpus")
def test_field_coverage_is_reported_and_sane():
    total, counts = coverage()
    table = render_table(total, counts)
    print("\n" + table)
    assert counts["status"] >= 0.95 * total
    assert counts["battery_charge_percent"] >= 0.75 * total
    assert counts["input_voltage_volts"] >= 0.75 * total
    assert counts["battery_runtime_seconds"] >= 0.5 * total
    assert counts["load_percent"] >= 0.75 * total
    assert counts["on_line"] >= 0.9 * total  # the dumps were mostly taken on mains
    assert all(counts[f] > 0 for f in GAUGE_FIELDS)


@pytest.mark.usefixtures("needs_corpus")
def test_docs_carry_the_current_coverage_table():
    total, counts = coverage()
    text = DOC.read_text()
    match = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    assert match, f"{DOC} has no {TABLE_START} ... {TABLE_END} block"
    assert match.group(1) == render_table(total, counts), "run: python -m tests.test_nut_corpus"


@pytest.mark.usefixtures("needs_corpus")
def test_recorded_oddities_are_read_as_the_device_meant():
    by_name = {p.name: parse_upsc_dump(p.read_text(errors="replace")) for p in corpus_files()}
    # An inline "#BAD:" note after a value is a comment, not part of the value.
    notes = [v for v in by_name.values() if "#BAD" in "".join(v.values())]
    assert not notes
    # A kelvin reading reported as celsius (302.0) is not a temperature a UPS can have.
    kelvin = [n for n, v in by_name.items() if v.get("battery.temperature") == "302.0"]
    assert kelvin
    for name in kelvin:
        variables = by_name[name]
        gauges, _ = parse_vars(variables)
        if "ups.temperature" not in variables:
            assert "temperature_celsius" not in gauges, name
    # "mm:ss" runtimes are not seconds: absent rather than misread.
    clock = [v for v in by_name.values() if ":" in v.get("battery.runtime", "")]
    assert clock and all("battery_runtime_seconds" not in parse_vars(v)[0] for v in clock)


def main() -> None:
    total, counts = coverage()
    print(render_table(total, counts))


if __name__ == "__main__":
    main()
