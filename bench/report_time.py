"""Time to produce the outage report for 14 hubs × 30 days and 1,000 hubs × 30 days.

A real influxd (started here) is loaded with simulated outages (tests/report_sim.py: power
cuts and blips, dark periods, uplink losses, silent lab machines, reboots), then the real
``hubwatch-report`` command is timed end to end — process start, InfluxQL over HTTP,
computation, rendering, writing the file — for each format. Best of ``--repeat`` runs.

    python bench/report_time.py [--hubs 14,1000] [--days 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import progress, table  # noqa: E402  (sets sys.path)

from tests.report_sim import DAY, GB_HUBS, presence_lines, simulate  # noqa: E402
from tests.services.influx import InfluxServer  # noqa: E402

FORMATS = ("json", "csv", "text", "html")
WINDOW_START = 1772323200  # 2026-03-01T00:00:00Z


def hub_names(count: int) -> list[str]:
    if count <= len(GB_HUBS):
        return list(GB_HUBS[:count])
    return [f"erozgar-{i:04d}" for i in range(count)]


def load(influx: InfluxServer, db: str, hubs: list[str], days: int) -> int:
    """Write the simulated outages; the number of outage points."""
    influx.create_database(db)
    end = WINDOW_START + days * DAY
    outages = simulate(hubs, WINDOW_START, end, quiet_hubs=0)
    lines = [o.line(end) for o in outages] + presence_lines(hubs, WINDOW_START, end)
    for i in range(0, len(lines), 10000):
        influx.write(db, lines[i:i + 10000])
    return len(outages)


def time_report(config: Path, fmt: str, days: int, out: Path) -> tuple[float, float | None]:
    """Wall time of one run, and the time the command itself said reading took."""
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(WINDOW_START))
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(WINDOW_START + days * DAY))
    command = [str(Path(sys.executable).parent / "hubwatch-report"), "-c", str(config), "--from", start, "--to", end,
               "--format", fmt, "-o", str(out)]
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - began
    if result.returncode != 0:
        raise RuntimeError(f"hubwatch-report failed ({result.returncode}): {result.stderr}")
    read = re.search(r"read in ([\d.]+)s", result.stderr)
    return elapsed, float(read.group(1)) if read else None


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hubs", default="14,1000")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hubwatch-bench-report-") as tmp:
        work = Path(tmp)
        influx = InfluxServer(work / "influxd").start()
        try:
            for count in [int(x) for x in args.hubs.split(",")]:
                db = f"report_{count}"
                progress(f"{count} hubs × {args.days} days: simulating and writing outages")
                points = load(influx, db, hub_names(count), args.days)
                config = work / f"{db}.yaml"
                config.write_text(f"influxdb:\n  url: {influx.url}\n  database: {db}\n  timeout: 300s\n")
                for fmt in FORMATS:
                    out = work / f"{db}.{fmt}"
                    runs = [time_report(config, fmt, args.days, out) for _ in range(args.repeat)]
                    best = min(runs)
                    progress(f"{count} hubs, {fmt}: {best[0]:.2f} s")
                    rows.append([f"{count:,}", f"{points:,}", fmt, f"{best[0]:.2f}",
                                 "-" if best[1] is None else f"{best[1]:.2f}",
                                 f"{out.stat().st_size / 2**20:.1f}"])
        finally:
            influx.stop()
    text = (f"`hubwatch-report` end to end (process start, InfluxQL over HTTP to a local influxd, computation, "
            f"rendering, file written) over {args.days} days of simulated outages; best of {args.repeat} runs. "
            "\"Reading\" is the part the command reports as reading InfluxDB (including the look-back query).\n\n"
            + table(["hubs", "outage points", "format", "total (s)", "reading (s)", "output (MiB)"], rows))
    print(text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
