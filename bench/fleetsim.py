#!/usr/bin/env python3
"""Fleet simulator: N hubs' agents over MQTT, sending exactly what hubwatch-agent sends.

    python bench/fleetsim.py --broker 127.0.0.1:1883 --hubs 1000 [--first 0] [--interval 10] \\
        [--duration 120] [--drain-timeout 120] [--seed 1] [--wait-for-go]

Each hub is its own MQTT v5 connection, as an agent's gateway PC would be: client id
``hubwatch-{hub}-gw01``, a persistent session (clean start off, a session expiry), the
retained ``status`` topic with ``offline`` as the Last Will, and a subscription to its own
``ack`` topic. Every interval it publishes, QoS 1, real :mod:`agent.wire` envelopes (``seq``
growing per hub) with the default probes' samples: every cycle commits ``ups`` (one UPS
through NUT), ``net`` (one or two interfaces), ``system``, ``ping`` (the ``gateway`` and
``internet`` targets) and the agent's own ``agent`` point, and, as the agent does with its
default ``buffer.batch_max_age`` (60 s; ``--batch-max-age``), the cycles wait until the oldest
is that old and leave together in one ``metrics`` message. Samples are packed only while the
link is up, so a backlog built while it was down leaves in full batches (at most 1,000
samples a message) when it returns. The UPS is read every ``ups_poll`` (2 s): a power change
goes out at once on ``events``, and so does every poll's UPS sample while on battery (no
``ups`` in the metrics then), as the agent does.

Messages stay in an in-memory outbox until the collector acknowledges their ``seq`` on the
``ack`` topic; at most ``window`` (20) wait for a PUBACK and ``max_unconfirmed`` (200) for
the collector; one not confirmed within ``resend_after`` (60 s, doubling) is sent again.

What happens to the hubs (each a small state machine, rates per hub-hour, compressed so a
few minutes show every case; see ``Scenario``):

- power cuts: the UPS goes on battery and drains at the hub's own rate; if the cut outlasts
  the battery the PC dies (the connection drops without a word: the broker sends the Last
  Will), and boots again some time after the mains return, with a new boot time and its
  unsent messages still in the outbox (it is durable on the real agent);
- uplink drops: the connection drops, the agent keeps sampling into its outbox (the
  ``internet`` ping target unreachable), and replays the backlog when the link returns;
- reboots: a clean stop (retained ``stopped``, a normal DISCONNECT), down a while, then a
  new boot time.

Writes JSON lines on stdout: ``{"ready": ...}`` once every hub is connected, ``{"canary":
[hub, t_ns, sent_ns]}`` for a sampled live message (its newest ``system`` sample's time,
and when the message was published: the benchmark times how long from then until that point
is queryable in InfluxDB), ``{"cut": [hub, t_ns, seconds]}`` when a
running hub loses mains power, ``{"stats": ...}`` every few seconds,
and ``{"final": ...}`` at the end: samples generated and acknowledged per measurement.
After ``--duration`` no new samples are taken: every hub's power and link come back and the
outboxes drain (up to ``--drain-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import wire  # noqa: E402
from agent.wire import Envelope, Sample  # noqa: E402

HOST = "gw01"
PREFIX = "hubwatch"
KEEPALIVE_S = 60
SESSION_EXPIRY_S = 86400
# The agent's defaults (agent/config.py): publish.window, publish.max_unconfirmed, buffer.resend_after.
WINDOW = 20
MAX_UNCONFIRMED = 200
RESEND_AFTER_S = 60.0
RESEND_MAX_S = 1800.0
UPS_POLL_S = 2.0
BATCH_MAX_SAMPLES = 1000  # buffer.batch_max_samples
#: measurements a hub sends, with the field each always carries (the benchmark counts on it)
COUNTED_FIELD = {"ups": "battery_charge_percent", "net": "rx_bytes_total", "system": "uptime_seconds",
                 "ping": "loss_percent", "agent": "outbox_samples"}


def hub_name(index: int) -> str:
    return f"sim-{index:06d}"


@dataclass(frozen=True)
class Scenario:
    """How often things happen to a hub, per hub-hour, and how long they last (seconds).

    The defaults are dense on purpose, so a run of a few minutes sees every case at fleet
    scale: about 8% of hubs on battery at a time, some of them until the battery is empty.
    """

    power_cuts_per_hour: float = 0.6
    cut_seconds: tuple[float, float] = (30.0, 900.0)      # log-uniform between
    runtime_seconds: tuple[float, float] = (300.0, 2400.0)  # full battery at the hub's load
    recharge_seconds: float = 3600.0                        # empty to full on mains
    boot_seconds: tuple[float, float] = (20.0, 90.0)        # mains back -> agent running
    uplink_drops_per_hour: float = 0.6
    uplink_seconds: tuple[float, float] = (20.0, 600.0)
    reboots_per_hour: float = 0.1
    reboot_seconds: tuple[float, float] = (30.0, 120.0)
    #: share of hubs already in a power cut / without uplink when the run starts
    start_on_battery: float = 0.05
    start_uplink_down: float = 0.02


def _log_uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _after(rng: random.Random, per_hour: float) -> float:
    """Seconds until the next event of a Poisson process at ``per_hour``."""
    return rng.expovariate(per_hour / 3600.0) if per_hour > 0 else math.inf


# --- MQTT v5, the few packets an agent needs ------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, will_topic: str, will_payload: bytes) -> bytes:
    # clean start off (persistent session), will flag, will QoS 1, will retain
    flags = 0x04 | 0x08 | 0x20
    props = b"\x11" + SESSION_EXPIRY_S.to_bytes(4, "big")  # Session Expiry Interval
    body = (b"\x00\x04MQTT\x05" + bytes([flags]) + KEEPALIVE_S.to_bytes(2, "big") + _varint(len(props)) + props
            + _string(client_id.encode()) + b"\x00" + _string(will_topic.encode()) + _string(will_payload))
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, pid: int, payload: bytes, retain: bool = False, dup: bool = False) -> bytes:
    """QoS 1 PUBLISH; ``topic`` already length-prefixed (see ``_string``)."""
    head = 0x32 | (0x01 if retain else 0) | (0x08 if dup else 0)
    return (bytes([head]) + _varint(len(topic) + 3 + len(payload)) + topic + pid.to_bytes(2, "big") + b"\x00"
            + payload)


def subscribe_packet(pid: int, topic_filter: str) -> bytes:
    body = pid.to_bytes(2, "big") + b"\x00" + _string(topic_filter.encode()) + b"\x01"
    return b"\x82" + _varint(len(body)) + body


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"  # normal disconnection: no Last Will


class Link(asyncio.Protocol):
    """One hub's MQTT connection; hands what it reads to its Hub."""

    __slots__ = ("hub", "transport", "buf", "ready", "next_pid", "last_out")

    def __init__(self, hub: "Hub"):
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ready = False
        self.next_pid = 0
        self.last_out = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        hub = self.hub
        transport.write(connect_packet(hub.client_id, hub.topics["status"], b"offline"))

    def pid(self) -> int:
        self.next_pid = self.next_pid % 65535 + 1
        return self.next_pid

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self.last_out = time.monotonic()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            n = len(buf)
            if n < 2:
                return
            length, shift, i = 0, 0, 1
            while True:
                if i >= n:
                    return
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            end = i + length
            if end > n:
                return
            kind, flags = buf[0] >> 4, buf[0] & 0x0F
            body = bytes(buf[i:end])
            del buf[:end]
            if kind == 4:  # PUBACK
                self.hub.on_puback(self, int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0)
            elif kind == 3:  # PUBLISH (an ack from the collector)
                qos = (flags >> 1) & 3
                tlen = int.from_bytes(body[:2], "big")
                pos = 2 + tlen
                if qos:
                    self.transport.write(b"\x40\x02" + body[pos:pos + 2])
                    pos += 2
                plen, shift = 0, 0
                while True:
                    byte = body[pos]
                    pos += 1
                    plen |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                self.hub.on_ack(body[pos + plen:])
            elif kind == 2:  # CONNACK
                if body[1] >= 0x80:
                    self.hub.sim.stats["connack_refused"] += 1
                    self.transport.abort()
                    return
                self.ready = True
                self.hub.on_connected(self)
            elif kind == 14:  # DISCONNECT from the broker (e.g. session taken over)
                self.hub.sim.stats["broker_disconnects"] += 1
                self.transport.close()
                return

    def connection_lost(self, exc) -> None:
        self.ready = False
        self.hub.on_link_lost(self)


class Message:
    __slots__ = ("payload", "counts", "attempts", "kind")

    def __init__(self, payload: bytes, counts: dict[str, int], kind: str):
        self.payload = payload
        self.counts = counts
        self.attempts = 0
        self.kind = kind


class Hub:
    """One hub's gateway agent: the machine, its UPS and uplink, its outbox and sender."""

    def __init__(self, sim: "Simulator", index: int, now: float):
        self.sim = sim
        rng = self.rng = random.Random(sim.seed * 1_000_003 + index)
        sc = sim.scenario
        self.hub = hub_name(index)
        self.client_id = f"hubwatch-{self.hub}-{HOST}"
        self.topics = {kind: wire.topic(PREFIX, self.hub, HOST, kind) for kind in wire.KINDS}
        self.topic_bytes = {kind: _string(t.encode()) for kind, t in self.topics.items()}
        self.tags = {"hub": self.hub, "host": HOST}
        self.local_addr = sim.local_addr(index)
        # the machine
        self.state = "up"  # up | dark (no power) | booting | rebooting
        self.boot_at = 0.0
        self.boot_wall = time.time() - rng.uniform(600, 30 * 86400)
        self.cpu = rng.uniform(5, 40)
        self.mem = rng.uniform(30, 80)
        self.disk = rng.uniform(20, 85)
        # the UPS
        self.mains = True
        self.cut_end = 0.0
        self.next_cut = now + _after(rng, sc.power_cuts_per_hour)
        self.full_runtime = _log_uniform(rng, sc.runtime_seconds)
        self.charge = 100.0
        self.load = rng.uniform(15, 60)
        self.input_v = rng.uniform(205, 240)
        self.temp = rng.uniform(24, 38)
        self.flags: tuple | None = None
        if rng.random() < sc.start_on_battery:
            self.mains = False
            self.cut_end = now + _log_uniform(rng, sc.cut_seconds)
            self.charge = rng.uniform(30, 100)
        # the links
        self.ifaces = [("eth0", 100.0 if rng.random() < 0.5 else 1000.0)]
        if rng.random() < 0.4:
            self.ifaces.append(("wlan0", None))
        self.counters = {name: [rng.randrange(10**9, 10**11), rng.randrange(10**8, 10**10),
                                rng.randrange(10**6, 10**8), rng.randrange(10**6, 10**8)]
                         for name, _ in self.ifaces}
        self.rate = rng.uniform(50_000, 2_000_000)  # bytes/s through the uplink
        self.rtt = rng.choice((rng.uniform(25, 120), rng.uniform(550, 700)))  # fibre/DSL or VSAT
        self.uplink = True
        self.uplink_back = 0.0
        self.next_drop = now + _after(rng, sc.uplink_drops_per_hour)
        if rng.random() < sc.start_uplink_down:
            self.uplink = False
            self.uplink_back = now + _log_uniform(rng, sc.uplink_seconds)
        self.next_reboot = now + _after(rng, sc.reboots_per_hour)
        # the outbox and the sender
        self.seq = rng.randrange(0, 10**6)  # as if the agent had run a while (seq survives restarts)
        self.outbox: dict[int, Message] = {}
        self.pending: list[Sample] = []  # committed, not yet packed into a message
        self.pending_since = 0.0
        self.batch_phase = 0.0  # how far into a batch the agent already was when the run began
        self.urgent: deque[int] = deque()
        self.queue: deque[int] = deque()
        self.in_flight: dict[int, int] = {}   # packet id -> seq (0: not an outbox message)
        self.awaiting: dict[int, float] = {}  # seq -> when to send again unless acknowledged
        self.counts = Counter({"messages_published_total": rng.randrange(0, 10**5)})
        self.counts["messages_acked_total"] = self.counts["messages_published_total"]
        self.link: Link | None = None
        self.connecting = False
        self.connect_failures = 0
        self.next_connect = 0.0
        self.last_poll = now
        self.last_cycle_wall = time.time()

    # --- connection ---------------------------------------------------------------------------
    def wants_link(self) -> bool:
        return self.state == "up" and (self.uplink or self.sim.draining)

    def connect(self) -> None:
        if self.link is not None or self.connecting or not self.wants_link():
            return
        self.connecting = True
        self.sim.spawn(self._connect())

    async def _connect(self) -> None:
        sim = self.sim
        # ``connecting`` stays set until the CONNACK (on_connected) or the loss of the
        # connection (on_link_lost): a second CONNECT with the same client id would take over.
        try:
            async with sim.connect_slots:
                await sim.loop.create_connection(lambda: Link(self), sim.host, sim.port, local_addr=self.local_addr)
        except OSError as exc:
            self.connecting = False
            sim.stats["connect_errors"] += 1
            if sim.stats["connect_errors"] <= 3:
                print(f"fleetsim: {self.hub}: connect failed: {exc}", file=sys.stderr)
            self.connect_failures += 1
            self.next_connect = time.monotonic() + min(30.0, 2 ** self.connect_failures) * self.rng.uniform(0.5, 1)

    def on_connected(self, link: Link) -> None:
        self.link = link
        self.connecting = False
        self.connect_failures = 0
        self.sim.stats["connects"] += 1
        link.write(subscribe_packet(link.pid(), self.topics["ack"]))
        pid = link.pid()
        self.in_flight[pid] = 0
        link.write(publish_packet(self.topic_bytes["status"], pid, b"online", retain=True))
        self.pack(time.monotonic())
        self.pump()

    def on_link_lost(self, link: Link) -> None:
        if self.link is not link:  # lost before its CONNACK
            self.connecting = False
            self.next_connect = time.monotonic() + self.rng.uniform(1.0, 3.0)
            return
        self.link = None
        # not PUBACKed: send again on the next connection, in order, ahead of the rest
        seqs = sorted(s for s in self.in_flight.values() if s)
        self.in_flight.clear()
        for seq in reversed(seqs):
            if seq in self.outbox:
                (self.urgent if self.outbox[seq].kind == "events" else self.queue).appendleft(seq)
        if self.wants_link():
            self.next_connect = time.monotonic() + self.rng.uniform(1.0, 2.0)

    def drop_link(self, clean: bool) -> None:
        """Lose the connection: without a word (Last Will) or with a clean stop."""
        link = self.link
        if link is None:
            return
        if clean:
            pid = link.pid()
            link.write(publish_packet(self.topic_bytes["status"], pid, b"stopped", retain=True))
            link.write(DISCONNECT)
            link.transport.close()
        else:
            link.transport.abort()

    # --- sending --------------------------------------------------------------------------------
    def commit(self, samples: list[Sample], now: float) -> None:
        """Samples into the outbox, waiting to be packed."""
        if not self.pending:
            self.pending_since, self.batch_phase = now - self.batch_phase, 0.0
        self.pending.extend(samples)
        self.sim.generated.update(s.measurement for s in samples)

    def pack(self, now: float, force: bool = False) -> bool:
        """While the link is up, pack what waits into messages once the oldest sample is
        ``batch_max_age`` old (or with ``force``); True when a message went out at once."""
        if not self.pending or self.link is None or not self.link.ready:
            return False
        if not force and now - self.pending_since < self.sim.batch_max_age:
            return False
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), BATCH_MAX_SAMPLES):
            self.add("metrics", pending[i:i + BATCH_MAX_SAMPLES], count=False)
        return not self.queue

    def add(self, kind: str, samples: list[Sample], count: bool = True) -> None:
        """Samples as one message (the next seq), sent if the window allows."""
        self.seq += 1
        seq = self.seq
        payload = wire.encode(Envelope(self.hub, HOST, seq, round(time.time(), 3), tuple(samples)))
        counts = Counter(s.measurement for s in samples)
        if count:
            self.sim.generated.update(counts)
        self.sim.stats["bytes_packed"] += len(payload)
        self.outbox[seq] = Message(payload, counts, kind)
        (self.urgent if kind == "events" else self.queue).append(seq)
        self.pump()

    def pump(self) -> None:
        link = self.link
        if link is None or not link.ready:
            return
        outbox, stats = self.outbox, self.sim.stats
        while self.urgent:  # power events first, even past the window
            seq = self.urgent.popleft()
            if seq in outbox:
                self._send(link, seq, outbox[seq])
        queue, in_flight, awaiting = self.queue, self.in_flight, self.awaiting
        while queue and len(in_flight) < WINDOW and len(awaiting) < MAX_UNCONFIRMED:
            seq = queue.popleft()
            message = outbox.get(seq)
            if message is not None:
                self._send(link, seq, message)
        stats["max_backlog"] = max(stats["max_backlog"], len(queue))

    def _send(self, link: Link, seq: int, message: Message) -> None:
        pid = link.pid()
        self.in_flight[pid] = seq
        link.write(publish_packet(self.topic_bytes[message.kind], pid, message.payload, dup=message.attempts > 0))
        if message.attempts:
            self.sim.stats["resent"] += 1
            self.counts["messages_resent_total"] += 1
        message.attempts += 1
        self.sim.stats["published"] += 1

    def on_puback(self, link: Link, pid: int, reason: int) -> None:
        seq = self.in_flight.pop(pid, None)
        if not seq:
            return
        message = self.outbox.get(seq)
        if message is None:
            return
        if reason >= 0x80:  # refused: the row stays, sent again later
            self.sim.stats["publish_rejected"] += 1
            self.counts["publish_rejected_total"] += 1
            self.queue.appendleft(seq)
            return
        self.counts["messages_published_total"] += 1
        wait = min(RESEND_MAX_S, RESEND_AFTER_S * 2 ** (message.attempts - 1))
        self.awaiting[seq] = time.monotonic() + wait
        self.pump()

    def on_ack(self, payload: bytes) -> None:
        try:
            ranges = wire.decode_ack(payload)
        except wire.WireError:
            self.sim.stats["bad_acks"] += 1
            return
        sim, outbox, awaiting = self.sim, self.outbox, self.awaiting
        sim.stats["acks"] += 1
        for first, last in ranges:
            seqs = range(first, last + 1) if last - first < 2 * len(outbox) else [s for s in outbox if first <= s <= last]
            for seq in seqs:
                message = outbox.pop(seq, None)
                if message is not None:
                    sim.acked.update(message.counts)
                    self.counts["messages_acked_total"] += 1
                    awaiting.pop(seq, None)
        self.pump()

    def resend_due(self, now: float) -> None:
        due = [seq for seq, when in self.awaiting.items() if when <= now]
        for seq in sorted(due, reverse=True):
            del self.awaiting[seq]
            if seq in self.outbox:
                self.queue.appendleft(seq)

    # --- the machine ------------------------------------------------------------------------------
    def poll(self, now: float) -> None:
        """Every ups_poll: move the world on, read the UPS, send a power event if there is one."""
        sc, rng, sim = self.sim.scenario, self.rng, self.sim
        dt, self.last_poll = now - self.last_poll, now
        generating = sim.generating
        # mains
        if self.mains and now >= self.next_cut and generating:
            self.mains = False
            self.cut_end = now + _log_uniform(rng, sc.cut_seconds)
            sim.stats["power_cuts"] += 1
            if self.state == "up":  # the benchmark times the on_battery alert from here
                emit({"cut": [self.hub, time.time_ns(), round(self.cut_end - now, 1)]})
        elif not self.mains and (now >= self.cut_end or not generating):
            self.mains = True
            self.next_cut = now + _after(rng, sc.power_cuts_per_hour)
        if self.state != "dark":
            if self.mains:
                self.charge = min(100.0, self.charge + dt / sc.recharge_seconds * 100.0)
            else:
                self.charge = max(0.0, self.charge - dt / self.full_runtime * 100.0)
        # the PC
        if self.state == "up":
            if not self.mains and self.charge <= 0.0:
                self.state = "dark"  # battery exhausted: the PC dies mid-sentence
                sim.stats["batteries_exhausted"] += 1
                self.flags = None
                self.drop_link(clean=False)
                return
            if generating and now >= self.next_reboot:
                self.state, self.boot_at = "rebooting", now + _log_uniform(rng, sc.reboot_seconds)
                self.next_reboot = now + _after(rng, sc.reboots_per_hour)
                sim.stats["reboots"] += 1
                self.flags = None
                self.drop_link(clean=True)
                return
        elif self.state == "dark":
            if self.mains:
                self.state, self.boot_at = "booting", now + _log_uniform(rng, sc.boot_seconds)
            return
        elif now >= self.boot_at or not generating:
            self.state = "up"
            self.boot_wall = time.time()
            self.cpu = rng.uniform(20, 60)
        else:
            return
        # the uplink
        if self.uplink and now >= self.next_drop and generating:
            self.uplink = False
            self.uplink_back = now + _log_uniform(rng, sc.uplink_seconds)
            sim.stats["uplink_drops"] += 1
            self.drop_link(clean=False)
        elif not self.uplink and (now >= self.uplink_back or not generating):
            self.uplink = True
            self.next_drop = now + _after(rng, sc.uplink_drops_per_hour)
        if self.link is None and not self.connecting and now >= self.next_connect:
            self.connect()
        if not generating:
            return
        on_battery = not self.mains
        flags = (not on_battery, on_battery, on_battery and self.charge <= 20.0, False)
        changed, self.flags = self.flags is not None and flags != self.flags, flags
        if changed or on_battery:
            self.add("events", [self.ups_sample()])

    def ups_sample(self) -> Sample:
        rng = self.rng
        on_battery = not self.mains
        low = on_battery and self.charge <= 20.0
        status = ("OB DISCHRG" + (" LB" if low else "")) if on_battery else ("OL CHRG" if self.charge < 99.5 else "OL")
        fields = {
            "battery_charge_percent": round(self.charge, 1),
            "battery_charge_low_percent": 20.0,
            "battery_runtime_seconds": round(self.full_runtime * self.charge / 100.0, 0),
            "battery_voltage_volts": round((12.0 + self.charge / 100.0) if on_battery else 13.6, 2),
            "input_voltage_volts": 0.0 if on_battery else round(self.input_v + rng.uniform(-4, 4), 1),
            "input_frequency_hz": 0.0 if on_battery else 50.0,
            "output_voltage_volts": 230.0 if on_battery else round(self.input_v, 1),
            "load_percent": round(self.load + rng.uniform(-2, 2), 1),
            "temperature_celsius": round(self.temp, 1),
            "status": status,
            "on_line": not on_battery, "on_battery": on_battery, "low_battery": low,
            "charging": status == "OL CHRG", "discharging": on_battery,
            "replace_battery": False, "overload": False,
        }
        return Sample("ups", time.time_ns(), {"ups": "hubups", "source": "nut", **self.tags}, fields)

    def cycle(self, now: float) -> None:
        """Every interval: run the probes, commit one metrics message, send what the window allows."""
        sim = self.sim
        self.resend_due(now)
        if self.state != "up" or not sim.generating:
            self.pump()
            return
        # On battery the UPS sample went out on events at every poll instead.
        samples = self.cycle_samples(with_ups=True)
        self.commit(samples, now)
        if self.pack(now):  # went out live, not queued
            sim.maybe_canary(self.hub, samples[0].time_ns, time.time_ns())
        elif self.link is not None and now - self.link.last_out > KEEPALIVE_S / 2:
            self.link.write(PINGREQ)

    def cycle_samples(self, with_ups: bool = True) -> list[Sample]:
        """One cycle of the default probes, plus the agent's own point (its outbox and counters);
        ``with_ups`` adds the UPS reading (on mains)."""
        sim, rng = self.sim, self.rng
        t = time.time_ns()
        wall = t / 1e9
        elapsed, self.last_cycle_wall = wall - self.last_cycle_wall, wall
        uptime = max(0.0, wall - self.boot_wall)
        self.cpu = min(100.0, max(1.0, self.cpu + rng.uniform(-5, 5)))
        samples = [Sample("system", t, self.tags, {
            "uptime_seconds": round(uptime, 2), "boot_time_seconds": float(round(self.boot_wall)),
            "cpu_percent": round(self.cpu, 1), "memory_used_percent": round(self.mem + rng.uniform(-1, 1), 2),
            "load1": round(self.cpu / 25 + rng.uniform(0, 0.3), 2), "disk_used_percent": round(self.disk, 2),
            "clock_synced": uptime > 30,
        })]
        moved = int(self.rate * max(0.0, elapsed) * (1.0 if self.uplink else 0.01))
        for name, speed in self.ifaces:
            c = self.counters[name]
            share = moved if name == "eth0" else moved // 4
            c[0] += share
            c[1] += share // 8
            c[2] += share // 1200
            c[3] += share // 4000
            fields = {"rx_bytes_total": c[0], "tx_bytes_total": c[1], "rx_packets_total": c[2],
                      "tx_packets_total": c[3], "rx_errors_total": 0, "tx_errors_total": 0,
                      "rx_drops_total": c[2] // 100_000, "tx_drops_total": 0, "link_up": True}
            if speed is not None:
                fields["speed_mbps"] = speed
            samples.append(Sample("net", t, {"iface": name, **self.tags}, fields))
        gw = rng.uniform(0.3, 2.5)
        samples.append(Sample("ping", t, {"target": "gateway", "address": "192.168.1.1", **self.tags}, {
            "rtt_avg_ms": round(gw, 3), "rtt_min_ms": round(gw * 0.7, 3), "rtt_max_ms": round(gw * 1.6, 3),
            "loss_percent": 0.0, "reachable": True, "method": "icmp"}))
        if self.uplink:
            rtt = self.rtt * rng.uniform(0.9, 1.4)
            loss = rng.choice((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 33.3))
            samples.append(Sample("ping", t, {"target": "internet", "address": "1.1.1.1", **self.tags}, {
                "rtt_avg_ms": round(rtt, 3), "rtt_min_ms": round(rtt * 0.85, 3), "rtt_max_ms": round(rtt * 1.3, 3),
                "loss_percent": loss, "reachable": True, "method": "icmp"}))
        else:
            samples.append(Sample("ping", t, {"target": "internet", "address": "1.1.1.1", **self.tags}, {
                "loss_percent": 100.0, "reachable": False, "method": "icmp"}))
        if with_ups and self.mains and self.flags is not None:
            samples.append(self.ups_sample())
        pending = sum(sum(m.counts.values()) for m in self.outbox.values()) + len(self.pending)
        agent = {"outbox_samples": float(pending), "outbox_messages": float(len(self.outbox)),
                 "outbox_bytes": float(135_168 + sum(len(m.payload) for m in self.outbox.values())),
                 "mqtt_connected": self.link is not None and self.link.ready, "clock_trusted": True}
        if pending:
            agent["outbox_oldest_age_seconds"] = round(float(len(self.outbox)) * sim.interval, 3)
        for name in ("dropped_samples_total", "lost_samples_total", "time_unknown_samples_total",
                     "probe_errors_total", "messages_published_total", "publish_errors_total",
                     "publish_rejected_total", "messages_resent_total", "messages_acked_total"):
            agent[name] = self.counts[name]
        samples.append(Sample("agent", t, self.tags, agent))
        return samples


class Simulator:
    def __init__(self, args: argparse.Namespace, scenario: Scenario):
        self.args = args
        self.scenario = scenario
        self.seed = args.seed
        self.interval = args.interval
        self.batch_max_age = args.batch_max_age
        self.host, self.port = args.broker.rsplit(":", 1)[0], int(args.broker.rsplit(":", 1)[1])
        self.generating = False
        self.draining = False
        self.generated: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.canary_every = max(1, args.canary_every)
        self._canary_n = 0
        self._tasks: set[asyncio.Task] = set()
        self.slips: list[float] = []
        self.loop: asyncio.AbstractEventLoop
        self.connect_slots: asyncio.Semaphore
        self.hubs: list[Hub] = []

    def local_addr(self, index: int) -> tuple[str, int] | None:
        """Spread connections over loopback source addresses: one address has ~28,000 ports."""
        if not self.args.spread_source:
            return None
        block = index // 20_000
        return (f"127.1.{block // 250}.{1 + block % 250}", 0)

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def maybe_canary(self, hub: str, t: int, sent_ns: int) -> None:
        self._canary_n += 1
        if self._canary_n % self.canary_every == 0:
            emit({"canary": [hub, t, sent_ns]})

    def outbox_messages(self) -> int:
        """Messages still held, a hub's unpacked samples counting as one."""
        return sum(len(h.outbox) + (1 if h.pending else 0) for h in self.hubs)

    def snapshot(self, started: float) -> dict:
        states = Counter(h.state for h in self.hubs)
        slips = sorted(self.slips)
        self.slips = []
        return {
            "elapsed": round(time.monotonic() - started, 1), "cpu_seconds": round(time.process_time(), 2),
            "connected": sum(1 for h in self.hubs if h.link is not None and h.link.ready),
            "on_battery": sum(1 for h in self.hubs if not h.mains), "uplink_down": sum(1 for h in self.hubs if not h.uplink),
            "states": dict(states), "outbox_messages": self.outbox_messages(),
            "slip_p99": round(slips[int(len(slips) * 0.99)] if slips else 0.0, 3),
            "slip_max": round(slips[-1] if slips else 0.0, 3),
            "generated_total": sum(self.generated.values()), "acked_total": sum(self.acked.values()),
            **{k: v for k, v in self.stats.items()},
        }

    async def run(self) -> None:
        args = self.args
        self.loop = asyncio.get_running_loop()
        self.connect_slots = asyncio.Semaphore(args.connect_concurrency)
        now = time.monotonic()
        self.hubs = [Hub(self, i, now) for i in range(args.first, args.first + args.hubs)]
        for hub in self.hubs:
            hub.connect()
        # connect every hub that should be up before the clock starts
        deadline = time.monotonic() + max(60.0, args.hubs / 200)
        while time.monotonic() < deadline:
            expected = sum(1 for h in self.hubs if h.wants_link())
            if sum(1 for h in self.hubs if h.link is not None and h.link.ready) >= expected:
                break
            await asyncio.sleep(0.2)
            for hub in self.hubs:
                if hub.link is None and not hub.connecting and time.monotonic() >= hub.next_connect:
                    hub.connect()
        emit({"ready": {"hubs": len(self.hubs), "connected": sum(1 for h in self.hubs if h.link is not None),
                        "seconds": round(time.monotonic() - now, 1)}})
        if args.wait_for_go:
            await self.loop.run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()
        self.generating = True
        interval = self.interval
        # Each hub has its own phase within the interval (real agents start at random times).
        rng = random.Random(self.seed)
        order = sorted(self.hubs, key=lambda h: rng.random())
        for i, hub in enumerate(order):
            hub.next_cycle = started + interval * i / len(order)
            hub.next_poll = started + (UPS_POLL_S * i / len(order))
            hub.last_poll = hub.next_poll
            # agents that have been running a while are spread over their batch, too
            hub.batch_phase = self.batch_max_age * rng.random()
        cycles, polls = deque(order), deque(sorted(order, key=lambda h: h.next_poll))
        stop_at = started + args.duration
        next_stats = started + args.stats_every
        cpu0 = time.process_time()
        tick = 0.02
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            while polls and polls[0].next_poll <= now:
                hub = polls.popleft()
                hub.poll(now)
                hub.next_poll += UPS_POLL_S
                polls.append(hub)
            while cycles and cycles[0].next_cycle <= now:
                hub = cycles.popleft()
                self.slips.append(now - hub.next_cycle)
                hub.cycle(now)
                hub.next_cycle += interval
                cycles.append(hub)
            if now >= next_stats:
                emit({"stats": self.snapshot(started)})
                next_stats += args.stats_every
            await asyncio.sleep(max(0.0, min(tick, cycles[0].next_cycle - time.monotonic(),
                                             polls[0].next_poll - time.monotonic())))
        gen_cpu = time.process_time() - cpu0
        # No more samples: power and links come back everywhere, and the outboxes drain.
        self.generating = False
        self.draining = True
        drain_started = time.monotonic()
        emit({"stats": self.snapshot(started)})
        while time.monotonic() - drain_started < args.drain_timeout:
            now = time.monotonic()
            for hub in self.hubs:
                if hub.link is not None and not hub.outbox and not hub.pending:
                    continue
                hub.pack(now, force=True)
                if now >= hub.next_poll:
                    hub.poll(now)
                    hub.next_poll = now + UPS_POLL_S
                hub.resend_due(now)
                hub.pump()
            if self.outbox_messages() == 0:
                break
            await asyncio.sleep(0.5)
        drain_seconds = time.monotonic() - drain_started
        emit({"final": {
            **self.snapshot(started),
            "hubs": len(self.hubs), "generate_seconds": round(args.duration, 1),
            "generate_cpu_seconds": round(gen_cpu, 2), "drain_seconds": round(drain_seconds, 1),
            "generated": dict(self.generated), "acked": dict(self.acked),
            "outbox_samples": sum(sum(m.counts.values()) for h in self.hubs for m in h.outbox.values())
            + sum(len(h.pending) for h in self.hubs),
        }})
        for hub in self.hubs:
            if hub.link is not None:
                hub.link.write(DISCONNECT)
                hub.link.transport.close()
        await asyncio.sleep(0.5)


def fleet_samples(hubs: int, cycles: int, seed: int = 1) -> list[Sample]:
    """``cycles`` cycles of ``hubs`` hubs' metrics samples, made without a network (the
    benchmark writes them straight to InfluxDB to compare)."""
    sim = Simulator(parse_args(["--hubs", str(hubs), "--seed", str(seed)]), Scenario(start_on_battery=0,
                                                                                     start_uplink_down=0))
    sim.generating = True
    now = time.monotonic()
    fleet = [Hub(sim, i, now) for i in range(hubs)]
    out: list[Sample] = []
    for _ in range(cycles):
        for hub in fleet:
            hub.flags = (True, False, False, False)
            out.extend(hub.cycle_samples())
    return out


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker")
    parser.add_argument("--hubs", type=int, default=14)
    parser.add_argument("--first", type=int, default=0, help="index of the first hub (several simulators)")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--batch-max-age", type=float, default=60.0,
                        help="seconds the oldest sample waits before its cycles leave together (0: every cycle)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of sampling")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--canary-every", type=int, default=100, help="report every Nth live message's time")
    parser.add_argument("--stats-every", type=float, default=5.0)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--spread-source", action="store_true",
                        help="bind connections to several 127.x.y.z addresses (beyond ~28,000 connections)")
    parser.add_argument("--wait-for-go", action="store_true", help="start sampling after a line on stdin")
    parser.add_argument("--calm", action="store_true", help="no power cuts, uplink drops or reboots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(args.hubs + 1024)
    scenario = Scenario() if not args.calm else Scenario(
        power_cuts_per_hour=0, uplink_drops_per_hour=0, reboots_per_hour=0, start_on_battery=0, start_uplink_down=0)
    asyncio.run(Simulator(args, scenario).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
