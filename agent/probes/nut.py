"""``nut``: UPS read from a NUT ``upsd`` over its network protocol (TCP, port 3493).

The protocol is spoken here directly (no NUT client library): ``LIST VAR <ups>`` answers
``BEGIN LIST VAR``, one ``VAR <ups> <name> "<value>"`` line per variable and ``END LIST VAR``,
or a single ``ERR <CODE>`` line. A connection is kept open between cycles and reopened after
an error; every UPS on one server (with the same credentials) shares it. ``STARTTLS`` and
``USERNAME``/``PASSWORD`` are sent when configured.

upsd checks a password only for commands that need a right (``LOGIN``, ``SET``,
``INSTCMD``), never for ``USERNAME``/``PASSWORD`` or for reading. With ``login: true`` the
probe also sends ``LOGIN <ups>`` (the user needs ``upsmon`` in upsd.users), which makes a
wrong password show up as an ``auth`` error; without it a wrong password goes unnoticed.

Metrics (measurement ``ups``, tags hub, host, ups, source=nut): the gauges
``battery_charge_percent``, ``battery_charge_low_percent``, ``battery_runtime_seconds``,
``battery_voltage_volts``, ``input_voltage_volts``, ``input_frequency_hz``,
``output_voltage_volts``, ``load_percent``, ``temperature_celsius``, ``realpower_watts``
(each absent when the UPS does not report a sane number), ``status`` and the booleans read
from its tokens. A UPS that could not be read gives an ``agent`` point (tags probe=nut,
target=NAME) with ``error_kind`` one of ``connection_refused``, ``timeout``, ``unreachable``,
``unknown_ups``, ``data_stale``, ``auth``, ``protocol``. See docs/probes/nut.md.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from agent.confload import Secret, Section
from agent.probes import ProbeContext, ProbeError, error_sample
from agent.probes.upsfields import ups_sample
from agent.wire import ID_PATTERN, Sample

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3493
DEFAULT_TIMEOUT = 3.0

#: A UPS name on the server, a user name: one protocol word, nothing that could end the line.
_PROTOCOL_WORD = re.compile(r"[^\s\"\\]{1,255}")

# Guards against a server (or something that is not one) sending without end.
_MAX_LINE_BYTES = 64 * 1024
_MAX_VARS = 10_000
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# --- pure parsing -------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _number(value: str | None, minimum: float | None = 0.0, maximum: float | None = None) -> float | None:
    """A finite number within bounds, or None: a device's "unknown" is never a number."""
    if value is None:
        return None
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    if not math.isfinite(number):
        return None
    if minimum is not None and number < minimum:
        return None
    if maximum is not None and number > maximum:
        return None
    return number


# ups field -> (NUT variables in order of preference, minimum, maximum). A reading outside
# the bounds is not a measurement: a negative quantity that cannot be negative is a device's
# "unknown" (often -1), and the DDL shows drivers reporting kelvin as celsius (302 "°C"),
# centi-hertz (5990 "Hz"), 0xFFFF minutes as a runtime (3932100 s) or 4.6e254 % load. The
# maxima are far beyond any UPS a hub could have, so no real reading is lost to them.
VARIABLE_MAP: Mapping[str, tuple[tuple[str, ...], float, float]] = {
    "battery_charge_percent": (("battery.charge",), 0.0, 100.0),
    "battery_charge_low_percent": (("battery.charge.low",), 0.0, 100.0),
    "battery_runtime_seconds": (("battery.runtime",), 0.0, 7 * 86400.0),
    "battery_voltage_volts": (("battery.voltage",), 0.0, 1000.0),
    "input_voltage_volts": (("input.voltage",), 0.0, 1000.0),
    "input_frequency_hz": (("input.frequency",), 0.0, 500.0),
    "output_voltage_volts": (("output.voltage",), 0.0, 1000.0),
    "load_percent": (("ups.load",), 0.0, 1000.0),
    "temperature_celsius": (("ups.temperature", "battery.temperature"), -60.0, 150.0),
    "realpower_watts": (("ups.realpower",), 0.0, 1_000_000.0),
}


def parse_vars(variables: Mapping[str, str]) -> tuple[dict[str, float], str | None]:
    """Map NUT variables to ``ups`` gauges and the raw status string.

    A value that is not a finite number within its field's bounds is left out (never 0,
    never an exception); for the temperature, ``battery.temperature`` stands in when
    ``ups.temperature`` is absent or unusable. The status is None when empty or absent.
    """
    gauges: dict[str, float] = {}
    for field, (names, minimum, maximum) in VARIABLE_MAP.items():
        for name in names:
            number = _number(variables.get(name), minimum, maximum)
            if number is not None:
                gauges[field] = number
                break
    status = variables.get("ups.status")
    if status is not None:
        status = " ".join(status.split()) or None
    return gauges, status


_INLINE_COMMENT = re.compile(r"[ \t]#")
_NOTE_ONLY = re.compile(r"#[A-Z][A-Z_-]*:")  # a DDL note where the value should be ("#BAD: ...")


def parse_upsc_dump(text: str) -> dict[str, str]:
    """Variables of an ``upsc`` dump (a NUT DDL ``.dev`` file): ``name: value`` lines.

    ``#`` starts a comment at the start of a line or after a blank within the value (the
    DDL's ``#BAD:`` and ``#COMMENT:`` notes follow values that way); a value that is only such
    a note is empty; ``#`` inside a value (``####``) is kept. Lines that are not
    ``name: value`` (``TIMER`` of sequence files, stray text) are skipped.
    """
    variables: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            continue
        value = value.strip()
        if _NOTE_ONLY.match(value):
            value = ""
        comment = _INLINE_COMMENT.search(value)
        if comment is not None:
            value = value[:comment.start()].rstrip()
        variables[name] = value
    return variables


def split_words(line: str) -> list[str]:
    """Split a protocol line into words: blanks separate, ``"..."`` groups, ``\\`` escapes.

    ValueError on an unterminated quote or a trailing backslash.
    """
    words: list[str] = []
    current: list[str] = []
    in_word = quoted = False
    chars = iter(line)
    for char in chars:
        if char == "\\":
            try:
                current.append(next(chars))
            except StopIteration:
                raise ValueError("line ends with a backslash") from None
            in_word = True
        elif char == '"':
            quoted = not quoted
            in_word = True
        elif char.isspace() and not quoted:
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if quoted:
        raise ValueError("unterminated quote")
    if in_word:
        words.append("".join(current))
    return words


def quote_word(word: str) -> str:
    """``word`` as one protocol argument (quoted and escaped when it needs it)."""
    if word and not any(c.isspace() or c in '"\\' for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- errors -------------------------------------------------------------------------------

#: upsd ERR codes -> error kind (anything else is "protocol")
_ERR_KINDS = {
    "UNKNOWN-UPS": "unknown_ups",
    "DATA-STALE": "data_stale",
    "DRIVER-NOT-CONNECTED": "data_stale",
    "ACCESS-DENIED": "auth",
    "USERNAME-REQUIRED": "auth",
    "PASSWORD-REQUIRED": "auth",
    "INVALID-USERNAME": "auth",
    "INVALID-PASSWORD": "auth",
    "ALREADY-SET-USERNAME": "auth",
    "ALREADY-SET-PASSWORD": "auth",
}

_ERR_WORDS = {
    "UNKNOWN-UPS": "upsd knows no UPS of that name",
    "DATA-STALE": "upsd has no fresh data from the UPS driver",
    "DRIVER-NOT-CONNECTED": "the UPS driver is not connected to upsd",
    "ACCESS-DENIED": "upsd denied access (wrong user or password, or the user lacks the right)",
}


class _Broken(ProbeError):
    """The connection can no longer be trusted (the conversation is out of step)."""


def _server_error(reply: str, what: str) -> ProbeError:
    words = reply.split()
    code = words[1] if len(words) > 1 else ""
    kind = _ERR_KINDS.get(code, "protocol")
    explained = _ERR_WORDS.get(code)
    message = f"{what}: upsd answered {_shorten(reply)!r}" + (f" ({explained})" if explained else "")
    return ProbeError(kind, message)


# --- config -------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpsTarget:
    """One UPS to read: ``name`` (the ``ups`` tag) is ``ups`` on the server ``host:port``."""

    name: str
    ups: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    username: str | None = None
    password: Secret | None = None
    starttls: bool = False
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    login: bool = False

    def connection_key(self) -> tuple:
        """UPS with equal keys share one connection (LOGIN binds a connection to one UPS)."""
        return (self.host, self.port, self.username, self.password, self.starttls, self.ca_file,
                self.timeout, self.ups if self.login else None)


def _parse_target(section: Section) -> UpsTarget | None:
    name = section.str("name", pattern=ID_PATTERN)  # the ups tag, as snmp_ups names it
    ups = section.str("ups", name, pattern=_PROTOCOL_WORD)
    host = section.str("host", DEFAULT_HOST)
    if host is not None and (not host.strip() or any(c.isspace() for c in host)):
        section.problem("host", f"{host!r} is not a host name or address")
        host = None
    port = section.int("port", DEFAULT_PORT, minimum=1, maximum=65535)
    username = section.str("username", None, pattern=_PROTOCOL_WORD)
    password = section.secret("password")
    if password is not None and any(c in password.reveal() for c in "\r\n\0"):
        section.problem("password", "must be one line")
        password = None
    if password is not None and username is None:
        section.problem("password", "a password needs a username")
    starttls = section.bool("starttls", False)
    ca_file = section.path_value("ca_file", None)
    if ca_file is not None:
        if not ca_file.is_file():
            section.problem("ca_file", f"{ca_file} is not a readable file")
        if not starttls:
            section.problem("ca_file", "is used only with starttls: true")
    timeout = section.duration("timeout", DEFAULT_TIMEOUT, minimum=0.1, maximum=60)
    login = section.bool("login", False)
    if login and username is None:
        section.problem("login", "LOGIN needs a username and password")
    section.done()
    if name is None or ups is None or host is None or port is None or timeout is None:
        return None
    return UpsTarget(name=name, ups=ups, host=host, port=port, username=username, password=password,
                     starttls=bool(starttls), ca_file=ca_file, timeout=timeout, login=bool(login))


# --- connection ---------------------------------------------------------------------------

class _Connection:
    """One conversation with upsd; every method raises ProbeError (``_Broken`` when the
    connection must be dropped)."""

    def __init__(self, target: UpsTarget):
        self.target = target
        self._sock: socket.socket | None = None
        self._buffer = b""

    @property
    def open(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        target = self.target
        where = f"{target.host}:{target.port}"
        deadline = time.monotonic() + target.timeout
        try:
            sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
        except ConnectionRefusedError:
            raise _Broken("connection_refused", f"nothing listens on {where} (is upsd running?)") from None
        except (socket.timeout, TimeoutError):
            raise _Broken("timeout", f"connecting to {where} timed out after {target.timeout:g}s") from None
        except OSError as exc:
            raise _Broken("unreachable", f"cannot connect to {where}: {exc.strerror or exc}") from None
        self._sock, self._buffer = sock, b""
        try:
            if target.starttls:
                self._starttls(deadline)
            if target.username is not None:
                self._expect_ok(f"USERNAME {quote_word(target.username)}", deadline, "USERNAME")
                if target.password is not None:
                    self._expect_ok(f"PASSWORD {quote_word(target.password.reveal())}", deadline, "PASSWORD")
            if target.login:
                self._expect_ok(f"LOGIN {quote_word(target.ups)}", deadline, f"LOGIN {target.ups}")
        except ProbeError as exc:
            self.close()
            raise _Broken(exc.kind, str(exc)) from None
        except BaseException:
            self.close()
            raise

    def _starttls(self, deadline: float) -> None:
        reply = self._request("STARTTLS", deadline)
        if reply.startswith("ERR "):
            raise _Broken("protocol", f"upsd refused STARTTLS: {reply!r} (is CERTFILE/CERTPATH set in upsd.conf?)")
        if reply.split() != ["OK", "STARTTLS"]:
            raise _Broken("protocol", f"STARTTLS: expected 'OK STARTTLS', got {_shorten(reply)!r}")
        context = ssl.create_default_context(
            cafile=str(self.target.ca_file) if self.target.ca_file is not None else None)
        assert self._sock is not None
        self._sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=self.target.host)
        except ssl.SSLCertVerificationError as exc:
            raise _Broken("auth", f"TLS: upsd's certificate is not trusted: {exc.verify_message}") from None
        except (socket.timeout, TimeoutError):
            raise _Broken("timeout", f"TLS handshake with {self._where} timed out") from None
        except (ssl.SSLError, OSError) as exc:
            raise _Broken("protocol", f"TLS handshake with {self._where} failed: {exc}") from None

    @property
    def _where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    def _expect_ok(self, command: str, deadline: float, what: str) -> None:
        reply = self._request(command, deadline)
        if reply.startswith("ERR"):
            raise _server_error(reply, what)
        if not reply.startswith("OK"):
            raise _Broken("protocol", f"{what}: expected OK, got {_shorten(reply)!r}")

    def _request(self, command: str, deadline: float) -> str:
        self._send(command, deadline)
        return self._readline(deadline)

    def _send(self, command: str, deadline: float) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            self._sock.sendall(command.encode() + b"\n")
        except (socket.timeout, TimeoutError):
            raise _Broken("timeout", f"sending to {self._where} timed out") from None
        except OSError as exc:
            raise _Broken("unreachable", f"connection to {self._where} lost: {exc.strerror or exc}") from None

    def _readline(self, deadline: float) -> str:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            if len(self._buffer) > _MAX_LINE_BYTES:
                raise _Broken("protocol", f"{self._where} sent a line longer than {_MAX_LINE_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Broken("timeout", f"no answer from {self._where} within {self.target.timeout:g}s")
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise _Broken("timeout", f"no answer from {self._where} within {self.target.timeout:g}s") from None
            except OSError as exc:
                raise _Broken("unreachable", f"connection to {self._where} lost: {exc.strerror or exc}") from None
            if not chunk:
                raise _Broken("protocol", f"{self._where} closed the connection without answering")
            self._buffer += chunk
            self._ack_now()
        raw, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            return raw.decode("latin-1").rstrip("\r")

    def _ack_now(self) -> None:
        # upsd writes a listing line by line; with Nagle on its side and delayed ACKs on ours
        # every LIST VAR would stall about 40 ms. Linux's quick-ACK mode (which lapses, so it
        # is set again after each read) lets the next line come at once.
        if _TCP_QUICKACK is not None and self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass

    def list_vars(self, ups: str) -> dict[str, str]:
        """Every variable of ``ups``; ProbeError for an ERR answer, _Broken for garbage."""
        deadline = time.monotonic() + self.target.timeout
        reply = self._request(f"LIST VAR {quote_word(ups)}", deadline)
        if reply.startswith("ERR "):
            raise _server_error(reply, f"LIST VAR {ups}")
        if _words(reply) != ["BEGIN", "LIST", "VAR", ups]:
            raise _Broken("protocol", f"LIST VAR {ups}: expected 'BEGIN LIST VAR {ups}', got {_shorten(reply)!r}")
        variables: dict[str, str] = {}
        while True:
            line = self._readline(deadline)
            words = _words(line)
            if words == ["END", "LIST", "VAR", ups]:
                return variables
            if words is None or len(words) != 4 or words[0] != "VAR" or words[1] != ups:
                raise _Broken("protocol", f"LIST VAR {ups}: unexpected line {_shorten(line)!r}")
            if len(variables) >= _MAX_VARS:
                raise _Broken("protocol", f"LIST VAR {ups}: more than {_MAX_VARS} variables")
            variables[words[2]] = words[3]

    def close(self) -> None:
        sock, self._sock, self._buffer = self._sock, None, b""
        if sock is None:
            return
        try:
            sock.settimeout(0.2)
            sock.sendall(b"LOGOUT\n")  # courtesy: upsd logs a clean goodbye instead of a drop
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass


def _words(line: str) -> list[str] | None:
    try:
        return split_words(line)
    except ValueError:
        return None


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- the probe ----------------------------------------------------------------------------

class NutProbe:
    name = "nut"
    measurements = ("ups", "agent")

    @dataclass(frozen=True)
    class Config:
        ups: tuple[UpsTarget, ...] = ()

    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "NutProbe.Config":
        targets: list[UpsTarget] = []
        seen: set[str] = set()
        if parent.raw(key, None) == []:
            parent.problem(key, "lists no UPS (give at least one {name: ...})")
        sections = parent.sections(key)
        for section in sections:
            target = _parse_target(section)
            if target is None:
                continue
            if target.name in seen:
                section.problem("name", f"{target.name!r} is already used by another UPS entry")
                continue
            seen.add(target.name)
            targets.append(target)
        return cls.Config(ups=tuple(targets))

    def __init__(self, config: Config, context: ProbeContext):
        self._config = config
        self._context = context
        self._groups: dict[tuple, list[UpsTarget]] = {}
        for target in config.ups:
            self._groups.setdefault(target.connection_key(), []).append(target)
        self._connections = {key: _Connection(targets[0]) for key, targets in self._groups.items()}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def collect(self) -> list[Sample]:
        with self._lock:
            now = self._context.clock_ns()
            keys = list(self._groups)
            if len(keys) <= 1:
                results = [self._collect_group(key, now) for key in keys]
            else:
                # Servers are read side by side, so one that hangs costs one timeout, not one each.
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=min(8, len(keys)), thread_name_prefix="nut")
                results = list(self._pool.map(lambda key: self._collect_group(key, now), keys))
            return [sample for group in results for sample in group]

    def _collect_group(self, key: tuple, now: int) -> list[Sample]:
        connection = self._connections[key]
        # A connection kept from an earlier cycle may have died meanwhile (upsd restarted):
        # its first failure earns one retry on a fresh connection before it counts.
        may_retry = connection.open
        samples: list[Sample] = []
        broken: ProbeError | None = None
        for target in self._groups[key]:
            if broken is not None:  # the server failed this cycle: do not wait on it again
                samples.append(error_sample(self.name, broken, now, target=target.name))
                continue
            try:
                try:
                    variables = self._list_vars(connection, target)
                except _Broken as exc:
                    if not may_retry or exc.kind == "timeout":
                        raise
                    connection.close()
                    variables = self._list_vars(connection, target)
                samples.append(self._sample(target, variables, now))
            except _Broken as exc:
                connection.close()
                broken = exc
                samples.append(error_sample(self.name, exc, now, target=target.name))
            except ProbeError as exc:
                samples.append(error_sample(self.name, exc, now, target=target.name))
            may_retry = False
        return samples

    @staticmethod
    def _list_vars(connection: _Connection, target: UpsTarget) -> dict[str, str]:
        if not connection.open:
            connection.connect()
        return connection.list_vars(target.ups)

    @staticmethod
    def _sample(target: UpsTarget, variables: Mapping[str, str], now: int) -> Sample:
        gauges, status = parse_vars(variables)
        if not gauges and status is None:
            raise ProbeError("protocol", f"UPS {target.ups} on {target.host}:{target.port} reports none of "
                                         f"the variables hubwatch reads ({len(variables)} variables)")
        return ups_sample(target.name, "nut", now, gauges, status)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
