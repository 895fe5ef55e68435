"""``system``: uptime, boot time, CPU, memory, load, disk and clock sync of this machine.

Read from ``/proc`` (its root is injectable, so tests read real-format files) with pure
``parse_*`` functions; disk usage is measured on the file system that holds the outbox,
since a full disk there is what stops the agent from buffering.

Metrics (measurement ``system``, tags hub, host):
``uptime_seconds``, ``boot_time_seconds``, ``cpu_percent``, ``memory_used_percent``,
``load1``, ``disk_used_percent``, ``clock_synced``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.confload import Section
from agent.probes import ProbeContext
from agent.wire import Sample

# adjtimex(2) returns TIME_ERROR when the kernel considers the clock unsynchronised
# (no NTP discipline, or the STA_UNSYNC bit set).
_TIME_ERROR = 5


def parse_uptime(text: str) -> float:
    """Seconds since boot from ``/proc/uptime``."""
    return float(text.split()[0])


def parse_stat(text: str) -> tuple[int, tuple[int, int]]:
    """Boot time (epoch seconds) and (busy, total) CPU jiffies from ``/proc/stat``."""
    boot_time, cpu = None, None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
            # already counted in user/nice, so leave it out of the total.
            total = sum(values[:8])
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            cpu = (total - idle, total)
        elif parts[0] == "btime":
            boot_time = int(parts[1])
    if boot_time is None or cpu is None:
        raise ValueError("/proc/stat has no btime or cpu line")
    return boot_time, cpu


def parse_meminfo(text: str) -> float:
    """Memory in use, as a percentage, from ``/proc/meminfo`` (caches count as free)."""
    info = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if rest.split():
            info[name.strip()] = int(rest.split()[0])
    total = info["MemTotal"]
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    return 100.0 * (total - available) / total if total else 0.0


def parse_loadavg(text: str) -> float:
    return float(text.split()[0])


def clock_synced() -> bool | None:
    """Whether the kernel says the clock is NTP-synchronised; None when it cannot tell."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes=0 only reads
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def disk_used_percent(path: Path) -> float:
    """Used share of the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    # Like df: blocks reserved for root count as neither used nor available.
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    usable = used + st.f_bavail * st.f_frsize
    return 100.0 * used / usable if usable else 0.0


class SystemProbe:
    name = "system"
    measurements = ("system",)

    @dataclass(frozen=True)
    class Config:
        disk_path: Path | None = None  # default: where the outbox lives
        proc_root: Path | None = None  # default /proc; another root for containers and tests

    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "SystemProbe.Config":
        section = parent.section(key)
        config = cls.Config(disk_path=section.path_value("disk_path", None),
                            proc_root=section.path_value("proc_root", None))
        section.done()
        return config

    def __init__(self, config: Config, context: ProbeContext):
        self._config = config
        self._context = context
        self._proc = Path(config.proc_root or context.proc_root)
        self._last_cpu: tuple[int, int] | None = None

    def _read(self, name: str) -> str:
        return (self._proc / name).read_text()

    def collect(self) -> list[Sample]:
        now = self._context.clock_ns()
        boot_time, cpu = parse_stat(self._read("stat"))
        fields: dict[str, float | bool] = {
            "uptime_seconds": parse_uptime(self._read("uptime")),
            "boot_time_seconds": float(boot_time),
            "memory_used_percent": round(parse_meminfo(self._read("meminfo")), 2),
            "load1": parse_loadavg(self._read("loadavg")),
            "disk_used_percent": round(disk_used_percent(self._config.disk_path or self._context.outbox_path), 2),
        }
        previous, self._last_cpu = self._last_cpu, cpu
        if previous is None:
            # The first cycle has no previous reading: measure over a short window instead
            # of reporting the average since boot, which would hide a busy machine.
            previous = cpu
            time.sleep(0.1)
            _, cpu = parse_stat(self._read("stat"))
            self._last_cpu = cpu
        busy, total = cpu[0] - previous[0], cpu[1] - previous[1]
        if total > 0:
            fields["cpu_percent"] = round(100.0 * busy / total, 2)
        synced = clock_synced()
        if synced is not None:
            fields["clock_synced"] = synced
        return [Sample("system", now, {}, fields)]
