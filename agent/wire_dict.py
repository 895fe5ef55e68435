"""The preset dictionary for the wire's zlib streams (RFC 1950 FDICT): bytes that look like
an envelope (header keys, then one sample of each agent measurement with every catalogue
field and tag), so that even a one-cycle message compresses its names as back-references.

Frozen: a payload compressed with a dictionary names it only by its adler32 (``DICT_ID``), and
a reader needs exactly these bytes to inflate it. Never edit ``DICTIONARY_V1``; a better one
is added beside it as ``DICTIONARY_V2`` and registered in ``DICTIONARIES``, so readers keep
accepting what older agents send. (Written once from agent/catalogue.py; new catalogue names
are simply not in it, which costs a few bytes, nothing more.) Most frequent strings come last:
zlib reaches the end of the dictionary with the shortest distances.
"""

from __future__ import annotations

import zlib

DICTIONARY_V1 = (
    b'{"v":1,"hub":"","host":"","seq":1,"sent_at":1795500000.0,"samples":[{"m":"battery","t":1'
    b'795500000000000000,"tags":{"hub":"","host":""},"f":{"charge_percent":0.0,"plugged":true,'
    b'"runtime_seconds":0.0}},{"m":"agent","t":1795500000000000000,"tags":{"hub":"","host":""}'
    b',"f":{"error":"","error_kind":"","outbox_samples":0.0,"outbox_messages":0.0,"outbox_byte'
    b's":0.0,"outbox_oldest_age_seconds":0.0,"dropped_samples_total":0,"lost_samples_total":0,'
    b'"time_unknown_samples_total":0,"probe_errors_total":0,"messages_published_total":0,"publ'
    b'ish_errors_total":0,"publish_rejected_total":0,"messages_resent_total":0,"messages_acked'
    b'_total":0,"mqtt_connected":true,"clock_trusted":true}},{"m":"ups","t":179550000000000000'
    b'0,"tags":{"ups":"","source":"nut","hub":"","host":""},"f":{"battery_charge_percent":0.0,'
    b'"battery_charge_low_percent":0.0,"battery_runtime_seconds":0.0,"battery_voltage_volts":0'
    b'.0,"input_voltage_volts":0.0,"input_frequency_hz":0.0,"output_voltage_volts":0.0,"load_p'
    b'ercent":0.0,"temperature_celsius":0.0,"realpower_watts":0.0,"status":"OL","on_line":true'
    b',"on_battery":true,"low_battery":true,"charging":true,"discharging":true,"replace_batter'
    b'y":true,"overload":true}},{"m":"ping","t":1795500000000000000,"tags":{"target":"internet'
    b'","address":"","hub":"","host":""},"f":{"rtt_avg_ms":0.0,"rtt_min_ms":0.0,"rtt_max_ms":0'
    b'.0,"loss_percent":0.0,"reachable":true,"method":"","error":""}},{"m":"net","t":179550000'
    b'0000000000,"tags":{"iface":"eth0","hub":"","host":""},"f":{"rx_bytes_total":0,"tx_bytes_'
    b'total":0,"rx_packets_total":0,"tx_packets_total":0,"rx_errors_total":0,"tx_errors_total"'
    b':0,"rx_drops_total":0,"tx_drops_total":0,"link_up":true,"speed_mbps":0.0}},{"m":"system"'
    b',"t":1795500000000000000,"tags":{"hub":"","host":""},"f":{"uptime_seconds":0.0,"boot_tim'
    b'e_seconds":0.0,"cpu_percent":0.0,"memory_used_percent":0.0,"load1":0.0,"disk_used_percen'
    b't":0.0,"clock_synced":true}},'
)

#: adler32 of each dictionary, as carried in the zlib header (FDICT) -> the dictionary.
DICTIONARIES: dict[int, bytes] = {zlib.adler32(DICTIONARY_V1): DICTIONARY_V1}
#: The dictionary the agent compresses with.
DICTIONARY = DICTIONARY_V1
DICT_ID = zlib.adler32(DICTIONARY)
