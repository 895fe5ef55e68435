"""Knowing when the wall clock can be believed, and fixing the time of samples taken before.

A gateway PC that boots after a power cut may run on a wrong clock (a flat CMOS battery
puts it days behind) until NTP answers, and the link is often down exactly then. Each
sample therefore keeps, beside its wall time, the boot id and ``CLOCK_BOOTTIME`` (which
counts through suspend and is never stepped). Within one boot ``wall - boottime`` is the
boot's *offset*: constant for a good clock, except for NTP's slow slewing. Once the clock
is trusted, a sample taken while it was not gets ``t_true = t + (offset_now - offset_then)``,
which is ``now_wall - (now_boottime - sample_boottime)`` for a sample stamped when recorded.

The clock is untrusted while

- the kernel says it is not synchronised (adjtimex) and sync is required
  (``clock.require_sync``: ``true``; ``auto``, the default, requires it once this machine's
  clock has been seen synchronised, so a PC without NTP still reports), or
- the offset jumped by more than ``clock.max_step`` (someone or something stepped the
  clock) and it has not since been steady for ``clock.settle`` (or been reported
  synchronised, which means NTP made the step).

:class:`Clock` is the seam: tests pass one that starts days behind and is corrected later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_TIME_ERROR = 5


class Clock(Protocol):
    def wall_ns(self) -> int: ...
    def boottime_ns(self) -> int: ...
    def synced(self) -> bool | None: ...
    def boot_id(self) -> str: ...


class SystemClock:
    """The machine's own clocks."""

    def __init__(self, boot_id_path: Path = BOOT_ID_PATH):
        self._boot_id_path = boot_id_path
        self._boot_id: str | None = None
        self._libc: ctypes.CDLL | bool | None = None

    def wall_ns(self) -> int:
        return time.time_ns()

    def boottime_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def synced(self) -> bool | None:
        # adjtimex(2) with modes=0 only reads; TIME_ERROR (5) means unsynchronised. libc is
        # looked up once: find_library runs ldconfig, far too slow for every reading.
        if self._libc is None:
            try:
                self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            except OSError:
                self._libc = False
        if self._libc is False:
            return None
        timex = ctypes.create_string_buffer(512)  # struct timex, zeroed
        try:
            state = self._libc.adjtimex(timex)
        except AttributeError:
            return None
        return None if state < 0 else state != _TIME_ERROR

    def boot_id(self) -> str:
        if self._boot_id is None:
            try:
                self._boot_id = self._boot_id_path.read_text().strip() or "unknown"
            except OSError:
                # Without a boot id, a boot is told apart by its start time (to the minute).
                start = (time.time_ns() - self.boottime_ns()) // 60_000_000_000
                self._boot_id = f"start-{start}"
        return self._boot_id


@dataclass(frozen=True)
class Reading:
    """One look at the clock: what a sample records beside its own time."""

    wall_ns: int
    boottime_ns: int
    boot_id: str
    trusted: bool

    @property
    def offset_ns(self) -> int:
        return self.wall_ns - self.boottime_ns


class ClockGuard:
    """Decides, reading after reading, whether the wall clock is trusted."""

    def __init__(self, clock: Clock, require_sync: bool | str = "auto", max_step_s: float = 1.0,
                 settle_s: float = 30.0, seen_synced: bool = False, known_offset_ns: int | None = None):
        self.clock = clock
        self.require_sync = require_sync
        self.seen_synced = seen_synced
        self._max_step_ns = int(max_step_s * 1e9)
        self._settle_ns = int(settle_s * 1e9)
        self._last_offset = known_offset_ns  # the boot's offset when last trusted (persisted)
        self._jump_at: int | None = None  # boottime of the latest jump not yet settled
        self._was_trusted: bool | None = None
        self.jumps = 0

    @property
    def sync_required(self) -> bool:
        if self.require_sync == "auto":
            return self.seen_synced
        return bool(self.require_sync)

    def read(self) -> Reading:
        wall, boottime = self.clock.wall_ns(), self.clock.boottime_ns()
        offset = wall - boottime
        if self._last_offset is not None and abs(offset - self._last_offset) > self._max_step_ns:
            self.jumps += 1
            self._jump_at = boottime
            log.warning("wall clock jumped by %+.3fs against the boot-time clock; holding samples "
                        "until it is trusted again", (offset - self._last_offset) / 1e9)
        self._last_offset = offset
        synced = self.clock.synced()
        if synced:
            self.seen_synced = True
        trusted = True
        if self.sync_required and synced is False:
            trusted = False
        if self._jump_at is not None:
            if self.sync_required and synced:
                self._jump_at = None  # a step made by NTP itself: the new time is right
            elif boottime - self._jump_at >= self._settle_ns:
                self._jump_at = None
            else:
                trusted = False
        if trusted != self._was_trusted:
            if not trusted:
                log.warning("wall clock not trusted (synchronised: %s); samples are kept but held "
                            "until their time can be fixed", synced)
            elif self._was_trusted is not None:
                log.info("wall clock trusted again; held samples get their time corrected")
            self._was_trusted = trusted
        return Reading(wall, boottime, self.clock.boot_id(), trusted)


def corrected_time(t_ns: int, recorded_offset_ns: int, true_offset_ns: int) -> int:
    """A sample's true time, given the boot's offset when it was recorded and the true one."""
    return t_ns + (true_offset_ns - recorded_offset_ns)
