"""``hubwatch-collector``: MQTT -> InfluxDB ingest (outages and alerts build on it).

Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Sequence

from agent.confload import ConfigError, print_config_error
from agent.logsetup import add_logging_arguments, setup_logging
from collector import __version__
from collector.config import DEFAULT_CONFIG_PATH, load

log = logging.getLogger("hubwatch.collector")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubwatch-collector",
                                     description="Receive hub samples over MQTT and store them in InfluxDB.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH,
                        help=f"collector config file (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="validate the config: exit 0, or print every problem and exit 2")
    parser.add_argument("--version", action="version", version=f"hubwatch-collector {__version__}")
    add_logging_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load(args.config)
    except ConfigError as exc:
        return print_config_error(exc)
    if args.check:
        print(f"{args.config}: ok (instance={config.instance}, influxdb {config.influxdb.api} at "
              f"{config.influxdb.url}, broker {config.mqtt.host}:{config.mqtt.port})")
        return 0
    from collector.ingest import Collector

    collector = Collector(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: collector.stop())
    try:
        collector.run()
    except Exception as exc:
        log.error("collector failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
