"""Alert rules over a hub's recent series, and the state machine that fires each alert once,
re-notifies on an interval and resolves once.

Rules (thresholds per rule, overridable per hub):

- ``on_battery``: a UPS on battery for longer than its debounce.
- ``battery_low``: charge at or below a threshold, or the UPS's own ``LB`` flag.
- ``runtime_low``: predicted minutes to empty below a threshold. The prediction combines the
  drain rate measured over a recent window (a least-squares line through charge against
  time, extrapolated to 0 %) with the UPS's own runtime estimate; the lower one counts and
  the message says which it was.
- ``battery_aging``: the battery drains faster (by a factor) than its own estimate implies,
  or the UPS says ``RB`` (replace battery).
- ``hub_offline``: a gateway agent offline (Last Will or silence) longer than its debounce.

The evaluation is pure (series in, findings out); the engine feeds it from InfluxDB and
persists the state as retained MQTT messages (see collector/engine.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

NS = 1_000_000_000
RULES = ("on_battery", "battery_low", "runtime_low", "battery_aging", "hub_offline")


@dataclass(frozen=True)
class RuleConfig:
    enabled: bool = True
    severity: str = "warning"
    debounce_s: float = 0.0
    renotify_s: float = 3600.0
    threshold: float = 0.0      # unit per rule: %, minutes, or a factor
    window_s: float = 300.0     # drain measurement window


DEFAULT_RULES: dict[str, RuleConfig] = {
    "on_battery": RuleConfig(severity="warning", debounce_s=30.0),
    "battery_low": RuleConfig(severity="critical", threshold=30.0),
    "runtime_low": RuleConfig(severity="critical", threshold=10.0, window_s=300.0),
    "battery_aging": RuleConfig(severity="warning", threshold=1.5, window_s=180.0),
    "hub_offline": RuleConfig(severity="critical", debounce_s=60.0),
}


@dataclass(frozen=True)
class UpsReading:
    t: int
    on_battery: bool
    charge: float | None = None
    runtime_s: float | None = None
    low_battery: bool = False
    replace_battery: bool = False


@dataclass(frozen=True)
class Finding:
    """A condition that holds now (the state machine decides what to send)."""

    rule: str
    hub: str
    host: str
    ups: str | None
    since_ns: int
    value: float
    message: str

    @property
    def key(self) -> str:
        return "/".join(x for x in (self.rule, self.hub, self.host, self.ups) if x)


def drain_rate(readings: list[UpsReading], window_ns: int, now_ns: int) -> float | None:
    """Charge lost per second (% / s) over the window, by least squares; None when too little data."""
    points = [(r.t, r.charge) for r in readings if r.charge is not None and r.t >= now_ns - window_ns]
    # at least three readings spread over a third of the window (20 s at most)
    if len(points) < 3 or points[-1][0] - points[0][0] < min(20 * NS, window_ns // 3):
        return None
    t0 = points[0][0]
    xs = [(t - t0) / NS for t, _ in points]
    ys = [c for _, c in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return -slope if slope < 0 else 0.0


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def evaluate_ups(hub: str, host: str, ups: str, readings: list[UpsReading], rules: dict[str, RuleConfig],
                 now_ns: int) -> list[Finding]:
    """Findings for one UPS from its recent readings (sorted by time)."""
    if not readings:
        return []
    last = readings[-1]
    findings = []
    where = f"UPS {ups} at {hub}/{host}"
    run_start = None
    for r in reversed(readings):
        if not r.on_battery:
            break
        run_start = r.t
    on_battery = last.on_battery and run_start is not None
    run = [r for r in readings if run_start is not None and r.t >= run_start]

    rule = rules["on_battery"]
    if rule.enabled and on_battery and (now_ns - run_start) / NS >= rule.debounce_s:
        charge = f", charge {last.charge:.0f}%" if last.charge is not None else ""
        findings.append(Finding("on_battery", hub, host, ups, run_start, float(last.charge or 0.0),
                                f"{where} is on battery since {(now_ns - run_start) / NS:.0f} s{charge}"))

    rule = rules["battery_low"]
    if rule.enabled and on_battery and (last.low_battery or (last.charge is not None and last.charge <= rule.threshold)):
        reason = "the UPS reports low battery (LB)" if last.low_battery else f"charge {last.charge:.0f}% ≤ {rule.threshold:.0f}%"
        findings.append(Finding("battery_low", hub, host, ups, last.t, float(last.charge or 0.0),
                                f"{where}: battery low, {reason}"))

    rate = drain_rate(run, int(rules["runtime_low"].window_s * NS), now_ns) if on_battery else None
    rule = rules["runtime_low"]
    if rule.enabled and on_battery:
        estimates = []
        if rate and last.charge is not None:
            estimates.append((last.charge / rate, "measured drain"))
        if last.runtime_s is not None:
            estimates.append((last.runtime_s, "UPS estimate"))
        if estimates:
            seconds, source = min(estimates)
            if seconds / 60 < rule.threshold:
                other = [f"{s}: {_minutes(v)}" for v, s in estimates if s != source]
                findings.append(Finding(
                    "runtime_low", hub, host, ups, last.t, round(seconds / 60, 1),
                    f"{where}: about {_minutes(seconds)} of battery left ({source}"
                    + (f"; {other[0]}" if other else "") + ")"))

    rule = rules["battery_aging"]
    if rule.enabled:
        if last.replace_battery:
            findings.append(Finding("battery_aging", hub, host, ups, last.t, 1.0,
                                    f"{where}: the UPS asks for its battery to be replaced (RB)"))
        elif on_battery and last.runtime_s and last.charge:
            aging_rate = drain_rate(run, int(rule.window_s * NS), now_ns)
            expected = last.charge / last.runtime_s
            if aging_rate and expected > 0 and aging_rate / expected >= rule.threshold:
                findings.append(Finding(
                    "battery_aging", hub, host, ups, last.t, round(aging_rate / expected, 2),
                    f"{where}: battery drains {aging_rate / expected:.1f}× faster than the UPS's own estimate "
                    f"({aging_rate * 60:.1f} %/min measured) — an aging battery"))
    return findings


def evaluate_offline(hub: str, host: str, state: str, since_ns: int, rules: dict[str, RuleConfig],
                     now_ns: int) -> list[Finding]:
    rule = rules["hub_offline"]
    if rule.enabled and state == "offline" and (now_ns - since_ns) / NS >= rule.debounce_s:
        return [Finding("hub_offline", hub, host, None, since_ns, (now_ns - since_ns) / NS,
                        f"hub {hub}: gateway {host} offline for {_minutes((now_ns - since_ns) / NS)}")]
    return []


# --- state machine -----------------------------------------------------------------------------

@dataclass
class AlertState:
    key: str
    rule: str
    hub: str
    host: str
    ups: str | None
    severity: str
    since_ns: int
    last_notified_ns: int
    value: float
    message: str

    def to_json(self) -> bytes:
        return json.dumps({"key": self.key, "rule": self.rule, "hub": self.hub, "host": self.host, "ups": self.ups,
                           "severity": self.severity, "since_ns": self.since_ns,
                           "last_notified_ns": self.last_notified_ns, "value": self.value,
                           "message": self.message, "state": "firing"}).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> "AlertState":
        obj = json.loads(payload)
        return cls(obj["key"], obj["rule"], obj["hub"], obj["host"], obj.get("ups"), obj["severity"],
                   int(obj["since_ns"]), int(obj["last_notified_ns"]), float(obj["value"]), obj["message"])


@dataclass(frozen=True)
class Notification:
    """What a notifier sends (the JSON body of the webhook; documented in docs/alerts.md)."""

    state: str  # firing | resolved
    renotify: bool
    rule: str
    severity: str
    hub: str
    host: str
    ups: str | None
    message: str
    value: float
    since_ns: int
    time_ns: int
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "renotify": self.renotify, "rule": self.rule, "severity": self.severity,
                "hub": self.hub, "host": self.host, "ups": self.ups, "message": self.message,
                "value": self.value, "since": self.since_ns / NS, "time": self.time_ns / NS, "key": self.key,
                "text": f"[{self.severity.upper()}] {'RESOLVED: ' if self.state == 'resolved' else ''}{self.message}"}


@dataclass
class Transitions:
    """What one evaluation changed: states to persist or clear, and what to notify."""

    persist: list[AlertState] = field(default_factory=list)
    clear: list[AlertState] = field(default_factory=list)
    notify: list[Notification] = field(default_factory=list)


def step(active: dict[str, AlertState], findings: list[Finding], scope: set[str] | None,
         rules_for_hub, now_ns: int) -> Transitions:
    """Advance the state machine. ``scope``: the keys' prefixes this evaluation covered (an
    alert outside it is left alone); ``rules_for_hub(hub) -> dict[str, RuleConfig]``."""
    out = Transitions()
    found = {f.key: f for f in findings}
    for key, f in found.items():
        rule = rules_for_hub(f.hub)[f.rule]
        current = active.get(key)
        if current is None:
            state = AlertState(key, f.rule, f.hub, f.host, f.ups, rule.severity, f.since_ns, now_ns, f.value, f.message)
            active[key] = state
            out.persist.append(state)
            out.notify.append(_notification(state, "firing", False, now_ns))
        else:
            current.value, current.message = f.value, f.message
            if (now_ns - current.last_notified_ns) / NS >= rule.renotify_s:
                current.last_notified_ns = now_ns
                out.persist.append(current)
                out.notify.append(_notification(current, "firing", True, now_ns))
    for key in [k for k in active if k not in found]:
        state = active[key]
        if scope is not None and (state.hub, state.rule) not in scope:
            continue
        del active[key]
        out.clear.append(state)
        out.notify.append(_notification(state, "resolved", False, now_ns))
    return out


def _notification(state: AlertState, what: str, renotify: bool, now_ns: int) -> Notification:
    message = state.message if what == "firing" else f"resolved: {state.message}"
    return Notification(what, renotify, state.rule, state.severity, state.hub, state.host, state.ups,
                        message, state.value, state.since_ns, now_ns, state.key)


def rules_with_overrides(base: dict[str, RuleConfig], overrides: dict[str, dict[str, Any]]) -> dict[str, RuleConfig]:
    return {name: replace(rule, **overrides.get(name, {})) for name, rule in base.items()}
