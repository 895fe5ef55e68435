"""The catalogue: every measurement, tag and field hubwatch writes, with its type and unit.

This is the single source of truth that probes, the wire format, the collector, the
dashboards and the docs are checked against. A field keeps one type forever (InfluxDB
rejects a write whose type differs from what it already holds), so the type is part of
the contract: gauges are floats, counters (names ending in ``_total``) are ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

FIELD_TYPES = {"float": float, "int": int, "bool": bool, "str": str}

#: Tags present on every point, set by the agent from its config (and, on the collector,
#: from the topic the broker authorised).
COMMON_TAGS = ("hub", "host")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str  # one of FIELD_TYPES
    unit: str  # "" for booleans and strings
    help: str

    def accepts(self, value: object) -> bool:
        """True when ``value`` has this field's type (bool is not an int here)."""
        if self.type == "float":
            return isinstance(value, float)
        if self.type == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if self.type == "bool":
            return isinstance(value, bool)
        return isinstance(value, str)


@dataclass(frozen=True)
class MeasurementSpec:
    name: str
    tags: tuple[str, ...]  # beyond COMMON_TAGS
    optional_tags: tuple[str, ...]
    fields: Mapping[str, FieldSpec]
    help: str


def _measurement(name: str, help: str, tags: tuple[str, ...], fields: list[tuple[str, str, str, str]],
                 optional_tags: tuple[str, ...] = ()) -> MeasurementSpec:
    specs = {f[0]: FieldSpec(*f) for f in fields}
    return MeasurementSpec(name, tags, optional_tags, MappingProxyType(specs), help)


UPS_FIELDS = [
    ("battery_charge_percent", "float", "%", "Battery charge"),
    ("battery_charge_low_percent", "float", "%", "Charge at which the UPS declares low battery"),
    ("battery_runtime_seconds", "float", "s", "UPS's own estimate of runtime left on battery"),
    ("battery_voltage_volts", "float", "V", "Battery voltage"),
    ("input_voltage_volts", "float", "V", "Mains (input) voltage"),
    ("input_frequency_hz", "float", "Hz", "Mains (input) frequency"),
    ("output_voltage_volts", "float", "V", "Output voltage"),
    ("load_percent", "float", "%", "Load as a share of the UPS's capacity"),
    ("temperature_celsius", "float", "°C", "UPS or battery temperature"),
    ("realpower_watts", "float", "W", "Real power drawn by the load"),
    ("status", "str", "", "Raw status string as the UPS reports it (NUT tokens, e.g. 'OB DISCHRG')"),
    ("on_line", "bool", "", "On mains power (OL)"),
    ("on_battery", "bool", "", "On battery (OB)"),
    ("low_battery", "bool", "", "Low battery (LB)"),
    ("charging", "bool", "", "Battery charging (CHRG)"),
    ("discharging", "bool", "", "Battery discharging (DISCHRG)"),
    ("replace_battery", "bool", "", "Battery needs replacing (RB)"),
    ("overload", "bool", "", "UPS overloaded (OVER)"),
]

MEASUREMENTS: Mapping[str, MeasurementSpec] = MappingProxyType({m.name: m for m in [
    _measurement("ups", "One UPS, read through NUT upsd or SNMP", ("ups", "source"), UPS_FIELDS),
    _measurement("net", "One network interface's raw counters and link state", ("iface",), [
        ("rx_bytes_total", "int", "B", "Bytes received"),
        ("tx_bytes_total", "int", "B", "Bytes sent"),
        ("rx_packets_total", "int", "packets", "Packets received"),
        ("tx_packets_total", "int", "packets", "Packets sent"),
        ("rx_errors_total", "int", "packets", "Receive errors"),
        ("tx_errors_total", "int", "packets", "Transmit errors"),
        ("rx_drops_total", "int", "packets", "Received packets dropped"),
        ("tx_drops_total", "int", "packets", "Outgoing packets dropped"),
        ("link_up", "bool", "", "Interface is up with carrier"),
        ("speed_mbps", "float", "Mbit/s", "Negotiated link speed (absent when unknown)"),
    ]),
    _measurement("system", "The machine the agent runs on", (), [
        ("uptime_seconds", "float", "s", "Time since boot"),
        ("boot_time_seconds", "float", "s", "Boot time, seconds since the epoch"),
        ("cpu_percent", "float", "%", "CPU busy since the previous sample, all cores"),
        ("memory_used_percent", "float", "%", "Memory in use (excluding caches)"),
        ("load1", "float", "", "1-minute load average"),
        ("disk_used_percent", "float", "%", "Disk used on the file system holding the outbox"),
        ("clock_synced", "bool", "", "Kernel reports the clock synchronised (absent when it cannot tell)"),
    ]),
    _measurement("ping", "Latency and loss to one named target", ("target", "address"), [
        ("rtt_avg_ms", "float", "ms", "Mean round-trip time of the answered probes"),
        ("rtt_min_ms", "float", "ms", "Shortest round-trip time"),
        ("rtt_max_ms", "float", "ms", "Longest round-trip time"),
        ("loss_percent", "float", "%", "Probes without an answer"),
        ("reachable", "bool", "", "At least one probe answered"),
        ("method", "str", "", "How it was measured: 'icmp' (unprivileged echo) or 'tcp' (connect)"),
        ("error", "str", "", "Why the target was unreachable (e.g. name did not resolve)"),
    ]),
    _measurement("battery", "A laptop's own battery, for a laptop used as gateway", (), [
        ("charge_percent", "float", "%", "Battery charge"),
        ("plugged", "bool", "", "On mains power"),
        ("runtime_seconds", "float", "s", "Time left on battery (absent when plugged or unknown)"),
    ]),
    _measurement("agent", "The agent itself: one point per probe that failed in a cycle (tagged `probe`), "
                          "and one point per cycle, without `probe`, on its outbox and delivery", (), [
        ("error", "str", "", "What went wrong, in words (points tagged `probe`)"),
        ("error_kind", "str", "", "Machine-readable reason: timeout, connection_refused, unknown_ups, "
                                  "data_stale, protocol, auth, snmp, exception"),
        ("outbox_samples", "float", "samples", "Samples held in the outbox, not yet confirmed by the collector"),
        ("outbox_messages", "float", "messages", "Messages sent or ready to send, waiting for the collector's ack"),
        ("outbox_bytes", "float", "B", "Size of the outbox on disk (database and WAL)"),
        ("outbox_oldest_age_seconds", "float", "s", "Age of the oldest sample held (absent when empty)"),
        ("dropped_samples_total", "int", "samples", "Oldest samples deleted because the outbox hit buffer.max_mb"),
        ("lost_samples_total", "int", "samples", "Samples that could not be recovered from a corrupt outbox"),
        ("time_unknown_samples_total", "int", "samples",
         "Samples from an earlier boot whose clock was never trusted, at impossible times, dropped"),
        ("probe_errors_total", "int", "errors", "Probe failures (each also reported as a `probe` point)"),
        ("messages_published_total", "int", "messages", "Publishes the broker acknowledged (PUBACK success)"),
        ("publish_errors_total", "int", "messages", "Publishes the MQTT client refused (rc != 0); retried"),
        ("publish_rejected_total", "int", "messages",
         "Publishes the broker refused (PUBACK reason >= 128, e.g. not authorised); retried"),
        ("messages_resent_total", "int", "messages", "Messages sent again, not confirmed by the collector in time"),
        ("messages_acked_total", "int", "messages", "Messages the collector confirmed written to InfluxDB"),
        ("mqtt_connected", "bool", "", "Connected to the broker when the point was taken"),
        ("clock_trusted", "bool", "", "Wall clock trusted (synchronised, no unsettled jump)"),
    ], optional_tags=("probe", "target")),
    # Written by the collector, never accepted from an agent.
    _measurement("status", "An agent's connection state, from its retained status topic", (), [
        ("state", "str", "", "online, offline (Last Will) or stopped (clean stop)"),
        ("online", "bool", "", "state is online"),
        ("reason", "str", "", "Why the collector set it: 'silent' (no samples for 3 intervals plus the agents' batch age), 'sending'"),
    ]),
    _measurement("hubwatch_collector", "A collector instance's own health, every stats interval", ("instance",), [
        ("received_total", "int", "messages", "MQTT messages received"),
        ("written_total", "int", "points", "Points written to InfluxDB"),
        ("rejected_total", "int", "samples", "Messages or samples rejected (per reason with the reason tag)"),
        ("write_failures_total", "int", "writes", "Batch writes that failed and were retried"),
        ("seq_gaps_total", "int", "messages", "Messages missing between seqs seen from agents"),
        ("batch_points", "float", "points", "Points in the last batch written"),
        ("write_latency_seconds", "float", "s", "Mean time a batch write took"),
        ("queue_depth", "float", "messages", "Messages received but not yet processed"),
        ("lag_seconds", "float", "s", "Age of the newest sample in the last batch when written"),
    ], optional_tags=("reason",)),
    _measurement("outage", "One outage, keyed by its start time (so a recomputation overwrites it)", ("kind",), [
        ("duration_seconds", "float", "s", "Length so far (ongoing) or in all"),
        ("end_seconds", "float", "s", "End, seconds since the epoch (absent while ongoing)"),
        ("ongoing", "bool", "", "Not over yet"),
        ("cause", "str", "", "mains_failure, uplink, battery_exhausted, agent_silent, unclean_restart, ..."),
        ("min_battery_charge_percent", "float", "%", "Lowest UPS charge seen during a power outage"),
        ("blip", "bool", "", "A power outage shorter than outages.min_power_s (reported apart)"),
    ], optional_tags=("ups",)),
    _measurement("alert", "An alert's transitions: firing, re-notified, resolved", ("rule", "severity"), [
        ("state", "str", "", "firing or resolved"),
        ("message", "str", "", "What is wrong, in words"),
        ("value", "float", "rule's unit", "The value that crossed the threshold: % (on_battery, battery_low), "
                                            "minutes (runtime_low), factor (battery_aging), seconds (hub_offline)"),
    ], optional_tags=("ups",)),
]})

#: Measurements only the collector writes.
COLLECTOR_MEASUREMENTS = ("status", "hubwatch_collector", "outage", "alert")

#: outage kinds
OUTAGE_KINDS = ("power", "hub_dark", "uplink", "host_down", "reboot")

# Error kinds a probe may report in the agent measurement's error_kind field.
ERROR_KINDS = ("timeout", "connection_refused", "unreachable", "unknown_ups", "data_stale",
               "protocol", "auth", "snmp", "exception")


def field_spec(measurement: str, field: str) -> FieldSpec:
    """The spec of ``measurement.field``; KeyError names what is missing."""
    try:
        return MEASUREMENTS[measurement].fields[field]
    except KeyError:
        raise KeyError(f"{measurement}.{field} is not in the catalogue") from None


def check_sample(measurement: str, tags: Mapping[str, str], fields: Mapping[str, object]) -> list[str]:
    """Every way a sample disagrees with the catalogue, as sentences (empty when it agrees)."""
    spec = MEASUREMENTS.get(measurement)
    if spec is None:
        return [f"measurement {measurement!r} is not in the catalogue"]
    problems = []
    allowed_tags = set(COMMON_TAGS) | set(spec.tags) | set(spec.optional_tags)
    for tag in tags:
        if tag not in allowed_tags:
            problems.append(f"{measurement}: tag {tag!r} is not declared")
    for tag in spec.tags:
        if tag not in tags:
            problems.append(f"{measurement}: required tag {tag!r} is missing")
    if not fields:
        problems.append(f"{measurement}: a sample needs at least one field")
    for name, value in fields.items():
        fspec = spec.fields.get(name)
        if fspec is None:
            problems.append(f"{measurement}: field {name!r} is not declared")
        elif not fspec.accepts(value):
            problems.append(f"{measurement}.{name}: expected {fspec.type}, got {type(value).__name__}")
    return problems


def render_markdown() -> str:
    """The metrics reference (docs/metrics.md), generated so it can never drift."""
    lines = ["# Metrics reference", "",
             "Generated from `agent/catalogue.py` (`python -m agent.catalogue > docs/metrics.md`); "
             "a test keeps them equal.", "",
             f"Every point carries the tags {', '.join(f'`{t}`' for t in COMMON_TAGS)}. "
             "Counters end in `_total` and stay raw; gauges are floats; absent values are left out, "
             "never written as 0.", ""]
    for spec in MEASUREMENTS.values():
        tags = [f"`{t}`" for t in spec.tags] + [f"`{t}` (optional)" for t in spec.optional_tags]
        lines += [f"## `{spec.name}`", "", spec.help + ".", "",
                  f"Tags: {', '.join(tags) if tags else 'only the common ones'}.", "",
                  "| field | type | unit | meaning |", "|---|---|---|---|"]
        lines += [f"| `{f.name}` | {f.type} | {f.unit} | {f.help} |" for f in spec.fields.values()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
