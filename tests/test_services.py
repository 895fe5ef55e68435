"""The service fixtures themselves: each real program starts, talks to a real client,
keeps what it should across restarts, enforces auth, and is gone when its fixture ends."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest
from influxdb_client import InfluxDBClient, Point
from influxdb_client.client.write_api import SYNCHRONOUS

from tests.services.common import ServiceError
from tests.services.influx import InfluxError
from tests.services.mosquitto import MqttClient, MqttRefused, Subscriber

pytestmark = pytest.mark.services
pytest_plugins = ["pytester"]

NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87
NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 reason code 0x10, not a failure

HUB_ACL = """
user hub1
topic write hubwatch/v1/hub1/#
topic read hubwatch/v1/hub1/+/ack

user collector
topic read hubwatch/v1/#
"""


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- mosquitto ---------------------------------------------------------------------------

def test_mosquitto_delivers_a_qos1_message(mosquitto):
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    with Subscriber(mosquitto, "hubwatch/v1/+/+/metrics") as subscriber, mosquitto.client() as publisher:
        assert publisher.publish("hubwatch/v1/hub1/gw01/metrics", b'{"v": 1}', qos=1).value == 0
        [message] = subscriber.messages(timeout=5)
    assert (message.topic, message.payload, message.qos) == ("hubwatch/v1/hub1/gw01/metrics", b'{"v": 1}', 1)


def test_queued_message_for_persistent_session_survives_broker_restart(mosquitto):
    session = dict(client_id="collector-1", clean_start=False, session_expiry=300)
    Subscriber(mosquitto, "hubwatch/v1/#", **session).close()  # subscribed, then away
    with mosquitto.client() as publisher:
        assert publisher.publish("hubwatch/v1/hub1/gw01/metrics", b"queued", qos=1).value == 0
    old_pid = mosquitto.pid

    mosquitto.stop()
    assert process_gone(old_pid)
    mosquitto.start()

    assert mosquitto.pid != old_pid
    with mosquitto.client(**session) as collector:  # no new SUBSCRIBE: the session has it
        assert collector.session_present
        [message] = collector.messages(timeout=5)
    assert (message.topic, message.payload) == ("hubwatch/v1/hub1/gw01/metrics", b"queued")


def test_queued_message_survives_a_broker_crash_after_autosave(mosquitto):
    session = dict(client_id="collector-1", clean_start=False, session_expiry=300)
    Subscriber(mosquitto, "hubwatch/v1/#", **session).close()
    with mosquitto.client() as publisher:
        assert publisher.publish("hubwatch/v1/hub1/gw01/events", b"on battery", qos=1).value == 0
    mosquitto.wait_saved()
    mosquitto.kill()
    mosquitto.start()
    with mosquitto.client(**session) as collector:
        assert [m.payload for m in collector.messages(timeout=5)] == [b"on battery"]


def test_killed_broker_starts_again_on_the_same_port(mosquitto):
    port, old_pid = mosquitto.port, mosquitto.pid
    mosquitto.kill()
    assert process_gone(old_pid)
    with pytest.raises(OSError):
        MqttClient(mosquitto).close()
    mosquitto.start()
    assert mosquitto.port == port
    with mosquitto.client() as client:
        # nobody subscribed: mosquitto says 16 "No matching subscribers", a success code
        acked = client.publish("any/topic", b"x")
    assert (acked.value, acked.is_failure) == (NO_MATCHING_SUBSCRIBERS, False)


def test_wrong_password_is_refused(mosquitto_factory):
    broker = mosquitto_factory(users={"hub1": "right-secret"})
    with broker.client("gw01", username="hub1", password="right-secret") as client:
        assert client.connected
    with pytest.raises(MqttRefused) as refused:
        broker.client("gw01", username="hub1", password="wrong-secret")
    # mosquitto 2.0.11 answers MQTT 5 clients "Not authorized", not 134 "Bad user name or password"
    assert refused.value.reason_code.value == NOT_AUTHORIZED
    with pytest.raises(MqttRefused):
        broker.client("anonymous")


def test_acl_refuses_publishing_outside_the_hubs_topic(mosquitto_factory):
    broker = mosquitto_factory(users={"hub1": "h1", "collector": "c"}, acl=HUB_ACL)
    with broker.subscriber("hubwatch/v1/#", username="collector", password="c") as collector, \
            broker.client("hub1-gw01", username="hub1", password="h1") as hub:
        # granted although the ACL lets hub1 read only its ack topic: delivery is what is filtered
        assert hub.subscribe("hubwatch/v1/#", qos=1).value == 1
        assert hub.publish("hubwatch/v1/hub1/gw01/metrics", b"own", qos=1).value == 0
        assert hub.publish("hubwatch/v1/hub2/gw01/metrics", b"forged", qos=1).value == NOT_AUTHORIZED
        assert hub.connected  # refused publish, kept connection
        assert hub.publish("hubwatch/v1/hub1/gw01/events", b"after", qos=1).value == 0
        received = collector.messages(timeout=5, count=2)
        assert hub.messages(timeout=0.2) == []  # not even its own metrics: no read access
    assert [(m.topic, m.payload) for m in received] == [
        ("hubwatch/v1/hub1/gw01/metrics", b"own"), ("hubwatch/v1/hub1/gw01/events", b"after")]


def test_broken_config_fails_with_the_brokers_own_words(mosquitto_factory):
    with pytest.raises(ServiceError, match="no_such_option"):
        mosquitto_factory(extra_config=["no_such_option 1"])


# --- influxd 1.x -------------------------------------------------------------------------

def test_influx_write_then_query(influx):
    db = influx.create_database("hubwatch")
    influx.write(db, [
        'ups,hub=hub1,host=gw01,ups=hubups battery_charge_percent=80.5,status="OB DISCHRG",on_battery=true 1000000000',
        'ups,hub=hub2,host=gw01,ups=hubups battery_charge_percent=20.0,on_battery=false 2000000000',
    ])
    rows = influx.rows("SELECT battery_charge_percent, status, on_battery FROM ups GROUP BY hub", db=db)
    assert rows == [
        {"name": "ups", "hub": "hub1", "time": 1000000000, "battery_charge_percent": 80.5,
         "status": "OB DISCHRG", "on_battery": True},
        {"name": "ups", "hub": "hub2", "time": 2000000000, "battery_charge_percent": 20.0,
         "status": None, "on_battery": False},
    ]
    assert influx.fresh_database() != influx.fresh_database()
    with pytest.raises(InfluxError, match="field type conflict"):
        influx.write(db, 'ups,hub=hub1 battery_charge_percent="full" 3000000000')


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_influx_keeps_data_across_restart(influx, how):
    db = influx.create_database("hubwatch")
    influx.write(db, "net,hub=hub1,iface=eth0 rx_bytes_total=42i 1000000000")
    old_pid = influx.pid
    getattr(influx, how)()
    assert process_gone(old_pid)
    influx.start()
    assert influx.rows("SELECT rx_bytes_total FROM net", db=db) == [
        {"name": "net", "time": 1000000000, "rx_bytes_total": 42}]


def test_influx_with_auth_refuses_anonymous_requests(influx_factory):
    server = influx_factory(auth=True)
    db = server.create_database("hubwatch")
    server.write(db, "system,hub=hub1 cpu_percent=3.5 1000000000")
    assert server.rows("SELECT cpu_percent FROM system", db=db)[0]["cpu_percent"] == 3.5
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/query?db={db}&q=SELECT+*+FROM+system", timeout=5)
    refused.value.close()
    assert refused.value.code == 401


# --- victoria-metrics --------------------------------------------------------------------

def test_victoria_takes_influxdb_v2_writes_from_influxdb_client(victoria):
    now_ns = time.time_ns()
    with InfluxDBClient(url=victoria.url, token="x", org="o") as client:
        write = client.write_api(write_options=SYNCHRONOUS)
        write.write("b", record=f'ups,hub=hub1,ups=hubups battery_charge_percent=80.5,on_battery=true,'
                                f'status="OB" {now_ns}')
        write.write("b", record=Point("ups").tag("hub", "hub2").field("battery_charge_percent", 12.0).time(now_ns))

    series = victoria.wait_export('{__name__=~"ups_.*"}', count=4)
    stored = {(s["metric"]["__name__"], s["metric"]["hub"]): (s["values"], s["timestamps"]) for s in series}
    now_ms = now_ns // 1_000_000
    assert stored == {
        ("ups_battery_charge_percent", "hub1"): ([80.5], [now_ms]),
        ("ups_battery_charge_percent", "hub2"): ([12], [now_ms]),
        ("ups_on_battery", "hub1"): ([1], [now_ms]),
        ("ups_status", "hub1"): ([0], [now_ms]),  # VictoriaMetrics keeps no strings
    }
    result = victoria.wait_query('ups_battery_charge_percent{hub="hub1"}')
    assert [float(r["value"][1]) for r in result] == [80.5]


# --- clean-up ----------------------------------------------------------------------------

def test_fixtures_leave_no_process_behind(pytester, tmp_path):
    pids_file = tmp_path / "pids.json"
    pytester.makepyfile(f"""
        import json

        def record(*services):
            with open({str(pids_file)!r}, "a") as out:
                for service in services:
                    assert service.running
                    out.write(json.dumps(service.pid) + "\\n")

        def test_every_fixture(mosquitto, mosquitto_factory, influx, victoria):
            record(mosquitto, mosquitto_factory(users={{"u": "p"}}), influx, victoria)

        def test_failing_test_still_cleans_up(mosquitto, influx_factory, victoria_factory):
            record(mosquitto, influx_factory(auth=True), victoria_factory())
            raise AssertionError("deliberate")
    """)
    recorder = pytester.inline_run("-p", "tests.services.mosquitto", "-p", "tests.services.influx",
                                  "-p", "tests.services.victoria")
    recorder.assertoutcome(passed=1, failed=1)
    pids = [json.loads(line) for line in pids_file.read_text().splitlines()]
    assert len(pids) == 7
    assert [pid for pid in pids if not process_gone(pid)] == []
