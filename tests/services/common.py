"""Process plumbing shared by the service fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not start; the message carries the tail of its log."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on right now (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ServiceProcess:
    """One running program, its output in ``log_path``. Use as a context manager.

    Every process started is remembered in ``started`` so the test session can stop any a
    test left running (see the ``_no_leftover_processes`` fixture in conftest.py).
    """

    started: list["ServiceProcess"] = []

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None,
                 user_env: bool = True):
        self.name = name
        self.argv = list(argv)
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{name}.log"
        self.env = {**(os.environ if user_env else {}), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServiceProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        ServiceProcess.started.append(self)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], timeout: float = 20.0, what: str = "ready") -> None:
        """Poll ``ready`` until true; ServiceError (with the log) if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode} before it was {what}:\n"
                                   f"{' '.join(self.argv)}\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise ServiceError(f"{self.name} was not {what} within {timeout:g}s:\n{self.log_tail()}")

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        self.wait_until(lambda: port_open(port), timeout, f"listening on {LOOPBACK}:{port}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """A power cut: SIGKILL, no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManagedService:
    """A service handle around one :class:`ServiceProcess` (``self.process``) listening on
    ``self.host``/``self.port``: ``start()`` (or start again, on the same data) returns once
    ``ready()`` holds; ``stop()`` is a clean shutdown (SIGTERM), ``kill()`` a crash (SIGKILL).
    A subclass sets ``process``, ``host`` and ``port``, and defines ``ready()`` and
    ``ready_what`` (for the error when it never gets ready)."""

    process: ServiceProcess
    host: str
    port: int
    start_timeout = 20.0

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def ready_what(self) -> str:
        return "ready"

    def _after_start(self) -> None:
        """Set-up that needs the running service (once per start)."""

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc is not None else None

    @property
    def running(self) -> bool:
        return self.process.running

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    def start(self, timeout: float | None = None):
        if self.process.running:
            return self
        self.process.start()
        self.process.wait_until(self.ready, self.start_timeout if timeout is None else timeout, self.ready_what)
        self._after_start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def restart(self):
        self.stop()
        return self.start()


class ServiceFactory:
    """Starts services of one kind, each in its own sub-directory of ``base_dir``; ``close()``
    stops them all. ``make(directory, **options)`` builds one (not yet started)."""

    def __init__(self, base_dir: Path, make: Callable[..., object], prefix: str):
        self.base_dir = Path(base_dir)
        self._make = make
        self._prefix = prefix
        self.started: list = []

    def __call__(self, **options):
        service = self._make(self.base_dir / f"{self._prefix}-{len(self.started)}", **options)
        self.started.append(service)
        return service.start()

    def close(self) -> None:
        for service in self.started:
            service.stop()
