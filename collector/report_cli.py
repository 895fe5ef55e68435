"""``hubwatch-report``: the outage report of a time window, as text, CSV, JSON or HTML.

    hubwatch-report -c /etc/hubwatch/collector.yaml --from 2025-03-01 --to 2025-04-01 --format html -o march.html

It reads the ``outage`` measurement the collector's outage engine writes, through the
``influxdb`` section of the collector's config. Exit codes: 0 ok, 2 bad usage or config
(including a window that ends before it starts and a hub InfluxDB holds no data for),
1 runtime failure (InfluxDB unreachable or refusing, output not writable).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from agent.confload import ConfigError, print_config_error, parse_duration
from collector import __version__
from collector.config import DEFAULT_CONFIG_PATH, load
from collector.report import build_report
from collector.report_query import (DEFAULT_LOOKBACK_S, InfluxQuery, OutageQuery, ReportSourceError, active_hubs,
                                    known_hubs, read_outages)
from collector.report_render import FORMATS, render

PROG = "hubwatch-report"
_HUB = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: A window longer than this, or more hubs than that, gets progress lines on stderr.
PROGRESS_WINDOW_S = 7 * 86400
PROGRESS_HUBS = 50


def parse_time(value: str, now: float | None = None) -> float:
    """Seconds since the epoch from ISO 8601 (``Z`` or an offset; none means UTC) or ``now``."""
    text = value.strip()
    if text.lower() == "now":
        return time.time() if now is None else now
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 time (e.g. 2025-03-01, 2025-03-01T06:00:00Z, "
            "2025-03-01T11:00+05:00, or now)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hubs(value: str) -> list[str]:
    hubs = [h.strip() for h in value.split(",") if h.strip()]
    for hub in hubs:
        if not _HUB.fullmatch(hub):
            raise argparse.ArgumentTypeError(f"{hub!r} is not a hub name ({_HUB.pattern})")
    return hubs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Outage report of a time window: per hub, availability of power, of the hub "
                               "and of its uplink; every outage; blips; MTTR and MTBF.",
        epilog="Times are ISO 8601; without an offset they are UTC. The window is [--from, --to). "
               "Exit codes: 0 ok, 2 bad usage or config, 1 InfluxDB unreachable or another runtime failure.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH,
                        help=f"collector config file; its influxdb section is used (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--from", dest="start", required=True, type=parse_time, metavar="ISO8601",
                        help="start of the window (inclusive)")
    parser.add_argument("--to", dest="end", required=True, type=parse_time, metavar="ISO8601",
                        help="end of the window (exclusive); 'now' for now")
    parser.add_argument("--hub", dest="hubs", action="append", type=_hubs, default=[], metavar="HUB",
                        help="only this hub (repeat, or comma-separate, for several); default: every hub "
                             "with data in the window")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    parser.add_argument("--lookback", type=_duration, default=DEFAULT_LOOKBACK_S, metavar="DURATION",
                        help="how far before --from to look for outages still going at --from (default: 31d)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _write_atomically(path: Path, text: str) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    now = time.time()
    hubs = [h for group in args.hubs for h in group]
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    if args.start >= args.end:
        _say(f"--from ({time.strftime(fmt, time.gmtime(args.start))}) must be before "
             f"--to ({time.strftime(fmt, time.gmtime(args.end))})")
        return 2
    if args.start >= now:
        _say(f"--from ({time.strftime(fmt, time.gmtime(args.start))}) is in the future: nothing to report yet")
        return 2
    try:
        config = load(args.config)
    except ConfigError as exc:
        return print_config_error(exc)
    client = InfluxQuery(config.influxdb)
    where = f"InfluxDB at {config.influxdb.url} (database {client.database!r})"
    measured_end = min(args.end, now)
    window_days = (measured_end - args.start) / 86400
    try:
        if hubs:
            known = known_hubs(client)
            unknown = [h for h in hubs if h not in known]
            if unknown:
                listing = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
                _say(f"unknown hub{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: {where} holds no data "
                     f"for {'them' if len(unknown) > 1 else 'it'} (hubs it knows: {listing})")
                return 2
            selected = sorted(set(hubs))
        else:
            selected = sorted(active_hubs(client, args.start, measured_end))
        loud = not args.quiet and (measured_end - args.start > PROGRESS_WINDOW_S or len(selected) > PROGRESS_HUBS)
        started = time.monotonic()
        if loud:
            _say(f"reading the outages of {len(selected) if selected or hubs else 'all'} hubs over "
                 f"{window_days:.1f} days from {where}")
        records = read_outages(client, OutageQuery(args.start, args.end, tuple(hubs), args.lookback))
    except ReportSourceError as exc:
        _say(str(exc))
        return 1
    report = build_report(records, selected, args.start, args.end, now)
    if loud:
        _say(f"{len(records):,} outages of {len(report.hubs)} hubs read in {time.monotonic() - started:.2f}s; "
             f"writing {args.format}")
    if not report.hubs:
        _say(f"no hub has data between {time.strftime(fmt, time.gmtime(args.start))} and "
             f"{time.strftime(fmt, time.gmtime(measured_end))} in {where}")
    text = render(report, args.format)
    if args.output:
        try:
            _write_atomically(Path(args.output), text)
        except OSError as exc:
            _say(f"cannot write {args.output}: {exc.strerror or exc}")
            return 1
        if loud:
            _say(f"wrote {args.output}")
    else:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
