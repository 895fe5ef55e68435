"""pytest fixtures: a real NUT ``upsd`` serving ``dummy-ups`` drivers on a free loopback port.

``nut_server({"ups1": Path("x.dev"), "ups2": {"ups.status": "OL", ...}})`` starts one
``dummy-ups`` driver per UPS and one ``upsd`` in a temporary directory, waits until upsd
serves every UPS's data (asked with NUT's own ``upsc``, not with the code under test) and
returns a :class:`NutServer`. Everything it started is killed when the test ends, passed
or failed. ``nut_server_module`` is the same factory for servers a test module shares, and
``nss_cert`` makes a CA and a server certificate in an NSS database for ``tls=`` (STARTTLS;
needs ``certutil``/``pk12util`` from Debian's libnss3-tools, which ``make test`` installs).

Traps this works around (NUT 2.8 on Debian):

- ``/usr/sbin/upsd`` is a wrapper reading ``/etc/nut/nut.conf``: the real binaries are
  ``/lib/nut/upsd`` and ``/lib/nut/dummy-ups``, pointed at the temp dir by ``NUT_CONFPATH``
  and ``NUT_STATEPATH`` (with ``MODE=standalone`` in its nut.conf).
- Started as root, both drop to the compiled-in user ``nut``, which cannot create the driver
  socket in a root-owned temp dir ("bind ... Permission denied"): they get ``-u`` with the
  current user, which keeps them as they are.
- The driver's unix socket lives in the state dir, and a socket path must fit in 107
  bytes: the state dir is a short ``/tmp/nutXXXX``, not pytest's long ``tmp_path``.
- Real ``upsc`` dumps are not all valid ``dummy-ups`` input (an unterminated ``"Exide``,
  backslashes, inline ``#BAD:`` notes): each is parsed and written back as
  ``name: "value"`` lines with NUT's escapes.
- A ``.dev`` file is read once ("dummy-once") and again only when its modification time
  changes: :meth:`NutServer.set_vars` rewrites the file with a strictly newer time stamp
  and waits until upsd serves the new values.
- upsd keeps printable ASCII and at most 127 characters of a value (two dumps have longer or
  non-ASCII ones): readiness compares what upsd can serve (:func:`served_view`).
- dummy-ups opens its socket only after its first poll interval and answers upsd on the
  next ones: with ``pollinterval = 1`` a server serves its data about 3 s after start, and
  a changed file about 1 s after the change. Tests that can share a server should.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from agent.probes.nut import parse_upsc_dump, quote_word
from tests.services.common import LOOPBACK, ServiceError, ServiceProcess, free_port

NUT_LIBEXEC = Path("/lib/nut")
UPSD = NUT_LIBEXEC / "upsd"
DUMMY_UPS = NUT_LIBEXEC / "dummy-ups"
UPSC = Path(shutil.which("upsc") or "/usr/bin/upsc")

#: dummy-ups will not take these from a data file: it owns them.
_DRIVER_OWNED = ("driver.", "server.")
#: upsd's longest value (ST_MAX_VALUE_LEN less its terminating NUL)
_MAX_VALUE_LEN = 127


def nut_available() -> bool:
    return UPSD.is_file() and DUMMY_UPS.is_file() and UPSC.is_file()


def dev_text(variables: Mapping[str, str]) -> str:
    """A ``.dev`` file dummy-ups reads back exactly: ``name: "value"`` with NUT's escapes."""
    lines = []
    for name, value in variables.items():
        if name.startswith(_DRIVER_OWNED) or value == "":
            continue  # an empty value would make dummy-ups delete the variable
        lines.append(f"{name}: {_quoted(value)}")
    return "\n".join(lines) + "\n"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def served_view(variables: Mapping[str, str]) -> dict[str, str]:
    """What upsd will serve of a data file's variables, as it will serve them.

    dummy-ups keeps its own ``driver.*`` and mirrors ``ups.mfr``/``ups.model``/``ups.serial``
    into ``device.*``; upsd keeps printable ASCII and at most 127 characters of a value.
    """
    served = {}
    for name, value in variables.items():
        if name.startswith(_DRIVER_OWNED + ("device.",)) or value == "":
            continue
        served[name] = "".join(c for c in value if " " <= c <= "~")[:_MAX_VALUE_LEN]
    return served


@dataclass
class NutUser:
    password: str
    upsmon: str | None = "secondary"  # "primary", "secondary" or None (no rights at all)


@dataclass
class _Ups:
    name: str
    dev_path: Path
    variables: dict[str, str]
    driver: ServiceProcess
    mtime_ns: int = 0


@dataclass
class NutServer:
    """One upsd and its dummy-ups drivers. ``host``/``port`` is where upsd listens."""

    root: Path
    port: int
    users: Mapping[str, NutUser] = field(default_factory=dict)
    maxage: int = 15
    tls: "NssCert | None" = None
    extra_ports: tuple[int, ...] = ()  # more ports upsd also listens on
    host: str = LOOPBACK
    ups: dict[str, _Ups] = field(default_factory=dict)
    upsd: ServiceProcess | None = None

    # -- setup -------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return {"NUT_CONFPATH": str(self.root), "NUT_STATEPATH": str(self.root),
                "NUT_ALTPIDPATH": str(self.root)}

    def write_config(self, devices: Mapping[str, Mapping[str, str]], keep_drivers: bool = False) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.root / "nut.conf", "MODE=standalone\n")
        sections = []
        for name, variables in devices.items():
            dev_path = self.root / f"{name}.dev"
            if not (keep_drivers and name in self.ups):
                self.ups[name] = _Ups(name, dev_path, dict(variables), self._driver(name))
                self._write_dev(self.ups[name])
            sections.append(f"[{name}]\n\tdriver = dummy-ups\n\tport = {dev_path}\n"
                            f"\tmode = dummy-once\n\tpollinterval = 1\n\tdesc = \"hubwatch test {name}\"\n")
        _write(self.root / "ups.conf", "\n".join(sections))
        upsd_conf = "".join(f"LISTEN {self.host} {port}\n" for port in (self.port, *self.extra_ports))
        upsd_conf += f"MAXAGE {self.maxage}\nMAXCONN 256\n"
        if self.tls is not None:
            upsd_conf += f"CERTPATH {self.tls.db_dir}\nCERTIDENT \"{self.tls.nickname}\" \"{self.tls.db_password}\"\n"
        _write(self.root / "upsd.conf", upsd_conf)
        users = []
        for user, spec in self.users.items():
            users.append(f"[{user}]\n\tpassword = {quote_word(spec.password)}\n"
                         + (f"\tupsmon {spec.upsmon}\n" if spec.upsmon else ""))
        _write(self.root / "upsd.users", "\n".join(users))

    def _driver(self, name: str) -> ServiceProcess:
        return ServiceProcess(f"dummy-ups-{name}", [str(DUMMY_UPS), "-F", "-u", _user(), "-a", name],
                              self.root, self.env)

    def _write_dev(self, ups: _Ups) -> None:
        # dummy-once re-reads the file only when its time stamp changes: make it strictly newer
        # (two writes in one second must not look alike).
        ups.dev_path.write_text(dev_text(ups.variables))
        ups.mtime_ns = max(time.time_ns(), ups.mtime_ns + 1_000_000_000)
        os.utime(ups.dev_path, ns=(ups.mtime_ns, ups.mtime_ns))

    def start(self, timeout: float = 30.0) -> "NutServer":
        for ups in self.ups.values():
            ups.driver.start()
        self.upsd = ServiceProcess("upsd", [str(UPSD), "-F", "-u", _user()], self.root, self.env)
        self.upsd.start()
        self.upsd.wait_for_port(self.port, timeout)
        deadline = time.monotonic() + timeout
        for ups in self.ups.values():
            self.wait_served(ups.name, ups.variables, max(1.0, deadline - time.monotonic()))
        return self

    # -- looking --------------------------------------------------------------------------
    def served(self, name: str) -> dict[str, str] | None:
        """What upsd serves for ``name`` now, read with NUT's ``upsc``; None when it will not."""
        result = subprocess.run([str(UPSC), f"{name}@{self.host}:{self.port}"], capture_output=True,
                                text=True, errors="replace", timeout=5)
        if result.returncode != 0:
            return None
        variables = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                variables[key] = value
        return variables

    def wait_served(self, name: str, expected: Mapping[str, str], timeout: float = 10.0) -> None:
        """Wait until upsd serves the variables ``expected`` (as upsd serves them, see served_view)."""
        ups = self.ups[name]
        expected = served_view(expected)
        last: dict[str, str] | None = None

        def ready() -> bool:
            nonlocal last
            last = self.served(name)
            return last is not None and all(last.get(k) == v for k, v in expected.items())
        try:
            _wait(ready, timeout, [ups.driver, self.upsd])
        except ServiceError as exc:
            missing = {k: (v, (last or {}).get(k)) for k, v in expected.items() if (last or {}).get(k) != v}
            raise ServiceError(f"upsd did not serve {name}'s data within {timeout:g}s "
                               f"(want, got): {dict(list(missing.items())[:8])}\n{exc}\n"
                               f"{ups.driver.log_tail(10)}") from None

    # -- changing ------------------------------------------------------------------------
    def set_vars(self, name: str, changes: Mapping[str, str | None], timeout: float = 10.0) -> None:
        """Change UPS ``name``'s variables (None removes one) and wait until upsd serves them."""
        ups = self.ups[name]
        for key, value in changes.items():
            if value is None:
                ups.variables.pop(key, None)
            else:
                ups.variables[key] = value
        self._write_dev(ups)
        self.wait_served(name, {k: v for k, v in changes.items() if v is not None}, timeout)
        gone = [k for k, v in changes.items() if v is None]
        if gone:
            _wait(lambda: not set(gone) & set(self.served(name) or {k: "" for k in gone}), timeout,
                  [ups.driver, self.upsd])

    def add_ups(self, name: str, source: Path | Mapping[str, str], timeout: float = 15.0) -> None:
        """Declare one more UPS, start its driver and make upsd load the new ups.conf."""
        devices = {ups.name: ups.variables for ups in self.ups.values()}
        devices[name] = load_dev(source)
        self.write_config(devices, keep_drivers=True)  # the running drivers stay as they are
        self.ups[name].driver.start()
        self.reload()
        self.wait_served(name, self.ups[name].variables, timeout)

    def set_users(self, users: Mapping[str, NutUser]) -> None:
        """Replace upsd.users and make upsd reload it."""
        self.users = dict(users)
        self.write_config({ups.name: ups.variables for ups in self.ups.values()}, keep_drivers=True)
        self.reload()

    def reload(self) -> None:
        """SIGHUP: upsd re-reads its config files (as ``upsd -c reload`` does)."""
        assert self.upsd is not None
        self.upsd.signal(signal.SIGHUP)

    def stop_upsd(self) -> None:
        assert self.upsd is not None
        self.upsd.stop(timeout=3)

    def start_upsd(self, timeout: float = 15.0) -> None:
        """Start upsd again (same port, same drivers) and wait until it serves every UPS."""
        self.upsd = ServiceProcess("upsd", [str(UPSD), "-F", "-u", _user()], self.root, self.env)
        self.upsd.start()
        self.upsd.wait_for_port(self.port, timeout)
        for ups in self.ups.values():
            if ups.driver.running:
                self.wait_served(ups.name, ups.variables, timeout)

    def kill_driver(self, name: str) -> None:
        """SIGKILL one driver: upsd then answers ERR DRIVER-NOT-CONNECTED (or DATA-STALE)."""
        self.ups[name].driver.kill()

    def pause_driver(self, name: str) -> None:
        """SIGSTOP one driver: it stops answering upsd's pings and goes stale after MAXAGE."""
        self.ups[name].driver.signal(signal.SIGSTOP)

    def resume_driver(self, name: str) -> None:
        self.ups[name].driver.signal(signal.SIGCONT)

    def start_driver(self, name: str, timeout: float = 15.0, wait: bool = True) -> None:
        """Start UPS ``name``'s driver again; with ``wait``, until upsd serves its data."""
        ups = self.ups[name]
        ups.driver.stop()
        ups.driver = self._driver(name)
        ups.driver.start()
        if wait:
            self.wait_served(name, ups.variables, timeout)

    def stop(self) -> None:
        for ups in self.ups.values():
            ups.driver.signal(signal.SIGCONT)  # a stopped process would ignore SIGTERM
            ups.driver.stop(timeout=3)
        if self.upsd is not None:
            self.upsd.stop(timeout=3)

    def kill(self) -> None:
        if self.upsd is not None:
            self.upsd.kill()
        for ups in self.ups.values():
            ups.driver.kill()


@dataclass(frozen=True)
class NssCert:
    """A server certificate in an NSS database (Debian's upsd is built with NSS, not OpenSSL)."""

    db_dir: Path
    nickname: str
    db_password: str
    ca_file: Path  # PEM of the CA that signed it, for the client to trust


def _user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)  # upsd warns about world-readable upsd.conf/upsd.users


def _wait(ready: Callable[[], bool], timeout: float, processes: list[ServiceProcess | None]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if process is not None and process.proc is not None and process.proc.poll() is not None:
                raise ServiceError(f"{process.name} exited with {process.proc.returncode}:\n{process.log_tail()}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"not ready within {timeout:g}s")
        time.sleep(0.1)


def load_dev(source: Path | Mapping[str, str]) -> dict[str, str]:
    if isinstance(source, Mapping):
        return dict(source)
    return parse_upsc_dump(Path(source).read_text(errors="replace"))


class NutServers:
    """Starts NUT servers and, at :meth:`close`, stops every one of them and their files."""

    def __init__(self) -> None:
        self._started: list[NutServer] = []

    def __call__(self, devices: Mapping[str, Path | Mapping[str, str]], users: Mapping[str, NutUser] | None = None,
                 maxage: int = 15, tls: NssCert | None = None, port: int | None = None,
                 extra_ports: tuple[int, ...] = (), timeout: float = 30.0) -> NutServer:
        root = Path(tempfile.mkdtemp(prefix="nut"))  # short: the driver sockets live here
        server = NutServer(root, port or free_port(), dict(users or {}), maxage, tls, tuple(extra_ports))
        self._started.append(server)
        server.write_config({name: load_dev(src) for name, src in devices.items()})
        return server.start(timeout)

    def close(self) -> None:
        for server in self._started:
            try:
                server.stop()
            finally:
                server.kill()
                shutil.rmtree(server.root, ignore_errors=True)


def _servers() -> Iterator[NutServers]:
    if not nut_available():
        pytest.fail("NUT (nut-server, nut-client) is not installed: /lib/nut/upsd, dummy-ups, upsc — "
                    "`make test` installs it")
    servers = NutServers()
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def nut_server() -> Iterator[NutServers]:
    """Factory: ``nut_server({name: dev path or variables}, users=, maxage=, tls=, port=, extra_ports=)``."""
    yield from _servers()


@pytest.fixture(scope="module")
def nut_server_module() -> Iterator[NutServers]:
    """The same factory, its servers shared by one test module (many UPS start in seconds)."""
    yield from _servers()


@pytest.fixture(scope="session")
def nss_cert(tmp_path_factory) -> NssCert:
    """A CA and a server certificate for 127.0.0.1, the latter imported into an NSS database."""
    certutil, pk12util, openssl = (shutil.which(t) for t in ("certutil", "pk12util", "openssl"))
    if not (certutil and pk12util and openssl):
        pytest.fail("STARTTLS test needs certutil and pk12util (Debian libnss3-tools) and openssl — "
                    "`make test` installs them")
    root = tmp_path_factory.mktemp("nss")
    run = lambda *argv: subprocess.run(argv, cwd=root, check=True, capture_output=True, timeout=60)  # noqa: E731
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hubwatch test CA",
        "-keyout", "ca.key", "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    (root / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    run(openssl, "pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key", "-certfile", "ca.pem",
        "-name", "upsd", "-passout", "pass:p12pass", "-out", "server.p12")
    db = root / "db"
    db.mkdir()
    (root / "dbpass").write_text("dbpass\n")
    run(certutil, "-N", "-d", f"sql:{db}", "-f", str(root / "dbpass"))
    run(pk12util, "-i", "server.p12", "-d", f"sql:{db}", "-k", str(root / "dbpass"), "-W", "p12pass")
    return NssCert(db, "upsd", "dbpass", root / "ca.pem")
