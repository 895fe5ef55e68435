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
    "alert_latency": ("Alert latency: UPS on battery to webhook", []),
    "report_time": ("Report time", []),
}


def main(argv: list[str]) -> int:
    chosen = argv or [name for name in BENCHMARKS if (HERE / f"{name}.py").exists()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    sections, failed = [], []
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
        sections.append(f"## {title}\n\n`python bench/{name}.py` — {time.monotonic() - started:.0f} s\n\n{body}\n")
    header = [
        "# Benchmarks", "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `make bench` "
        f"(`python bench/run.py {' '.join(argv)}`).", "",
        f"Machine: {machine()}.", "",
        "Peers: " + ", ".join(f"{k} ({v})" for k, v in versions().items()) + ".", "",
    ]
    out = REPO / "docs" / "benchmarks.md"
    out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    progress(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
