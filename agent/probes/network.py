"""``network``: per-interface raw counters, link state and speed.

Counters stay raw (``*_total``): rates are computed in queries, so a gap replayed from the
outbox still gives correct rates. Read from ``/proc/net/dev`` and ``/sys/class/net`` (roots
injectable for tests).

Metrics (measurement ``net``, tags hub, host, iface): ``rx_bytes_total``,
``tx_bytes_total``, ``rx_packets_total``, ``tx_packets_total``, ``rx_errors_total``,
``tx_errors_total``, ``rx_drops_total``, ``tx_drops_total``, ``link_up``, ``speed_mbps``
(absent when the driver does not know it).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from agent.confload import Section
from agent.probes import ProbeContext, ProbeError
from agent.wire import Sample

DEFAULT_INTERFACES = ("eth*", "en*", "wl*", "ww*", "usb*", "ppp*")

# Column order of /proc/net/dev after the interface name.
_RX = ("rx_bytes_total", "rx_packets_total", "rx_errors_total", "rx_drops_total")
_TX = ("tx_bytes_total", "tx_packets_total", "tx_errors_total", "tx_drops_total")


def parse_proc_net_dev(text: str) -> dict[str, dict[str, int]]:
    """Counters per interface from ``/proc/net/dev``."""
    result = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        values = [int(v) for v in rest.split()]
        if len(values) < 16:
            raise ValueError(f"/proc/net/dev line for {name.strip()!r} has {len(values)} columns, expected 16")
        counters = dict(zip(_RX, values[0:4]))
        counters.update(zip(_TX, values[8:12]))
        result[name.strip()] = counters
    return result


def select_interfaces(names: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names
                  if any(fnmatch.fnmatchcase(n, g) for g in include)
                  and not any(fnmatch.fnmatchcase(n, g) for g in exclude))


def read_link(sys_root: Path, iface: str) -> tuple[bool, float | None]:
    """(link up, speed in Mbit/s or None) from ``/sys/class/net/IFACE``."""
    base = sys_root / "class" / "net" / iface
    operstate = _read(base / "operstate")
    carrier = _read(base / "carrier")
    if operstate in ("up", "down", "dormant", "lowerlayerdown", "notpresent"):
        up = operstate == "up"
    else:  # "unknown" (loopback, tun and some PPP devices): trust the carrier bit
        up = carrier == "1"
    speed = None
    raw = _read(base / "speed") if up else None
    if raw is not None:
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value > 0:  # -1 and 0 mean unknown
            speed = float(value)
    return up, speed


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # e.g. EINVAL reading speed of a virtual device
        return None


class NetworkProbe:
    name = "network"
    measurements = ("net",)

    @dataclass(frozen=True)
    class Config:
        interfaces: tuple[str, ...] = DEFAULT_INTERFACES
        exclude: tuple[str, ...] = ()

    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "NetworkProbe.Config":
        section = parent.section(key)
        config = cls.Config(interfaces=section.str_list("interfaces", DEFAULT_INTERFACES),
                            exclude=section.str_list("exclude", ()))
        section.done()
        return config

    def __init__(self, config: Config, context: ProbeContext):
        self._config = config
        self._context = context

    def collect(self) -> list[Sample]:
        now = self._context.clock_ns()
        counters = parse_proc_net_dev((Path(self._context.proc_root) / "net" / "dev").read_text())
        chosen = select_interfaces(list(counters), self._config.interfaces, self._config.exclude)
        if not chosen:
            raise ProbeError("exception", f"no interface matches {', '.join(self._config.interfaces)} "
                                          f"(present: {', '.join(sorted(counters))})")
        samples = []
        for iface in chosen:
            fields: dict[str, int | bool | float] = dict(counters[iface])
            up, speed = read_link(Path(self._context.sys_root), iface)
            fields["link_up"] = up
            if speed is not None:
                fields["speed_mbps"] = speed
            samples.append(Sample("net", now, {"iface": iface}, fields))
        return samples
