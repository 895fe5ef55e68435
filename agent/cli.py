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
from agent.confload import ConfigError, print_config_error
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
    mode.add_argument("--status", action="store_true",
                      help="print the outbox's depth, oldest sample age, size, dropped count and last "
                           "acknowledged seq (read-only; works while the agent runs)")
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
    """Probe every interval until ``stop`` is set: samples go through the outbox to MQTT."""
    from agent.agent import Agent

    agent = Agent(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (stop.set(), agent.request_stop()))
    agent.run(stop)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return " ".join(parts[:2])


def print_status(config: AgentConfig, out=sys.stdout) -> int:
    """``--status``: what an engineer asks first at a silent hub."""
    import time

    from agent.outbox import OutboxError, read_stats

    try:
        stats = read_stats(config.buffer.path)
    except OutboxError as exc:
        print(f"hubwatch-agent: {exc}", file=sys.stderr)
        return 1
    c = stats.counters
    if stats.oldest_t_ns is None:
        oldest = "none (the outbox is empty)"
    else:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stats.oldest_t_ns / 1e9))
        oldest = f"{_age(max(0.0, time.time() - stats.oldest_t_ns / 1e9))} ago ({when})"
    acked = "none yet" if stats.last_acked_seq is None else str(stats.last_acked_seq)
    lines = [
        f"outbox:               {config.buffer.path}",
        f"samples waiting:      {stats.samples} ({stats.pending} not yet in a message, "
        f"{stats.messages} messages awaiting the collector's ack)",
        f"oldest sample:        {oldest}",
        f"size:                 {stats.file_bytes / 2**20:.2f} MB of {config.buffer.max_mb:g} MB cap",
        f"dropped at the cap:   {c.get('dropped_samples_total', 0)}",
        f"lost (corrupt file):  {c.get('lost_samples_total', 0)}",
        f"last acknowledged seq: {acked} (next seq {stats.next_seq})",
        f"published / acked:    {c.get('messages_published_total', 0)} / {c.get('messages_acked_total', 0)} messages "
        f"({c.get('publish_rejected_total', 0)} refused by the broker)",
    ]
    out.write("\n".join(lines) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load(args.config)
    except ConfigError as exc:
        return print_config_error(exc)
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
    if args.status:
        return print_status(config)
    from agent.outbox import OutboxError

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_forever(config, stop)
    except OutboxError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("agent failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
