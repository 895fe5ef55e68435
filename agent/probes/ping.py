"""``ping``: latency and loss to named targets, without root.

Uses an unprivileged ICMP echo socket (``SOCK_DGRAM``/``IPPROTO_ICMP``) where the kernel
allows it (``net.ipv4.ping_group_range`` includes the agent's group), otherwise a TCP
connect to a port: a completed handshake *or* a refusal (RST) both prove the host answered.
The sample's ``method`` field says which was used. A name that does not resolve gives
``reachable=false`` with the reason in ``error``; it never raises.

Metrics (measurement ``ping``, tags hub, host, target, address): ``rtt_avg_ms``,
``rtt_min_ms``, ``rtt_max_ms`` (only when something answered), ``loss_percent``,
``reachable``, ``method``, ``error`` (only when unreachable).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent.confload import Section
from agent.probes import ProbeContext
from agent.wire import Sample

METHODS = ("auto", "icmp", "tcp")
_ICMP_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
_ICMP_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
_sequence = itertools.count(1)


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    port: int


@dataclass(frozen=True)
class Result:
    """What one target's probes measured; rtts in milliseconds of the answered probes."""

    sent: int
    rtts: tuple[float, ...]
    method: str
    address: str
    error: str | None = None

    def fields(self) -> dict[str, float | bool | str]:
        out: dict[str, float | bool | str] = {
            "loss_percent": round(100.0 * (self.sent - len(self.rtts)) / self.sent, 2) if self.sent else 100.0,
            "reachable": bool(self.rtts),
            "method": self.method,
        }
        if self.rtts:
            out["rtt_min_ms"] = round(min(self.rtts), 3)
            out["rtt_avg_ms"] = round(sum(self.rtts) / len(self.rtts), 3)
            out["rtt_max_ms"] = round(max(self.rtts), 3)
        elif self.error:
            out["error"] = self.error
        return out


def icmp_allowed(family: int = socket.AF_INET) -> bool:
    """Whether this process may open an unprivileged ICMP echo socket."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    try:
        socket.socket(family, socket.SOCK_DGRAM, proto).close()
        return True
    except OSError:
        return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(family: int, address: str, count: int, timeout: float, spacing: float) -> list[float]:
    """Round-trip times (ms) of the echoes answered, out of ``count`` sent."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    rtts = []
    with socket.socket(family, socket.SOCK_DGRAM, proto) as sock:
        for i in range(count):
            if i:
                time.sleep(spacing)
            seq = next(_sequence) & 0xFFFF
            payload = os.urandom(16)
            header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST[family], 0, 0, 0, seq)
            packet = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST[family], 0,
                                 _checksum(header + payload), 0, seq) + payload
            start = time.monotonic()
            try:
                sock.sendto(packet, (address, 0))
            except OSError:
                continue  # no route, network down: this probe is lost
            deadline = start + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                reply = sock.recv(2048)
                # The kernel strips the IP header and rewrites the id; match type, seq and payload.
                if (len(reply) >= 8 + len(payload) and reply[0] == _ICMP_ECHO_REPLY[family]
                        and struct.unpack("!H", reply[6:8])[0] == seq and reply[8:8 + len(payload)] == payload):
                    rtts.append((time.monotonic() - start) * 1000.0)
                    break
    return rtts


def tcp_connect(family: int, address: str, port: int, count: int, timeout: float, spacing: float) -> list[float]:
    """Round-trip times (ms) of TCP handshakes; a refusal counts as an answer."""
    rtts = []
    for i in range(count):
        if i:
            time.sleep(spacing)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            start = time.monotonic()
            try:
                code = sock.connect_ex((address, port))
            except OSError:
                continue
            if code in (0, errno.ECONNREFUSED):
                rtts.append((time.monotonic() - start) * 1000.0)
    return rtts


def resolve(name: str) -> tuple[int, str]:
    """(family, address) for a name or literal; IPv4 preferred. OSError when it does not resolve."""
    infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][0], infos[0][4][0]


class PingProbe:
    name = "ping"
    measurements = ("ping",)

    @dataclass(frozen=True)
    class Config:
        targets: tuple[Target, ...] = ()
        count: int = 3
        timeout: float = 1.0
        spacing: float = 0.2
        method: str = "auto"

    @classmethod
    def parse_config(cls, parent: Section, key: str) -> "PingProbe.Config":
        section = parent.section(key)
        tcp_port = section.int("tcp_port", 443, minimum=1, maximum=65535) or 443
        targets = []
        targets_section = section.section("targets", required=True)
        for name, value in targets_section.items():
            path_key = name
            if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
                targets_section.problem(path_key, "target names are letters, digits, - and _")
                continue
            if isinstance(value, dict):
                target_section = targets_section.section(name)
                address = target_section.str("address")
                port = target_section.int("port", tcp_port, minimum=1, maximum=65535)
                target_section.done()
            elif isinstance(value, str) and value.strip():
                address, port = value.strip(), tcp_port
            else:
                targets_section.problem(path_key, "expected an address or {address, port}")
                continue
            if address:
                targets.append(Target(name, address, port or tcp_port))
        if not targets and not targets_section.keys() and section.has("targets"):
            targets_section.problem(None, "name at least one target, e.g. {internet: 1.1.1.1}")
        config = cls.Config(
            targets=tuple(targets),
            count=section.int("count", 3, minimum=1, maximum=20),
            timeout=section.duration("timeout", 1.0, minimum=0.05, maximum=10),
            spacing=section.duration("spacing", 0.2, minimum=0, maximum=5),
            method=section.str("method", "auto", choices=METHODS),
        )
        section.done()
        return config

    def __init__(self, config: Config, context: ProbeContext):
        self._config = config
        self._context = context
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(config.targets))),
                                        thread_name_prefix="ping")

    def _method_for(self, family: int) -> str:
        if self._config.method != "auto":
            return self._config.method
        return "icmp" if icmp_allowed(family) else "tcp"

    def measure(self, target: Target) -> Result:
        c = self._config
        try:
            family, address = resolve(target.address)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return Result(c.count, (), self._method_for(socket.AF_INET), target.address,
                          f"name {target.address!r} did not resolve: {reason}")
        method = self._method_for(family)
        try:
            if method == "icmp":
                rtts = icmp_echo(family, address, c.count, c.timeout, c.spacing)
            else:
                rtts = tcp_connect(family, address, target.port, c.count, c.timeout, c.spacing)
        except PermissionError as exc:
            return Result(c.count, (), method, address,
                          f"ICMP echo not permitted ({exc.strerror}); use method: tcp or allow "
                          "the agent's group in net.ipv4.ping_group_range")
        error = None if rtts else f"no answer to {c.count} {method} probe(s) within {c.timeout:g}s each"
        return Result(c.count, tuple(rtts), method, address, error)

    def collect(self) -> list[Sample]:
        now = self._context.clock_ns()
        results = list(self._pool.map(self.measure, self._config.targets))
        return [Sample("ping", now, {"target": t.name, "address": r.address}, r.fields())
                for t, r in zip(self._config.targets, results)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
