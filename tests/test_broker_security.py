"""The shipped broker config (config/mosquitto/) on a real mosquitto: per-machine accounts,
ACL confinement, no client-id takeover, no anonymous clients; the collector reads it all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import wire
from tests.collector_harness import envelope, start_collector, ups_samples, wait_for
from tests.services.mosquitto import MqttRefused

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "mosquitto" / "hubwatch.conf"
NOT_AUTHORIZED = 135
# Lines the test harness sets itself (its own port, temp dirs, no TLS certificates here).
HARNESS_KEYS = ("listener", "persistence_location", "password_file", "acl_file", "allow_anonymous",
                "certfile", "keyfile", "cafile", "tls_version", "persistence", "autosave_interval")


def account(accounts_dir: Path, *args: str, password: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "broker-account.py"), "--dir", str(accounts_dir), *args],
                   check=True, capture_output=True, env={**os.environ, "HUBWATCH_PASSWORD": password})


@pytest.fixture
def secured(tmp_path, mosquitto_factory):
    accounts = tmp_path / "accounts"
    account(accounts, "add-machine", "hub-a", "gw01", password="pw-a")
    account(accounts, "add-machine", "hub-b", "gw01", password="pw-b")
    account(accounts, "add-collector", "c1", password="pw-c")
    shipped = [l for l in SHIPPED.read_text().splitlines()
               if l.strip() and not l.startswith("#") and l.split()[0] not in HARNESS_KEYS]
    assert "use_username_as_clientid true" in shipped
    return mosquitto_factory(allow_anonymous=False, extra_config=shipped + [
        f"password_file {accounts / 'passwd'}", f"acl_file {accounts / 'acl'}"])


def t(hub, kind, host="gw01"):
    return wire.topic("hubwatch", hub, host, kind)


def test_a_hub_publishes_only_as_itself(secured):
    with secured.client(username="hub-a.gw01", password="pw-a") as hub_a:
        assert hub_a.publish(t("hub-a", "metrics"), b"{}").is_failure is False
        assert hub_a.publish(t("hub-a", "status"), b"online", retain=True).is_failure is False
        assert hub_a.publish(t("hub-b", "metrics"), b"{}").value == NOT_AUTHORIZED
        assert hub_a.publish(t("hub-a", "metrics", host="lab01"), b"{}").value == NOT_AUTHORIZED
        assert hub_a.publish(t("hub-b", "ack"), b"{}").value == NOT_AUTHORIZED
        assert hub_a.publish("hubwatch/alerts/hub-b", b"{}").value == NOT_AUTHORIZED


def test_a_hub_reads_only_its_own_acks(secured):
    with secured.client(username="hub-a.gw01", password="pw-a") as hub_a, \
            secured.client(username="hubwatch-collector-c1", password="pw-c") as collector:
        hub_a.subscribe(t("hub-a", "ack"))
        hub_a.subscribe(t("hub-b", "ack"))  # mosquitto grants it but delivers nothing the ACL denies
        hub_a.subscribe("hubwatch/v1/+/+/metrics")
        collector.publish(t("hub-b", "ack"), b"for b")
        collector.publish(t("hub-a", "ack"), b"for a")
        with secured.client(username="hub-b.gw01", password="pw-b") as hub_b:
            hub_b.publish(t("hub-b", "metrics"), b"b's data")
        got = [(m.topic, m.payload) for m in hub_a.messages(timeout=2, count=3)]
    assert got == [(t("hub-a", "ack"), b"for a")]


def test_a_hub_cannot_take_over_another_hubs_session(secured):
    with secured.client("hub-b.gw01", username="hub-b.gw01", password="pw-b") as hub_b:
        with secured.client("hub-b.gw01", username="hub-a.gw01", password="pw-a") as impostor:
            time.sleep(0.5)
            assert hub_b.connected, "hub B was disconnected by a client claiming its client id"
            assert impostor.publish(t("hub-b", "metrics"), b"{}").value == NOT_AUTHORIZED


def test_anonymous_and_wrong_passwords_are_refused(secured):
    with pytest.raises(MqttRefused):
        secured.client()
    with pytest.raises(MqttRefused):
        secured.client(username="hub-a.gw01", password="pw-b")


def test_the_collector_reads_everything_it_needs(tmp_path, secured, influx):
    start_collector(tmp_path, secured, influx, username="hubwatch-collector-c1", password="pw-c")
    now = time.time_ns()
    with secured.client(username="hub-a.gw01", password="pw-a") as hub_a:
        hub_a.subscribe(t("hub-a", "ack"))
        hub_a.publish(t("hub-a", "metrics"), envelope("hub-a", "gw01", 1, ups_samples(3, now)))
        hub_a.publish(t("hub-a", "events"), envelope("hub-a", "gw01", 2, ups_samples(1, now + 10**6)))
        hub_a.publish(t("hub-a", "status"), b"online", retain=True)
        acked: set[int] = set()
        deadline = time.monotonic() + 10
        while acked != {1, 2} and time.monotonic() < deadline:
            for m in hub_a.messages(timeout=1):
                acked |= {s for first, last in wire.decode_ack(m.payload) for s in range(first, last + 1)}
    assert acked == {1, 2}
    wait_for(lambda: influx.rows("SELECT count(battery_charge_percent) AS n FROM ups", db="hubwatch")
             and influx.rows("SELECT count(battery_charge_percent) AS n FROM ups", db="hubwatch")[0]["n"] == 4,
             10, "4 ups points")
    wait_for(lambda: influx.rows("SELECT * FROM status", db="hubwatch"), 10, "status point")


def test_removing_an_account(tmp_path):
    accounts = tmp_path / "acc"
    account(accounts, "add-machine", "hub-a", "gw01", password="x")
    account(accounts, "add-machine", "hub-a", "gw02", password="y")
    subprocess.run([sys.executable, str(REPO / "scripts" / "broker-account.py"), "--dir", str(accounts),
                    "remove", "hub-a.gw01"], check=True, capture_output=True)
    acl = (accounts / "acl").read_text()
    assert "user hub-a.gw01" not in acl and "user hub-a.gw02" in acl
    assert [l.split(":")[0] for l in (accounts / "passwd").read_text().splitlines()] == ["hub-a.gw02"]
    assert oct((accounts / "passwd").stat().st_mode & 0o777) == "0o600"
