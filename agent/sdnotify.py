"""Telling systemd how the service is doing: the ``sd_notify`` protocol, stdlib only.

A ``Type=notify`` unit hands the service ``$NOTIFY_SOCKET``: a unix datagram socket, given as
a path or, when it starts with ``@``, as a name in Linux's abstract namespace. Each message
is one datagram of newline-separated ``KEY=VALUE`` assignments (``READY=1``, ``WATCHDOG=1``,
``STOPPING=1``, ``STATUS=...``); the kernel attaches the sender's credentials, which is how
systemd knows the message comes from the service's main process.

With ``WatchdogSec=`` set, systemd also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the
process meant to answer) and restarts the service when ``WATCHDOG=1`` does not arrive within
that time; the recommended rhythm is every half of it (:class:`Heartbeat`).

Outside systemd (no ``$NOTIFY_SOCKET``: a terminal, a test, ``--once``) every call does
nothing. A failed send is logged once at debug level and never raised: losing a status
message must not stop the agent; a lost watchdog ping is what systemd is there to notice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping

log = logging.getLogger(__name__)

_warned = False


def _address(environ: Mapping[str, str] | None = None) -> str | None:
    """Where messages go, in the form ``socket.sendto`` takes; None when not under systemd."""
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace: a leading NUL instead of the @
    if value.startswith("/"):
        return value
    return None  # unset, or a form we do not speak (e.g. vsock: for VMs)


def notify(*assignments: str) -> bool:
    """Send one datagram of ``KEY=VALUE`` lines; True when it was sent."""
    global _warned
    address = _address()
    if address is None or not assignments:
        return False
    payload = "\n".join(assignments).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(2.0)  # a service manager too busy to read must not hold our loop
            sock.sendto(payload, address)
        return True
    except OSError as exc:
        if not _warned:
            _warned = True
            log.debug("cannot notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def _status_line(text: str) -> str:
    # One assignment per line: a newline in the text would start a bogus assignment.
    return "STATUS=" + " ".join(str(text).split())


def ready(status: str | None = None) -> bool:
    """Start-up is complete (``Type=notify`` waits for this before the unit counts as started)."""
    return notify("READY=1", *([_status_line(status)] if status else []))


def watchdog() -> bool:
    """The keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (systemd stops expecting watchdog pings)."""
    return notify("STOPPING=1", *([_status_line(status)] if status else []))


def status(text: str) -> bool:
    """The one-line state ``systemctl status`` shows."""
    return notify(_status_line(text))


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1``, or None when it expects nothing.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for: a child that
    inherited the variables is not it.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1e6


class Heartbeat:
    """``WATCHDOG=1`` at half the watchdog interval, however often :meth:`beat` is called.

    A loop calls :meth:`beat` on every pass (cheap when no ping is due), and waits with
    :meth:`wait` instead of ``Event.wait`` wherever it may sit longer than that.
    """

    def __init__(self, interval: float | None = None):
        if interval is None:
            interval = watchdog_interval()
        self.period = interval / 2 if interval else None
        self._last: float | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def due_in(self) -> float | None:
        """Seconds until the next ping is due (0: now); None without a watchdog."""
        if self.period is None:
            return None
        with self._lock:
            if self._last is None:
                return 0.0
            return max(0.0, self._last + self.period - time.monotonic())

    def beat(self) -> bool:
        """Ping if half the interval has passed since the last ping; True when it pinged."""
        if self.period is None:
            return False
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.period:
                return False
            self._last = now
        return watchdog()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """``event.wait(timeout)``, pinging meanwhile; True when the event was set."""
        if self.period is None:
            return event.wait(timeout)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return event.is_set()
            # Wake exactly when the next ping is due (a sleep that returns a hair early must
            # not skip a ping and leave a whole interval between two).
            if event.wait(min(left, max(0.01, self.due_in() or 0.0))):
                return True
