"""``hubwatch-agent``: the command an engineer runs on a hub machine.

Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Sequence

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load
from agent.confload import ConfigError
from agent.logsetup import add_logging_arguments, setup_logging
from agent.probes import ProbeContext
from agent.runner import ProbeRunner

log = logging.getLogger("hubwatch.agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubwatch-agent",
        description="Measure this hub machine's UPS power, bandwidth and uptime and send it to the collector.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH,
                        help=f"agent config file (default: {DEFAULT_CONFIG_PATH})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="run every configured probe once, print each sample as a JSON line, exit")
    mode.add_argument("--check", action="store_true",
                      help="validate the config: exit 0, or print every problem and exit 2")
    parser.add_argument("--version", action="version", version=f"hubwatch-agent {__version__}")
    add_logging_arguments(parser)
    return parser


def print_samples(samples, out=sys.stdout) -> None:
    for sample in samples:
        out.write(json.dumps(sample.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n")
    out.flush()


def context_for(config: AgentConfig) -> ProbeContext:
    return ProbeContext(outbox_path=config.buffer.path, timeout=config.probe_timeout)


def run_forever(config: AgentConfig, stop: threading.Event) -> None:
    """Probe every interval until ``stop`` is set, writing samples as JSON lines.

    Publishing through the durable outbox over MQTT replaces the stdout sink once it lands.
    """
    runner = ProbeRunner(config, context_for(config))
    log.info("agent started: hub=%s host=%s interval=%gs probes=%s",
             config.hub, config.host, config.interval, ",".join(runner.names))
    try:
        while not stop.is_set():
            print_samples(runner.run_once())
            stop.wait(config.interval)
    finally:
        runner.close()
        log.info("agent stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"{exc.source}: configuration is not valid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok (hub={config.hub}, host={config.host}, "
              f"probes: {', '.join(p.name for p in config.probes)})")
        return 0
    if args.once:
        runner = ProbeRunner(config, context_for(config))
        try:
            print_samples(runner.run_once())
        finally:
            runner.close()
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_forever(config, stop)
    except Exception:
        log.exception("agent failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
