"""Run every benchmark (or the ones named) and rewrite docs/benchmarks.md.

    python bench/run.py                 # all of them
    python bench/run.py collector_throughput report_time

Each benchmark is a module in bench/ whose ``main(argv) -> str`` returns a markdown section.
Absolute times drift on a shared machine; each section compares against its peers measured
in the same run, as ratios.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, machine, progress, versions  # noqa: E402

#: module -> (title, arguments for a full run)
BENCHMARKS = {
    "agent_footprint": ("Agent footprint: hubwatch-agent vs collectd vs prometheus-node-exporter", []),
    "wire_bytes": ("Wire bytes per hub per day", []),
    "collector_throughput": ("Collector throughput into InfluxDB", []),
    "replay": ("Replay: draining a 24 h outbox backlog", []),
    "alert_latency": ("Alert latency: UPS on battery to webhook", ["--runs", "12"]),
    "report_time": ("Report time", ["--repeat", "2"]),
    "fleet": ("Fleet simulation: 14 to 10,000 hubs and the saturation point",
              ["--hubs", "14,1000,10000", "--push", "15000,20000,25000", "--duration", "60", "--drain-timeout", "60"]),
}


def previous_sections(path: Path) -> dict[str, str]:
    """Sections of the existing docs/benchmarks.md by title, so a partial run keeps the rest."""
    if not path.exists():
        return {}
    sections, title, body = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            if title:
                sections[title] = "\n".join(body).rstrip() + "\n"
            title, body = line[3:].strip(), [line]
        elif title:
            body.append(line)
    if title:
        sections[title] = "\n".join(body).rstrip() + "\n"
    return sections


def main(argv: list[str]) -> int:
    chosen = argv or [name for name in BENCHMARKS if (HERE / f"{name}.py").exists()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    out = REPO / "docs" / "benchmarks.md"
    kept = previous_sections(out)
    fresh: dict[str, str] = {}
    failed = []
    for name in chosen:
        title, args = BENCHMARKS[name]
        progress(f"=== {title}")
        started = time.monotonic()
        try:
            body = importlib.import_module(name).main(args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            body = "**Failed in this run** (see the command's output)."
        fresh[title] = (f"## {title}\n\n`python bench/{name}.py` — measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                        f" in {time.monotonic() - started:.0f} s\n\n{body}\n")
    # every known benchmark in registry order: this run's result, else the previous run's
    sections = [fresh.get(title) or kept.get(title) for title, _ in BENCHMARKS.values()]
    sections = [s for s in sections if s]
    header = [
        "# Benchmarks", "",
        f"Written by `make bench` (`python bench/run.py [NAME...]`); last run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each section says when it was measured.", "",
        f"Machine: {machine()}.", "",
        "Peers: " + ", ".join(f"{k} ({v})" for k, v in versions().items()) + ".", "",
    ]
    out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    progress(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
