"""pytest fixtures: snmpsim, replaying SNMP device recordings on a loopback UDP port.

``snmpsim`` (function scope) and ``snmpsim_factory`` (session scope) are factories::

    agent = snmpsim({"huawei": packaged_recording("UPS/huawei-gse200m.snmprec")},
                    v3_user=V3User("monitor", auth_key="...", priv_key="..."))
    agent.host, agent.port        # where it answers; community = the dict key
    agent.stop()                  # or let the fixture stop it

Each recording is served under its key as SNMPv1/v2c community and as SNMPv3 context name.
snmpsim runs from its own venv (``SNMPSIM_VENV``, made by ``make snmpsim``): it refuses to run
as root, so as root it drops to nobody/nogroup, which must be able to read the data and
write the index cache. pytest's own tmp_path may sit in a 0700 directory, so the files go to
a fresh directory under the system temp dir, checked to be traversable by others.
Readiness is a real SNMP GET answered, not a sleep.
"""

from __future__ import annotations

import bz2
import os
import secrets
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pytest

from tests.services.common import LOOPBACK, ServiceError, ServiceProcess, free_port

SNMPSIM_VENV = Path(os.environ.get("SNMPSIM_VENV", "/opt/hubwatch-test/snmpsim-venv"))
RESPONDER = SNMPSIM_VENV / "bin" / "snmpsim-command-responder"
#: Recordings built for hubwatch (see the README there).
LOCAL_RECORDINGS = Path(__file__).resolve().parent.parent / "data" / "snmp"

#: The real UPS cards in the snmpsim-data package that speak UPS-MIB (RFC 1628).
UPS_MIB_RECORDINGS = {
    "eaton-93e": "UPS/eaton-93e-80.snmprec",
    "phoenixtec": "UPS/phoenixtec-power.snmprec",
    "huawei-gse200m": "UPS/huawei-gse200m.snmprec",
    "eastpower": "UPS/eastpower-istars-swv053.snmprec",
    "ingrasys": "UPS/ingrasys-power-switch.snmprec",
}

SYS_OBJECT_ID = (1, 3, 6, 1, 2, 1, 1, 2, 0)


def snmpsim_data_root() -> Path:
    """The snmpsim-data package's recordings directory inside the snmpsim venv."""
    found = sorted(SNMPSIM_VENV.glob("lib/python3*/site-packages/snmpsim_data/data"))
    if not found:
        raise ServiceError(f"snmpsim-data is not installed in {SNMPSIM_VENV} (run `make snmpsim`)")
    return found[-1]


def packaged_recording(relative: str) -> Path:
    """A recording from snmpsim-data by its path there (plain or ``.bz2``, whichever exists)."""
    base = snmpsim_data_root() / relative
    for candidate in (base, base.with_name(base.name + ".bz2")):
        if candidate.is_file():
            return candidate
    raise ServiceError(f"no recording {relative} (or .bz2) in {snmpsim_data_root()}")


def local_recording(name: str) -> Path:
    return LOCAL_RECORDINGS / f"{name}.snmprec"


def read_recording(path: Path) -> str:
    """The text of a recording, decompressing ``.bz2`` ones."""
    data = path.read_bytes()
    if path.suffix == ".bz2":
        data = bz2.decompress(data)
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class V3User:
    name: str
    auth_key: str | None = None
    auth_proto: str = "SHA"
    priv_key: str | None = None
    priv_proto: str = "AES"


@dataclass
class SnmpSim:
    host: str
    port: int
    communities: tuple[str, ...]
    v3_user: V3User | None
    workdir: Path
    process: ServiceProcess = field(repr=False)

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        return self.process.log_tail(60)


# --- a minimal SNMP GET, so readiness needs no SNMP library -------------------------------

def _ber_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _ber_length(len(payload)) + payload


def _ber_integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _ber_oid(oid: tuple[int, ...]) -> bytes:
    body = bytearray([40 * oid[0] + oid[1]])
    for arc in oid[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def snmp_get_answers(host: str, port: int, community: str, oid: tuple[int, ...] = SYS_OBJECT_ID,
                     timeout: float = 0.3) -> bool:
    """True when an SNMPv2c GET for ``oid`` with ``community`` gets a GetResponse back."""
    request_id = secrets.randbelow(2**31 - 1)
    varbinds = _tlv(0x30, _tlv(0x30, _ber_oid(oid) + _tlv(0x05, b"")))
    pdu = _tlv(0xA0, _ber_integer(request_id) + _ber_integer(0) + _ber_integer(0) + varbinds)
    message = _tlv(0x30, _ber_integer(1) + _tlv(0x04, community.encode()) + pdu)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(message, (host, port))
        try:
            answer, _ = sock.recvfrom(65535)
        except OSError:  # timeout, or ICMP port unreachable while it is still starting
            return False
    return answer[:1] == b"\x30" and b"\xa2" in answer and _ber_integer(request_id) in answer


# --- the server ---------------------------------------------------------------------------

def _traversable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _workdir() -> Path:
    """A fresh directory nobody/nogroup can reach (pytest's basetemp may be 0700)."""
    for base in (Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")):
        if base.is_dir() and _traversable_by_others(base):
            path = Path(tempfile.mkdtemp(prefix="hubwatch-snmpsim-", dir=base))
            path.chmod(0o755)
            return path
    raise ServiceError("no temp directory that user nobody can traverse (tried $TMPDIR, /tmp, /var/tmp)")


class SnmpSimFactory:
    def __init__(self) -> None:
        self._running: list[SnmpSim] = []

    def start(self, recordings: Mapping[str, Path], v3_user: V3User | None = None,
              timeout: float = 30.0) -> SnmpSim:
        if not RESPONDER.exists():
            raise ServiceError(f"{RESPONDER} is missing: run `make snmpsim` (or set SNMPSIM_VENV)")
        if not recordings:
            raise ValueError("serve at least one recording")
        workdir = _workdir()
        data = workdir / "data"
        cache = workdir / "cache"
        data.mkdir(mode=0o755)
        cache.mkdir(mode=0o755)
        for community, source in recordings.items():
            target = data / f"{community}.snmprec"
            target.write_text(read_recording(Path(source)))  # always served plain, never .bz2
            target.chmod(0o644)
        root = os.geteuid() == 0
        if root:
            shutil.chown(cache, "nobody", "nogroup")
        else:
            cache.chmod(0o777)
        port = free_port(socket.SOCK_DGRAM)
        argv = [str(RESPONDER), f"--data-dir={data}", f"--cache-dir={cache}",
                f"--agent-udpv4-endpoint={LOOPBACK}:{port}", "--log-level=info"]
        if root:
            argv += ["--process-user=nobody", "--process-group=nogroup"]
        if v3_user is not None:
            argv += [f"--v3-user={v3_user.name}"]
            if v3_user.auth_key:
                argv += [f"--v3-auth-key={v3_user.auth_key}", f"--v3-auth-proto={v3_user.auth_proto}"]
            if v3_user.priv_key:
                argv += [f"--v3-priv-key={v3_user.priv_key}", f"--v3-priv-proto={v3_user.priv_proto}"]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8"}
        process = ServiceProcess("snmpsim", argv, workdir, env=env, user_env=False)
        sim = SnmpSim(LOOPBACK, port, tuple(recordings), v3_user, workdir, process)
        process.start()
        self._running.append(sim)
        first = next(iter(recordings))
        try:
            process.wait_until(lambda: snmp_get_answers(LOOPBACK, port, first), timeout,
                               f"answering SNMP GET on {LOOPBACK}:{port} (community {first})")
        except ServiceError:
            sim.stop()
            raise
        return sim

    def stop_all(self) -> None:
        while self._running:
            self._running.pop().stop()


@pytest.fixture
def snmpsim():
    """Start snmpsim replaying ``{community: recording path}``; stopped after the test."""
    factory = SnmpSimFactory()
    yield factory.start
    factory.stop_all()


@pytest.fixture(scope="session")
def snmpsim_factory():
    """Like ``snmpsim``, for module- or session-scoped fixtures; stopped at session end."""
    factory = SnmpSimFactory()
    yield factory.start
    factory.stop_all()
