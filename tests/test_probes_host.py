"""The host probes (system, network, ping, battery) on this machine's real /proc and /sys,
and on real-format files under an injected root where the real thing cannot be staged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.probes import ProbeContext
from agent.probes.battery import BatteryProbe
from agent.probes.network import NetworkProbe, parse_proc_net_dev
from agent.probes.ping import PingProbe, Target, icmp_allowed
from agent.probes.system import SystemProbe, parse_meminfo

REPO = Path(__file__).resolve().parent.parent


def context(tmp_path, **kw):
    return ProbeContext(outbox_path=tmp_path / "outbox.db", **kw)


# --- system -------------------------------------------------------------------------------

def test_system_reads_this_machine(tmp_path, emitted):
    probe = SystemProbe(SystemProbe.Config(), context(tmp_path))
    [sample] = emitted(probe.collect())
    f = sample.fields
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(f["uptime_seconds"] - uptime) < 5
    assert abs(f["boot_time_seconds"] + f["uptime_seconds"] - time.time()) < 5
    assert 0 <= f["cpu_percent"] <= 100 and 0 < f["memory_used_percent"] < 100
    st = shutil.disk_usage(tmp_path)
    assert abs(f["disk_used_percent"] - 100 * st.used / (st.used + st.free)) < 1
    assert f["load1"] == float(Path("/proc/loadavg").read_text().split()[0]) or f["load1"] >= 0
    assert "clock_synced" not in f or isinstance(f["clock_synced"], bool)


def test_system_cpu_percent_follows_a_busy_core(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    for name in ("uptime", "meminfo", "loadavg"):
        (proc / name).write_text(Path("/proc", name).read_text())
    stat = "cpu  {u} 0 {s} {i} 0 0 0 0 0 0\ncpu0 1 0 1 1 0 0 0 0 0 0\nbtime 1795545000\n"
    (proc / "stat").write_text(stat.format(u=1000, s=500, i=8500))
    probe = SystemProbe(SystemProbe.Config(), context(tmp_path, proc_root=proc))
    probe.collect()
    # 300 busy jiffies out of 400 since the previous cycle: 75%
    (proc / "stat").write_text(stat.format(u=1200, s=600, i=8600))
    [sample] = probe.collect()
    assert sample.fields["cpu_percent"] == 75.0
    assert sample.fields["boot_time_seconds"] == 1795545000.0


def test_meminfo_without_memavailable():
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 100 kB\nCached: 300 kB\n"
    assert parse_meminfo(text) == 50.0


# --- network ------------------------------------------------------------------------------

def test_network_counts_real_loopback_traffic(tmp_path, emitted):
    probe = NetworkProbe(NetworkProbe.Config(interfaces=("lo",)), context(tmp_path))
    [before] = emitted(probe.collect())
    payload = b"x" * 200_000
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    client.sendall(payload)
    received = 0
    while received < len(payload):
        received += len(conn.recv(65536))
    for s in (client, conn, server):
        s.close()
    [after] = probe.collect()
    assert before.tags["iface"] == "lo"
    assert after.fields["rx_bytes_total"] - before.fields["rx_bytes_total"] >= len(payload)
    assert after.fields["tx_packets_total"] > before.fields["tx_packets_total"]
    assert isinstance(after.fields["rx_bytes_total"], int)


def fake_sys(tmp_path, iface, operstate, carrier, speed):
    base = tmp_path / "sys" / "class" / "net" / iface
    base.mkdir(parents=True)
    (base / "operstate").write_text(operstate + "\n")
    (base / "carrier").write_text(carrier + "\n")
    if speed is not None:
        (base / "speed").write_text(speed + "\n")
    return tmp_path / "sys"


@pytest.mark.parametrize("operstate,carrier,speed,up,mbps", [
    ("up", "1", "1000", True, 1000.0),
    ("down", "0", "-1", False, None),
    ("up", "1", "-1", True, None),        # Wi-Fi: speed unknown -> absent, never 0
    ("unknown", "1", None, True, None),   # PPP / tun: operstate unknown, carrier decides
])
def test_network_link_state_and_speed(tmp_path, emitted, operstate, carrier, speed, up, mbps):
    proc = tmp_path / "proc" / "net"
    proc.mkdir(parents=True)
    real = Path("/proc/net/dev").read_text().splitlines()
    (proc / "dev").write_text("\n".join(real[:2] + [
        "  eth0: 123456789 1000 2 3 0 0 0 0 987654321 2000 4 5 0 0 0 0",
        "  docker0: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0"]) + "\n")
    sys_root = fake_sys(tmp_path, "eth0", operstate, carrier, speed)
    probe = NetworkProbe(NetworkProbe.Config(), context(tmp_path, proc_root=tmp_path / "proc", sys_root=sys_root))
    [sample] = emitted(probe.collect())
    assert sample.tags["iface"] == "eth0"
    assert sample.fields["link_up"] is up
    assert sample.fields.get("speed_mbps") == mbps
    assert (sample.fields["rx_bytes_total"], sample.fields["tx_bytes_total"]) == (123456789, 987654321)
    assert (sample.fields["rx_errors_total"], sample.fields["rx_drops_total"]) == (2, 3)
    assert (sample.fields["tx_errors_total"], sample.fields["tx_drops_total"]) == (4, 5)


def test_network_parses_this_machines_proc_net_dev():
    counters = parse_proc_net_dev(Path("/proc/net/dev").read_text())
    assert "lo" in counters and all(v >= 0 for v in counters["lo"].values())


# --- ping ---------------------------------------------------------------------------------

def ping_probe(tmp_path, targets, **kw):
    cfg = PingProbe.Config(targets=tuple(targets), count=kw.pop("count", 3), timeout=kw.pop("timeout", 0.5),
                           spacing=0.01, **kw)
    return PingProbe(cfg, context(tmp_path))


def test_ping_tcp_to_a_listening_and_a_closed_port(tmp_path, emitted):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    open_port = server.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    probe = ping_probe(tmp_path, [Target("svc", "127.0.0.1", open_port), Target("refused", "localhost", closed_port)],
                       method="tcp")
    samples = emitted(probe.collect())
    server.close()
    by_target = {s.tags["target"]: s for s in samples}
    for name in ("svc", "refused"):  # a refusal (RST) proves the host answered
        f = by_target[name].fields
        assert f["reachable"] is True and f["loss_percent"] == 0.0 and f["method"] == "tcp"
        assert 0 <= f["rtt_min_ms"] <= f["rtt_avg_ms"] <= f["rtt_max_ms"] < 500
    assert by_target["refused"].tags["address"] == "127.0.0.1"


def test_ping_unresolvable_name_is_unreachable_with_a_reason(tmp_path, emitted):
    probe = ping_probe(tmp_path, [Target("internet", "no-such-host.invalid", 443)])
    [sample] = emitted(probe.collect())
    assert sample.fields["reachable"] is False and sample.fields["loss_percent"] == 100.0
    assert "did not resolve" in sample.fields["error"]
    assert "rtt_avg_ms" not in sample.fields


def test_ping_auto_picks_icmp_only_where_the_kernel_allows_it(tmp_path):
    probe = ping_probe(tmp_path, [Target("lo", "127.0.0.1", 9)], count=1)
    [sample] = probe.collect()
    assert sample.fields["method"] == ("icmp" if icmp_allowed() else "tcp")


NETNS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from agent.probes import ProbeContext
    from agent.probes.ping import PingProbe, Target
    probe = PingProbe(PingProbe.Config(targets=(Target("lo", "127.0.0.1", 9),), count=3, timeout=0.3,
                                       spacing=0.01), ProbeContext())
    print(json.dumps([s.to_json() for s in probe.collect()]))
""")


def run_in_netns(setup: str) -> list[dict]:
    """Run the ping probe in a private network namespace (so sysctls stay private to it)."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to test ICMP in a private network namespace")
    shell = f"{setup}; exec {sys.executable} -c '{NETNS_SCRIPT}'"
    result = subprocess.run(["unshare", "-n", "sh", "-c", shell], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


ALLOW_ICMP = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"


def test_ping_icmp_echo_without_root_privileges_in_a_namespace(emitted):
    from agent.wire import Sample
    [raw] = run_in_netns(f"ip link set lo up; {ALLOW_ICMP}")
    [sample] = emitted([Sample.from_json(raw)])
    f = sample.fields
    assert f["method"] == "icmp" and f["reachable"] is True and f["loss_percent"] == 0.0
    assert 0 < f["rtt_avg_ms"] < 300


def test_ping_icmp_with_the_network_down_loses_everything():
    [raw] = run_in_netns(ALLOW_ICMP)  # lo stays down: nothing can answer
    f = raw["f"]
    assert f["method"] == "icmp" and f["reachable"] is False and f["loss_percent"] == 100.0
    assert "no answer" in f["error"]


# --- battery ------------------------------------------------------------------------------

def power_supply(tmp_path, name, **values):
    d = tmp_path / "sys" / "class" / "power_supply" / name
    d.mkdir(parents=True)
    (d / "uevent").write_text("".join(f"POWER_SUPPLY_{k}={v}\n" for k, v in {"NAME": name, **values}.items()))
    return tmp_path / "sys"


def test_battery_discharging_laptop(tmp_path, emitted):
    power_supply(tmp_path, "AC", TYPE="Mains", ONLINE="0")
    sys_root = power_supply(tmp_path, "BAT0", TYPE="Battery", STATUS="Discharging", PRESENT="1",
                            TECHNOLOGY="Li-ion", CYCLE_COUNT="0", VOLTAGE_NOW="11400000", POWER_NOW="9500000",
                            ENERGY_FULL_DESIGN="57000000", ENERGY_FULL="50000000", ENERGY_NOW="25000000",
                            CAPACITY="50", CAPACITY_LEVEL="Normal", MODEL_NAME="5B10W13930", MANUFACTURER="SMP")
    probe = BatteryProbe(BatteryProbe.Config(), context(tmp_path, sys_root=sys_root))
    [sample] = emitted(probe.collect())
    assert sample.fields == {"charge_percent": 50.0, "plugged": False,
                             "runtime_seconds": round(3600 * 25000000 / 9500000, 1)}


def test_battery_charging_from_charge_counters(tmp_path, emitted):
    power_supply(tmp_path, "ADP1", TYPE="Mains", ONLINE="1")
    sys_root = power_supply(tmp_path, "BAT1", TYPE="Battery", STATUS="Charging", PRESENT="1",
                            CHARGE_FULL="4000000", CHARGE_NOW="3000000", CURRENT_NOW="1200000")
    [sample] = emitted(BatteryProbe(BatteryProbe.Config(), context(tmp_path, sys_root=sys_root)).collect())
    assert sample.fields == {"charge_percent": 75.0, "plugged": True}


def test_no_battery_no_sample(tmp_path):
    sys_root = power_supply(tmp_path, "AC", TYPE="Mains", ONLINE="1")
    power_supply(tmp_path, "hidpp_battery_0", TYPE="Battery", SCOPE="Device", CAPACITY="80", STATUS="Discharging")
    assert BatteryProbe(BatteryProbe.Config(), context(tmp_path, sys_root=sys_root)).collect() == []
    # and this machine's real /sys: a sample exactly when it has a system battery
    supplies = Path("/sys/class/power_supply")
    has_battery = supplies.is_dir() and any(
        (p / "type").is_file() and (p / "type").read_text().strip() == "Battery" for p in supplies.iterdir())
    real = BatteryProbe(BatteryProbe.Config(), context(tmp_path)).collect()
    assert len(real) == (1 if has_battery else 0)
