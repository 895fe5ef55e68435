"""``snmp_ups``: UPS network cards read over SNMP (v1, v2c or v3).

Each configured UPS is read with the MIB its card speaks best: the IETF UPS-MIB (RFC 1628),
APC PowerNet-MIB or Eaton XUPS-MIB, chosen from sysObjectID or by what answers
(``mib: auto``), or fixed in the config. What the MIBs say, and how their values become
``ups`` fields, lives in :mod:`agent.probes.snmp_mibs` (pure functions); this module does the
SNMP I/O and the config.

pysnmp is imported only inside the probe's instance methods, so an agent without an
``snmp_ups`` probe never loads it. The probe owns an asyncio event loop running in its own
thread: ``collect`` (called from a runner worker thread) hands it one coroutine per cycle,
all UPSes are read concurrently, and one that fails becomes an ``agent`` error sample
without hiding the others.

Metrics (measurement ``ups``, tags hub, host, ups, source=snmp): see docs/probes/snmp_ups.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.confload import Secret, Section
from agent.probes import ProbeContext, ProbeError, error_sample
from agent.probes import snmp_mibs
from agent.probes.snmp_mibs import OID, MibSpec, Value
from agent.probes.upsfields import ups_sample
from agent.wire import ID_PATTERN, Sample

log = logging.getLogger(__name__)

VERSIONS = ("v1", "v2c", "v3")
AUTH_PROTOCOLS = ("MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512")
PRIV_PROTOCOLS = ("DES", "3DES", "AES", "AES128", "AES192", "AES256")
SECURITY_LEVELS = ("noAuthNoPriv", "authNoPriv", "authPriv")
DEFAULT_PORT = 161
DEFAULT_TIMEOUT = 2.0
DEFAULT_RETRIES = 1
#: USM pass phrases shorter than this are refused by agents (RFC 3414, 11.2).
MIN_KEY_LENGTH = 8
#: A walk stops after this many rows per column (a sane table has a handful).
MAX_ROWS = 64
#: Roughly how many variable bindings one GETBULK asks for.
BULK_VARBINDS = 48


@dataclass(frozen=True)
class V3Security:
    username: str
    security_level: str = "noAuthNoPriv"
    auth_protocol: str | None = None
    auth_key: Secret | None = None
    priv_protocol: str | None = None
    priv_key: Secret | None = None
    context_name: str = ""


@dataclass(frozen=True)
class UpsTarget:
    name: str
    host: str
    port: int = DEFAULT_PORT
    version: str = "v2c"
    community: Secret = field(default_factory=lambda: Secret("public"))
    v3: V3Security | None = None
    mib: str = "auto"
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class SnmpUpsProbe:
    name = "snmp_ups"
    measurements = ("ups", "agent")

    @dataclass(frozen=True)
    class Config:
        targets: tuple[UpsTarget, ...] = ()

    # -- config ----------------------------------------------------------------------------
    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "SnmpUpsProbe.Config":
        sections = parent.sections(key)
        if not sections and isinstance(parent.raw(key, None), list):
            parent.problem(key, "list at least one UPS, e.g. [{name: parkups, host: 10.0.0.50}]")
        targets: list[UpsTarget] = []
        seen: set[str] = set()
        for section in sections:
            target = _parse_target(section)
            if target is None:
                continue
            if target.name in seen:
                section.problem("name", f"UPS name {target.name!r} is used twice")
                continue
            seen.add(target.name)
            targets.append(target)
        return cls.Config(tuple(targets))

    # -- running ---------------------------------------------------------------------------
    def __init__(self, config: Config, context: ProbeContext):
        self._config = config
        self._context = context
        try:
            import pysnmp.hlapi.v3arch.asyncio  # noqa: F401  (fail at start, not every cycle)
        except ImportError as exc:
            raise ProbeError("exception", f"snmp_ups needs pysnmp (pip install 'hubwatch[snmp]'): {exc}") from None
        self._sessions: dict[str, _Session] = {}
        self._mibs: dict[str, MibSpec] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="snmp_ups-loop", daemon=True)
        self._thread.start()
        self._closed = False

    def _budget(self) -> float:
        """Seconds one cycle may take: a little under the runner's probe timeout."""
        return max(0.2, self._context.timeout * 0.9)

    def collect(self) -> list[Sample]:
        if self._closed:
            raise ProbeError("exception", "snmp_ups probe is closed")
        now = self._context.clock_ns()
        budget = self._budget()
        future = asyncio.run_coroutine_threadsafe(self._collect_all(now, budget), self._loop)
        try:
            return future.result(budget + 2.0)
        except TimeoutError:
            future.cancel()
            raise ProbeError("timeout", f"SNMP reads did not finish within {budget:g}s") from None

    async def _collect_all(self, now: int, budget: float) -> list[Sample]:
        targets = self._config.targets
        results = await asyncio.gather(*(self._read_within(t, budget) for t in targets),
                                       return_exceptions=True)
        samples: list[Sample] = []
        for target, result in zip(targets, results):
            if isinstance(result, BaseException):
                if not isinstance(result, (ProbeError, asyncio.CancelledError)):
                    log.warning("snmp_ups %s: unexpected failure", target.name, exc_info=result)
                self._mibs.pop(target.name, None)  # detect again next time: the card may have changed
                samples.append(error_sample(self.name, result, now, target=target.name))
                continue
            reading: snmp_mibs.Reading = result
            sample = ups_sample(target.name, "snmp", now, reading.gauges, reading.status)
            if not sample.fields:
                samples.append(error_sample(self.name, ProbeError(
                    "protocol", f"{target.address} answered {snmp_mibs.SPECS[reading.mib].title} "
                                "but no value was usable"), now, target=target.name))
                continue
            samples.append(sample)
        return samples

    async def _read_within(self, target: UpsTarget, budget: float) -> snmp_mibs.Reading:
        try:
            return await asyncio.wait_for(self._read(target), budget)
        except asyncio.TimeoutError:
            raise ProbeError("timeout", f"{target.address}: no complete answer within {budget:g}s") from None

    async def _read(self, target: UpsTarget) -> snmp_mibs.Reading:
        session = self._sessions.get(target.name)
        if session is None:
            session = self._sessions[target.name] = _Session(target)
        await session.connect()
        spec = self._mibs.get(target.name)
        if spec is None:
            spec = await self._choose_mib(target, session)
        values: dict[OID, Value] = {}
        if spec.scalars:
            values.update(await session.get(spec.scalars))
        if spec.columns:
            values.update(await session.walk(spec.columns))
        if not snmp_mibs.answered(spec, values):
            raise ProbeError("protocol", f"{target.address} does not answer {spec.title}"
                             + (" (set mib: to the card's MIB)" if target.mib == "auto" else ""))
        self._mibs[target.name] = spec
        return spec.parse(values)

    async def _choose_mib(self, target: UpsTarget, session: "_Session") -> MibSpec:
        if target.mib != "auto":
            return snmp_mibs.SPECS[target.mib]
        values = await session.get(snmp_mibs.detection_oids())
        spec = snmp_mibs.choose_mib(values)
        if spec is None:
            tried = ", ".join(s.title for s in snmp_mibs.SPECS.values())
            raise ProbeError("protocol", f"{target.address} answers SNMP but none of: {tried}")
        log.info("snmp_ups %s: reading %s", target.name, spec.title)
        return spec

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for session in self._sessions.values():
                session.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(2.0)
        except Exception:  # closing must never fail the agent's shutdown
            log.debug("snmp_ups: closing sessions failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()


# --- config -------------------------------------------------------------------------------

def _parse_target(section: Section) -> UpsTarget | None:
    name = section.str("name", pattern=ID_PATTERN)
    host = section.str("host")
    if isinstance(host, str) and not host.strip():
        section.problem("host", "is empty")
        host = None
    port = section.int("port", DEFAULT_PORT, minimum=1, maximum=65535)
    version = section.str("version", "v2c", choices=VERSIONS)
    mib = section.str("mib", "auto", choices=snmp_mibs.MIB_CHOICES)
    timeout = section.duration("timeout", DEFAULT_TIMEOUT, minimum=0.1, maximum=60)
    retries = section.int("retries", DEFAULT_RETRIES, minimum=0, maximum=10)
    community = section.secret("community")
    v3 = None
    if version == "v3":
        if community is not None:
            section.problem("community", "is for v1/v2c; SNMPv3 uses the v3: section")
        if not section.has("v3"):
            section.problem("v3", "is required with version: v3 (at least v3.username)")
        else:
            v3 = _parse_v3(section.section("v3"))
    elif version is not None and section.has("v3"):
        section.section("v3")
        section.problem("v3", "is only used with version: v3")
    section.done()
    if name is None or host is None or version is None or (version == "v3" and v3 is None):
        return None
    return UpsTarget(name=name, host=host.strip(), port=port or DEFAULT_PORT, version=version,
                     community=community or Secret("public"), v3=v3, mib=mib or "auto",
                     timeout=timeout or DEFAULT_TIMEOUT,
                     retries=DEFAULT_RETRIES if retries is None else retries)


def _protocol(section: Section, key: str, choices: tuple[str, ...]) -> str | None:
    value = section.str(key, None)
    if value is None:
        return None
    canonical = value.upper()
    if canonical not in choices:
        section.problem(key, f"{value!r} is not one of {', '.join(choices)}")
        return None
    return canonical


def _key(section: Section, key: str) -> Secret | None:
    secret = section.secret(key)
    if secret is not None and len(secret.reveal()) < MIN_KEY_LENGTH:
        section.problem(key, f"must be at least {MIN_KEY_LENGTH} characters (RFC 3414)")
    return secret


def _parse_v3(section: Section) -> V3Security | None:
    username = section.str("username")
    auth_protocol = _protocol(section, "auth_protocol", AUTH_PROTOCOLS)
    auth_key = _key(section, "auth_key")
    priv_protocol = _protocol(section, "priv_protocol", PRIV_PROTOCOLS)
    priv_key = _key(section, "priv_key")
    context_name = section.str("context_name", "")
    implied = "authPriv" if priv_key else "authNoPriv" if auth_key else "noAuthNoPriv"
    level = section.str("security_level", implied, choices=SECURITY_LEVELS) or implied
    ok = True
    if level in ("authNoPriv", "authPriv") and auth_key is None:
        section.problem("auth_key", f"is required for security_level {level} (or auth_key_file)")
        ok = False
    if level == "authPriv" and priv_key is None:
        section.problem("priv_key", "is required for security_level authPriv (or priv_key_file)")
        ok = False
    if priv_key is not None and auth_key is None:
        section.problem("priv_key", "privacy needs authentication too: give auth_key")
        ok = False
    if level != "authPriv" and priv_key is not None and section.has("security_level"):
        section.problem("security_level", f"is {level} but priv_key is given (use authPriv)")
        ok = False
    if level == "noAuthNoPriv" and auth_key is not None and section.has("security_level"):
        section.problem("security_level", "is noAuthNoPriv but auth_key is given")
        ok = False
    section.done()
    if username is None or not ok:
        return None
    return V3Security(
        username=username, security_level=level,
        auth_protocol=(auth_protocol or "SHA") if level != "noAuthNoPriv" else None,
        auth_key=auth_key if level != "noAuthNoPriv" else None,
        priv_protocol=(priv_protocol or "AES") if level == "authPriv" else None,
        priv_key=priv_key if level == "authPriv" else None,
        context_name=context_name or "",
    )


# --- SNMP I/O (pysnmp, imported only here, at run time) -----------------------------------

_AUTH_ERRORS = frozenset({
    "UnknownUserName", "WrongDigest", "UnknownSecurityName", "DecryptionError", "AuthenticationError",
    "AuthenticationFailure", "UnsupportedSecurityLevel", "NotInTimeWindow", "NoAuthentication",
    "UnsupportedAuthProtocol", "UnsupportedPrivProtocol",
})


class _Session:
    """One UPS's SNMP engine, credentials and transport; lives on the probe's event loop."""

    def __init__(self, target: UpsTarget):
        self.target = target
        self._engine: Any = None
        self._auth: Any = None
        self._context: Any = None
        self._transport: Any = None

    async def connect(self) -> None:
        """Make the engine once, and resolve the address every cycle (DNS may move)."""
        from pysnmp.error import PySnmpError
        from pysnmp.hlapi.v3arch.asyncio import (ContextData, SnmpEngine, Udp6TransportTarget,
                                                 UdpTransportTarget)

        t = self.target
        if self._engine is None:
            self._engine = SnmpEngine()
            self._auth = _auth_data(t)
            self._context = ContextData(contextName=t.v3.context_name if t.v3 else "")
        kind = Udp6TransportTarget if ":" in t.host else UdpTransportTarget
        try:
            self._transport = await kind.create((t.host, t.port), timeout=t.timeout, retries=t.retries)
        except PySnmpError as exc:
            raise ProbeError("unreachable", f"{t.address}: cannot resolve {t.host!r}: {exc}") from None

    def close(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close_dispatcher()
            finally:
                self._engine = None

    def _failure(self, indication: Any) -> ProbeError:
        t = self.target
        kind = type(indication).__name__
        if kind == "RequestTimedOut":
            tries = t.retries + 1
            hint = " (wrong community?)" if t.version != "v3" else " (wrong context or address?)"
            return ProbeError("timeout", f"{t.address}: no response within {t.timeout:g}s "
                                         f"({tries} {'try' if tries == 1 else 'tries'}){hint}")
        if kind in _AUTH_ERRORS:
            return ProbeError("auth", f"{t.address}: SNMPv3 user {t.v3.username if t.v3 else '?'!r} "
                                      f"refused: {indication}")
        if kind == "EncryptionError":
            return ProbeError("exception", f"{t.address}: {indication} "
                                           "(SNMPv3 privacy needs the 'cryptography' package)")
        return ProbeError("protocol", f"{t.address}: {indication}")

    def _status_error(self, status: Any, index: Any, oids: list[OID]) -> ProbeError:
        where = ""
        position = int(index)
        if 1 <= position <= len(oids):
            where = f" at {'.'.join(map(str, oids[position - 1]))}"
        return ProbeError("snmp", f"{self.target.address}: agent answered {status.prettyPrint()}{where}")

    async def get(self, oids: tuple[OID, ...] | list[OID]) -> dict[OID, Value]:
        """GET the given OIDs; what the agent does not have is simply left out."""
        from pysnmp.hlapi.v3arch.asyncio import ObjectIdentity, ObjectType, get_cmd

        pending = list(oids)
        out: dict[OID, Value] = {}
        while pending:
            indication, status, index, varbinds = await get_cmd(
                self._engine, self._auth, self._transport, self._context,
                *(ObjectType(ObjectIdentity(_dotted(o))) for o in pending), lookupMib=False)
            if indication:
                raise self._failure(indication)
            if status:
                name = status.prettyPrint()
                position = int(index)
                if name == "noSuchName" and 1 <= position <= len(pending):
                    # SNMPv1 answers a GET with one unknown OID with an error for all of them
                    del pending[position - 1]
                    continue
                if name == "tooBig" and len(pending) > 1:
                    half = len(pending) // 2
                    out.update(await self.get(pending[:half]))
                    out.update(await self.get(pending[half:]))
                    return out
                raise self._status_error(status, index, pending)
            for name_, value in varbinds:
                plain = _plain(value)
                if plain is not None:
                    out[tuple(name_)] = plain
            break
        return out

    async def walk(self, columns: tuple[OID, ...]) -> dict[OID, Value]:
        """Every row of each table column (GETNEXT on v1, GETBULK otherwise), all at once."""
        from pysnmp.hlapi.v3arch.asyncio import ObjectIdentity, ObjectType, bulk_cmd, next_cmd

        out: dict[OID, Value] = {}
        cursor = {c: c for c in columns}   # column -> last OID seen in it
        rows = {c: 0 for c in columns}
        repetitions = max(1, BULK_VARBINDS // max(1, len(columns)))
        for _ in range(MAX_ROWS + 1):
            if not cursor:
                break
            active = list(cursor)
            starts = [ObjectType(ObjectIdentity(_dotted(cursor[c]))) for c in active]
            if self.target.version == "v1":
                indication, status, index, varbinds = await next_cmd(
                    self._engine, self._auth, self._transport, self._context, *starts, lookupMib=False)
            else:
                indication, status, index, varbinds = await bulk_cmd(
                    self._engine, self._auth, self._transport, self._context, 0, repetitions,
                    *starts, lookupMib=False)
            if indication:
                raise self._failure(indication)
            if status:
                name = status.prettyPrint()
                position = int(index)
                if name == "noSuchName" and 1 <= position <= len(active):  # v1: past the end of the MIB
                    del cursor[active[position - 1]]
                    continue
                if name == "tooBig" and repetitions > 1:
                    repetitions = max(1, repetitions // 2)
                    continue
                raise self._status_error(status, index, [cursor[c] for c in active])
            if not varbinds:
                break
            finished: set[OID] = set()
            width = len(active)
            for start in range(0, len(varbinds), width):
                for col, (name_, value) in zip(active, varbinds[start:start + width]):
                    if col in finished:
                        continue
                    key = tuple(name_)
                    if _is_end(value) or len(key) <= len(col) or key[:len(col)] != col:
                        finished.add(col)
                        continue
                    if key <= cursor[col]:
                        raise ProbeError("protocol", f"{self.target.address}: agent walked backwards "
                                                     f"at {_dotted(key)}")
                    plain = _plain(value)
                    if plain is not None:
                        out[key] = plain
                    cursor[col] = key
                    rows[col] += 1
                    if rows[col] >= MAX_ROWS:
                        finished.add(col)
            for col in finished:
                cursor.pop(col, None)
        return out


def _auth_data(target: UpsTarget) -> Any:
    from pysnmp.hlapi.v3arch import asyncio as hl

    if target.version != "v3":
        return hl.CommunityData(target.community.reveal(), mpModel=0 if target.version == "v1" else 1)
    v3 = target.v3
    assert v3 is not None
    auth_protocols = {"MD5": hl.USM_AUTH_HMAC96_MD5, "SHA": hl.USM_AUTH_HMAC96_SHA,
                      "SHA224": hl.USM_AUTH_HMAC128_SHA224, "SHA256": hl.USM_AUTH_HMAC192_SHA256,
                      "SHA384": hl.USM_AUTH_HMAC256_SHA384, "SHA512": hl.USM_AUTH_HMAC384_SHA512}
    priv_protocols = {"DES": hl.USM_PRIV_CBC56_DES, "3DES": hl.USM_PRIV_CBC168_3DES,
                      "AES": hl.USM_PRIV_CFB128_AES, "AES128": hl.USM_PRIV_CFB128_AES,
                      "AES192": hl.USM_PRIV_CFB192_AES, "AES256": hl.USM_PRIV_CFB256_AES}
    kwargs: dict[str, Any] = {}
    if v3.auth_key is not None:
        kwargs["authKey"] = v3.auth_key.reveal()
        kwargs["authProtocol"] = auth_protocols[v3.auth_protocol or "SHA"]
    if v3.priv_key is not None:
        kwargs["privKey"] = v3.priv_key.reveal()
        kwargs["privProtocol"] = priv_protocols[v3.priv_protocol or "AES"]
    return hl.UsmUserData(v3.username, **kwargs)


def _dotted(key: OID) -> str:
    return ".".join(str(part) for part in key)


def _is_end(value: Any) -> bool:
    from pysnmp.proto.rfc1905 import EndOfMibView
    return isinstance(value, EndOfMibView)


def _plain(value: Any) -> Value | None:
    """A pysnmp value as plain Python: int, bytes or an OID tuple; None for "no such"/null."""
    from pyasn1.type import univ
    from pysnmp.proto.rfc1905 import EndOfMibView, NoSuchInstance, NoSuchObject

    if isinstance(value, (NoSuchObject, NoSuchInstance, EndOfMibView, univ.Null)):
        return None
    if isinstance(value, univ.ObjectIdentifier):
        return tuple(value)
    if isinstance(value, univ.Integer):
        return int(value)
    if isinstance(value, univ.OctetString):
        return bytes(value.asOctets())
    return None
