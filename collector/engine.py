"""The leaders' work: outages and alerts, each hub on exactly one collector instance at a time.

Membership: every instance keeps a retained message on ``{prefix}/collectors/members/{instance}``
and clears it on a clean stop; its Last Will clears it when it dies. Every instance sees the
same member set, and the hubs are shared out over it by a hash of the hub's name: hub ``h``
belongs to the ``crc32(h) mod N``-th of the N instance names in sorted order — deterministic,
no vote, and the engine's work scales with the instances as ingest does. After the set
changes an instance waits ``settle`` seconds before acting, so two instances never act on
one hub at once while the news spreads, and the retained alert states (below) have arrived.

Pokes: the instance that stored a message worth reacting to (a UPS event, a status change,
late replayed samples, an unreachable internet target, a new boot time) publishes the hub on
``{prefix}/collectors/poke``; the hub's leader evaluates its alerts at once and recomputes
its outages (at most every ``recompute_interval``; a pass spends at most
``Engine.RECOMPUTE_BUDGET_S`` on outages before it looks at new pokes again, so a burst of
replays never holds an alert back).

Alert state survives restarts as retained messages under ``alerts.topic``
(``{topic}/{hub}/{rule}/{host}[/{ups}]``): the active alerts, readable by anyone (the MQTT
notifier). A state is stored before its notification is sent.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass

from collector.alerts import RULES, AlertState, Finding, Transitions, UpsReading, evaluate_offline, evaluate_ups, step
from collector.config import CollectorConfig
from collector.influx import make_writer
from collector.influxql import InfluxQL, QueryError, quote_string, series_rows
from collector.lineproto import format_line
from collector.notify import EmailNotifier, WebhookNotifier
from collector.outages import NS, OutageEngine

log = logging.getLogger(__name__)


class Cluster:
    """Who the collector instances are, and which one leads."""

    def __init__(self, instance: str, prefix: str, settle_s: float = 3.0):
        self.instance = instance
        self.members_topic = f"{prefix}/collectors/members"
        self.poke_topic = f"{prefix}/collectors/poke"
        self.my_topic = f"{self.members_topic}/{instance}"
        self.settle_s = settle_s
        self._members: set[str] = set()
        self._changed = time.monotonic()
        self._lock = threading.Lock()

    def on_member(self, topic: str, payload: bytes) -> None:
        name = topic.rsplit("/", 1)[-1]
        with self._lock:
            before = set(self._members)
            if payload:
                self._members.add(name)
            else:
                self._members.discard(name)
            if self._members != before:
                self._changed = time.monotonic()
                log.info("collector instances: %s (leader: %s)", ", ".join(sorted(self._members)) or "none",
                         min(self._members) if self._members else "none")

    def share(self) -> tuple[int, int] | None:
        """(this instance's index, number of instances) once the member set has settled;
        None while it is changing or this instance is not in it yet."""
        with self._lock:
            if self.instance not in self._members or time.monotonic() - self._changed < self.settle_s:
                return None
            members = sorted(self._members)
            return members.index(self.instance), len(members)

    @staticmethod
    def owner_index(hub: str, count: int) -> int:
        return zlib.crc32(hub.encode()) % count

    def owns(self, hub: str, share: tuple[int, int] | None = None) -> bool:
        """Whether this instance leads ``hub``; ``share``: one already read from :meth:`share`
        (a loop over many hubs reads it once)."""
        share = share or self.share()
        return share is not None and self.owner_index(hub, share[1]) == share[0]


@dataclass
class Poke:
    hub: str
    since_ns: int | None
    urgent: bool
    #: only an agent saying ``online``: it matters when the hub was dark or has an alert
    #: (every reconnect of every hub says it; most need no work)
    online_only: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps({"hub": self.hub, "since_ns": self.since_ns, "urgent": self.urgent,
                           "online_only": self.online_only}).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Poke":
        obj = json.loads(payload)
        since = obj.get("since_ns")
        return cls(str(obj["hub"]), int(since) if since is not None else None, bool(obj.get("urgent")),
                   bool(obj.get("online_only")))


class Engine:
    WATCH_S = 15 * 60          # a poked hub stays under evaluation this long
    SILENCE_SWEEP_S = 15.0
    RECOMPUTE_BUDGET_S = 0.5   # outage work per pass of the loop before pokes are looked at again

    def __init__(self, config: CollectorConfig, client, cluster: Cluster):
        self.config = config
        self._client = client
        self.cluster = cluster
        self._q = InfluxQL(config.influxdb)
        self._writer = make_writer(config.influxdb)
        self.outages = OutageEngine(config.outages.params, self._q, self._write, window_s=config.outages.window)
        self.active: dict[str, AlertState] = {}
        self._pokes: queue.Queue[Poke] = queue.Queue()
        self._watch: dict[str, float] = {}
        self._dirty: dict[str, int | None] = {}     # hub -> earliest since (None: the window)
        self._last_recompute: dict[str, float] = {}
        self._ongoing: set[str] = set()
        self._last_refresh = 0.0
        self._last_sweep = 0.0
        self._was_share: tuple[int, int] | None = None
        self._seeded = False  # ongoing outages read back from InfluxDB after a start
        self.notifiers = ([WebhookNotifier(w) for w in config.alerts.webhooks]
                          + [EmailNotifier(e) for e in config.alerts.emails])

    # --- inputs (called from paho's thread: only queue and store) ------------------------------
    def poke(self, poke: Poke) -> None:
        self._pokes.put(poke)

    def on_alert_state(self, topic: str, payload: bytes) -> None:
        """A retained alert state (restored at start, or written by a previous leader)."""
        key = topic[len(self.config.alerts.topic) + 1:]
        if not payload:
            self.active.pop(key, None)
            return
        try:
            state = AlertState.from_json(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable alert state on %s", topic)
            return
        if self.cluster.owns(state.hub):
            self.active.setdefault(state.key, state)  # ours: what this instance holds is newer
        else:
            self.active[state.key] = state  # its leader's latest, should the hub become ours

    # --- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        interval = self.config.alerts.interval
        next_eval = time.monotonic() + interval
        while not stop.is_set():
            try:
                first = self._pokes.get(timeout=max(0.05, min(1.0, next_eval - time.monotonic())))
            except queue.Empty:
                first = None
            pokes = [first] if first else []
            while True:
                try:
                    pokes.append(self._pokes.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            if pokes and any(p.online_only for p in pokes):
                alerted = {s.hub for s in self.active.values()}
                pokes = [p for p in pokes if not p.online_only or p.hub in self._ongoing
                         or p.hub in self._dirty or p.hub in alerted]
            for p in pokes:
                self._watch[p.hub] = now
                if p.hub not in self._dirty or (p.since_ns is not None and (
                        self._dirty[p.hub] is None or p.since_ns < self._dirty[p.hub])):
                    self._dirty[p.hub] = p.since_ns
            share = self.cluster.share()
            if share != self._was_share:
                if share is None:
                    log.info("this instance is no longer the leader (outages and alerts)")
                else:
                    log.info("this instance is now the leader (outages and alerts) of the hubs in share %d of %d",
                             share[0] + 1, share[1])
                self._was_share = share
                self._seeded = False  # hubs may have come to this instance: read their open outages
            if share is None:
                continue
            if not self._seeded:
                self._seeded = self._seed_ongoing()
            try:
                urgent = {p.hub for p in pokes if p.urgent}
                due = now >= next_eval
                if due:
                    next_eval = now + interval
                    self._watch = {h: t for h, t in self._watch.items() if now - t < self.WATCH_S}
                    hubs = set(self._watch) | {s.hub for s in self.active.values()}
                else:
                    hubs = urgent
                hubs = {h for h in hubs if self.cluster.owns(h, share)}
                if self.config.alerts.enabled and hubs:
                    self.evaluate(sorted(hubs))
                if now - self._last_sweep >= self.SILENCE_SWEEP_S:
                    self._last_sweep = now
                    self.sweep_silence()
                if self.config.outages.enabled:
                    self._recompute_outages(now)
            except QueryError as exc:
                log.warning("outage/alert evaluation deferred: %s", exc)
            except Exception:
                log.exception("outage/alert evaluation failed")

    def _seed_ongoing(self) -> bool:
        """The hubs with an outage still open in InfluxDB (from before this start): their
        agents' ``online`` must end it."""
        since = time.time_ns() - int(self.config.outages.window * NS)
        try:
            result = self._q.query(f'SELECT "duration_seconds" FROM "outage" WHERE "ongoing" = true '
                                   f'AND time > {since} GROUP BY "hub"')[0]
        except QueryError as exc:
            log.warning("cannot read the ongoing outages yet: %s", exc)
            return False
        self._ongoing.update(tags["hub"] for tags, rows in series_rows(result) if rows and tags.get("hub"))
        return True

    def _recompute_outages(self, now: float) -> None:
        cfg = self.config.outages
        share = self.cluster.share()
        if now - self._last_refresh >= cfg.refresh:
            self._last_refresh = now
            for hub in self._ongoing:
                self._dirty.setdefault(hub, None)
        budget_end = time.monotonic() + self.RECOMPUTE_BUDGET_S
        for hub in list(self._dirty):
            if time.monotonic() >= budget_end:
                break  # the rest on the next pass, after any new pokes
            if not self.cluster.owns(hub, share):
                continue  # another instance's (kept: it may become ours if an instance leaves)
            if now - self._last_recompute.get(hub, 0.0) < cfg.recompute_interval:
                continue
            since = self._dirty.pop(hub)
            self._last_recompute[hub] = now
            outages = self.outages.recompute(hub, since)
            if any(o.ongoing for o in outages):
                self._ongoing.add(hub)
            else:
                self._ongoing.discard(hub)

    # --- alerts -----------------------------------------------------------------------------
    def _write(self, lines: list[str]) -> None:
        outcome = self._writer.write(lines)
        for rejected in outcome.rejected:
            log.error("InfluxDB refused a derived point (%s): %s", rejected.reason, rejected.detail)

    def findings(self, hubs: list[str], now_ns: int) -> list[Finding]:
        span = max(r.window_s for r in self.config.alerts.rules.values()) + 600
        hub_filter = " OR ".join(f"hub = {quote_string(h)}" for h in hubs)
        ups_q = (f'SELECT "on_battery", "battery_charge_percent", "battery_runtime_seconds", "low_battery", '
                 f'"replace_battery" FROM "ups" WHERE ({hub_filter}) AND time > {now_ns - int(span * NS)} '
                 f'GROUP BY "hub", "host", "ups"')
        status_q = f'SELECT last("state") AS "state" FROM "status" WHERE ({hub_filter}) GROUP BY "hub", "host"'
        ups_r, status_r = self._q.query(f"{ups_q};{status_q}")
        found: list[Finding] = []
        for tags, rows in series_rows(ups_r):
            hub = tags.get("hub", "")
            readings = [UpsReading(r["time"], bool(r["on_battery"]), r.get("battery_charge_percent"),
                                   r.get("battery_runtime_seconds"), bool(r.get("low_battery")),
                                   bool(r.get("replace_battery"))) for r in rows if r.get("on_battery") is not None]
            found += evaluate_ups(hub, tags.get("host", ""), tags.get("ups", ""), readings,
                                  self.config.alerts.rules_for(hub), now_ns)
        for tags, rows in series_rows(status_r):
            host = tags.get("host", "")
            if rows and self.config.outages.params.is_gateway(host):
                hub = tags.get("hub", "")
                found += evaluate_offline(hub, host, rows[0]["state"], rows[0]["time"],
                                          self.config.alerts.rules_for(hub), now_ns)
        return found

    def evaluate(self, hubs: list[str], now_ns: int | None = None) -> Transitions:
        now_ns = time.time_ns() if now_ns is None else now_ns
        found: list[Finding] = []
        for i in range(0, len(hubs), 50):
            found += self.findings(hubs[i:i + 50], now_ns)
        scope = {(h, r) for h in hubs for r in RULES}
        changes = step(self.active, found, scope, self.config.alerts.rules_for, now_ns)
        self._apply(changes, now_ns)
        return changes

    def _state_topic(self, state: AlertState) -> str:
        return f"{self.config.alerts.topic}/{state.key}"

    def _apply(self, changes: Transitions, now_ns: int) -> None:
        infos = [self._client.publish(self._state_topic(s), s.to_json(), qos=1, retain=True) for s in changes.persist]
        infos += [self._client.publish(self._state_topic(s), b"", qos=1, retain=True) for s in changes.clear]
        for info in infos:  # stored before notified: a restart never sends it again
            try:
                info.wait_for_publish(5.0)
            except (RuntimeError, ValueError):
                log.warning("could not store an alert state on the broker; notifying anyway")
        lines = []
        for n in changes.notify:
            log.info("alert %s %s: %s", n.state + (" (again)" if n.renotify else ""), n.key, n.message)
            tags = {"hub": n.hub, "host": n.host, "rule": n.rule, "severity": n.severity}
            if n.ups:
                tags["ups"] = n.ups
            lines.append(format_line("alert", tags, {"state": n.state, "message": n.message[:1000],
                                                     "value": float(n.value)}, n.time_ns))
            for notifier in self.notifiers:
                notifier.submit(n)
        if lines:
            self._write(lines)

    # --- silence ----------------------------------------------------------------------------
    def sweep_silence(self, now_ns: int | None = None) -> None:
        """Agents that stopped sending without a Last Will (hung, or a half-open link) get an
        ``offline`` status point; agents sending again after that get ``online``."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        params = self.config.outages.params
        limit_ns = int((params.silence_intervals * params.agent_interval_s + params.agent_batch_max_age_s) * NS)
        last_r, status_r = self._q.query(
            f'SELECT last("uptime_seconds") FROM "system" WHERE time > {now_ns - 2 * 3600 * NS} GROUP BY "hub", "host";'
            f'SELECT last("state") AS "state" FROM "status" WHERE time > {now_ns - 30 * 86400 * NS} GROUP BY "hub", "host"')
        states = {(t.get("hub"), t.get("host")): rows[0] for t, rows in series_rows(status_r) if rows}
        share = self.cluster.share()
        lines = []
        for tags, rows in series_rows(last_r):
            if not rows:
                continue
            key = (tags.get("hub", ""), tags.get("host", ""))
            if not self.cluster.owns(key[0], share):
                continue
            last_seen = rows[0]["time"]
            state = states.get(key, {}).get("state")
            if now_ns - last_seen > limit_ns and state in (None, "online"):
                lines.append(format_line("status", {"hub": key[0], "host": key[1]},
                                         {"state": "offline", "online": False, "reason": "silent"},
                                         last_seen + limit_ns))
                self.poke(Poke(key[0], None, True))
            elif now_ns - last_seen <= limit_ns and state == "offline" and states[key]["time"] < last_seen:
                lines.append(format_line("status", {"hub": key[0], "host": key[1]},
                                         {"state": "online", "online": True, "reason": "sending"}, now_ns))
                self.poke(Poke(key[0], None, True))
        if lines:
            self._write(lines)

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()
        self._writer.close()
