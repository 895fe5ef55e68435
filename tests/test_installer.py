"""``scripts/install-agent.sh`` into a temporary root (``--prefix``): files, modes, config, upgrade.

The install is real: a venv made with Debian's ``/usr/bin/python3`` and ``pip install`` of
this source tree (base install, dependencies from the package index as a gateway PC gets
them). It is done once for the module (about 6 s here); the tests that change the install
(rerun, uninstall) come last and work on that same root.

As root the account is ``nobody`` (``--user nobody``), so ownership is checked without
creating an account on the test machine; ``--prefix`` never creates accounts.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "scripts" / "install-agent.sh"
PYTHON = "/usr/bin/python3"
IS_ROOT = os.geteuid() == 0
ACCOUNT = "nobody" if IS_ROOT else None

@pytest.fixture(autouse=True, scope="module")
def _debian_python_with_venv():
    if not Path(PYTHON).exists() or subprocess.run([PYTHON, "-c", "import ensurepip, venv"]).returncode != 0:
        pytest.fail("the installer needs Debian's python3 with venv (python3-venv): `make test` installs it")


def run_installer(*args: str, password: str | None = None, check: bool = True,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.pop("HUBWATCH_MQTT_PASSWORD", None)
    if password is not None:
        env["HUBWATCH_MQTT_PASSWORD"] = password
    result = subprocess.run(["bash", str(INSTALLER), *args], capture_output=True, text=True, env=env,
                            timeout=timeout, cwd="/")
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ping_range_for(gid: int) -> tuple[int, int]:
    """What the drop-in should say: this machine's range widened to include gid."""
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
    if lo > hi:
        return gid, gid
    return min(lo, gid), max(hi, gid)


HUB, HOST, BROKER = "gilgit-sco-01", "gw01", "mqtts://broker.sco.example:8883"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    args = ["--hub", HUB, "--broker", BROKER, "--host", HOST, "--gateway", "192.0.2.1", "--ups", "hubups",
            "--python", PYTHON, "--prefix", str(root)]
    if ACCOUNT:
        args += ["--user", ACCOUNT]
    result = run_installer(*args, password=PASSWORD)
    return root, result


def test_files_exist_with_their_modes(installed):
    root, _ = installed
    expected = {
        "etc/hubwatch": 0o750,
        "etc/hubwatch/agent.yaml": 0o640,
        "etc/hubwatch/mqtt.password": 0o600,
        "var/lib/hubwatch": 0o750,
        "etc/systemd/system/hubwatch-agent.service": 0o644,
        "etc/sysctl.d/60-hubwatch-ping.conf": 0o644,
        "opt/hubwatch/venv/bin/hubwatch-agent": 0o755,
    }
    for rel, want in expected.items():
        path = root / rel
        assert path.exists(), rel
        assert mode(path) == want, f"{rel}: {oct(mode(path))} != {oct(want)}"
    assert (root / "etc/hubwatch/mqtt.password").read_text() == PASSWORD + "\n"
    assert not list((root / "etc/hubwatch").glob(".*")), "no temporary files left behind"


def test_ownership(installed):
    if not IS_ROOT:  # the suite runs as root (`make test`); the installer sets owners only then
        pytest.fail("run the tests as root: ownership is set only when the installer runs as root")
    root, _ = installed
    uid, gid = pwd.getpwnam(ACCOUNT).pw_uid, pwd.getpwnam(ACCOUNT).pw_gid
    owners = {rel: ((st := (root / rel).stat()).st_uid, st.st_gid) for rel in
              ("etc/hubwatch", "etc/hubwatch/agent.yaml", "etc/hubwatch/mqtt.password", "var/lib/hubwatch")}
    assert owners == {
        "etc/hubwatch": (0, gid),                 # root's: the agent reads, cannot change its config
        "etc/hubwatch/agent.yaml": (0, gid),
        "etc/hubwatch/mqtt.password": (uid, gid),  # 0600: the agent alone
        "var/lib/hubwatch": (uid, gid),           # the outbox
    }


def test_rendered_config_is_what_was_asked(installed):
    root, _ = installed
    config = yaml.safe_load((root / "etc/hubwatch/agent.yaml").read_text())
    assert config == {
        "hub": HUB,
        "host": HOST,
        "interval": "10s",
        "mqtt": {"url": BROKER, "username": f"{HUB}.{HOST}", "password_file": "/etc/hubwatch/mqtt.password",
                 "topic_prefix": "hubwatch"},
        "buffer": {"path": "/var/lib/hubwatch/outbox.db", "max_mb": 256},
        "probes": {
            "system": {},
            "network": {"interfaces": ["eth*", "en*", "wl*"]},
            "ping": {"targets": {"gateway": "192.0.2.1", "internet": "1.1.1.1"}},
            "nut": [{"name": "hubups", "host": "127.0.0.1", "port": 3493}],
        },
    }


def prefixed_copy(root: Path, dest: Path) -> Path:
    """The installed config with its absolute paths moved under the prefix, as the agent would see them."""
    text = (root / "etc/hubwatch/agent.yaml").read_text()
    text = text.replace("/etc/hubwatch/", f"{root}/etc/hubwatch/").replace("/var/lib/hubwatch/", f"{root}/var/lib/hubwatch/")
    dest.write_text(text)
    return dest


def test_installed_agent_passes_check(installed, tmp_path):
    root, _ = installed
    venv = root / "opt/hubwatch/venv"
    result = subprocess.run([str(venv / "bin/hubwatch-agent"), "--check", "-c", str(prefixed_copy(root, tmp_path / "a.yaml"))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"hub={HUB}, host={HOST}" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


def test_installed_venv_is_the_agent_alone(installed, tmp_path):
    root, _ = installed
    python = root / "opt/hubwatch/venv/bin/python"
    probe = ("import importlib.util, agent, collector; "
             "print(agent.__file__); print(importlib.util.find_spec('influxdb_client') is None)")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    where, no_influx = result.stdout.split()
    assert where.startswith(str(root / "opt/hubwatch/venv/lib/")), where  # installed, not the source tree
    assert no_influx == "True"  # the base install: no collector extras on a gateway PC
    version = subprocess.run([str(root / "opt/hubwatch/venv/bin/hubwatch-agent"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("hubwatch-agent ")


def test_unit_and_ping_sysctl(installed):
    root, _ = installed
    unit = (root / "etc/systemd/system/hubwatch-agent.service").read_text()
    shipped = (REPO / "systemd/hubwatch-agent.service").read_text()
    if ACCOUNT:
        group = grp.getgrgid(pwd.getpwnam(ACCOUNT).pw_gid).gr_name
        shipped = shipped.replace("User=hubwatch\n", f"User={ACCOUNT}\n").replace("Group=hubwatch\n", f"Group={group}\n")
    assert unit == shipped
    gid = pwd.getpwnam(ACCOUNT).pw_gid if ACCOUNT else os.getgid()
    lo, hi = ping_range_for(gid)
    lines = [line for line in (root / "etc/sysctl.d/60-hubwatch-ping.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines == [f"net.ipv4.ping_group_range = {lo} {hi}"]


@pytest.mark.parametrize("args, message", [
    (["--hub", "Gilgit SCO", "--broker", "mqtt://b"], "hub id 'Gilgit SCO' is not valid"),
    (["--hub", "-gilgit", "--broker", "mqtt://b"], "is not valid"),
    (["--hub", "a" * 64, "--broker", "mqtt://b"], "is not valid"),
    (["--hub", "gilgit", "--broker", "http://b:1883"], "use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
    (["--hub", "gilgit", "--broker", "mqtt://user:pw@b"], "no user or password in it"),
    (["--hub", "gilgit", "--broker", "mqtt://b:99999"], "invalid port"),
    (["--hub", "gilgit", "--broker", "mqtt://b", "--host", "GW 1"], "host 'GW 1' is not valid"),
    (["--broker", "mqtt://b"], "--hub is required"),
    (["--hub", "gilgit"], "--broker is required"),
    (["--hub", "gilgit", "--broker", "mqtt://b", "--frobnicate"], "unknown argument"),
])
def test_bad_input_exits_2_with_a_clear_error(tmp_path, args, message):
    result = run_installer(*args, "--prefix", str(tmp_path), password="x", check=False, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is installed when the arguments are wrong"


def test_no_password_exits_2(tmp_path):
    result = run_installer("--hub", "gilgit", "--broker", "mqtt://b", "--prefix", str(tmp_path), check=False,
                           timeout=30)
    assert result.returncode == 2 and "HUBWATCH_MQTT_PASSWORD" in result.stderr


def test_password_file_option_and_help(tmp_path):
    assert "--uninstall" in run_installer("--help").stdout
    secret = tmp_path / "secret"
    secret.write_text("")
    result = run_installer("--hub", "gilgit", "--broker", "mqtt://b", "--password-file", str(secret),
                           "--prefix", str(tmp_path / "root"), check=False, timeout=30)
    assert result.returncode == 2 and "password is empty" in result.stderr


# --- these change the module's install: keep them last ---------------------------------------------
def test_rerun_upgrades_the_program_and_keeps_config_password_and_outbox(installed, tmp_path):
    root, _ = installed
    config = root / "etc/hubwatch/agent.yaml"
    password = root / "etc/hubwatch/mqtt.password"
    outbox = root / "var/lib/hubwatch/outbox.db"
    edited = config.read_text().replace("interval: 10s", "interval: 30s") + "# edited on site\n"
    config.write_text(edited)
    outbox.write_bytes(b"SQLite format 3\x00 pretend samples")
    # a damaged install: a module of the program gone missing
    site = next((root / "opt/hubwatch/venv/lib").glob("python3*/site-packages"))
    (site / "agent" / "wire.py").unlink()
    unit = root / "etc/systemd/system/hubwatch-agent.service"
    unit.write_text("stale")

    args = ["--hub", HUB, "--broker", "mqtt://other.example:1883", "--host", HOST, "--python", PYTHON,
            "--prefix", str(root)] + (["--user", ACCOUNT] if ACCOUNT else [])
    result = run_installer(*args, password="a different password")
    assert "upgrading" in result.stdout
    assert config.read_text() == edited
    assert password.read_text() == PASSWORD + "\n"
    assert "kept the existing" in result.stdout and "differs" in result.stdout
    assert "a different password" not in result.stdout + result.stderr
    assert outbox.read_bytes() == b"SQLite format 3\x00 pretend samples"
    assert (site / "agent" / "wire.py").exists()  # the venv was upgraded in place
    assert unit.read_text() != "stale"            # and the unit replaced
    check = subprocess.run([str(root / "opt/hubwatch/venv/bin/hubwatch-agent"), "--check", "-c",
                            str(prefixed_copy(root, tmp_path / "a.yaml"))], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_uninstall_keeps_config_and_outbox_then_purge_removes_them(installed):
    root, _ = installed
    run_installer("--uninstall", "--prefix", str(root))
    assert not (root / "etc/systemd/system/hubwatch-agent.service").exists()
    assert not (root / "etc/sysctl.d/60-hubwatch-ping.conf").exists()
    assert not (root / "opt/hubwatch").exists()
    assert (root / "etc/hubwatch/agent.yaml").exists() and (root / "etc/hubwatch/mqtt.password").exists()
    assert (root / "var/lib/hubwatch/outbox.db").exists()
    run_installer("--uninstall", "--purge", "--prefix", str(root))
    assert not (root / "etc/hubwatch").exists() and not (root / "var/lib/hubwatch").exists()
