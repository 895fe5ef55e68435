"""The durable outbox on its own: batching and seqs, acks, the cap, corrupt files, the clock."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from agent import wire
from agent.clock import ClockGuard, Reading
from agent.outbox import Outbox, OutboxError, read_stats
from agent.wire import Sample

HUB, HOST = "gilgit-sco-01", "gw01"
BOOT = "6c1f6b0e-0000-4000-8000-000000000001"
DAY_NS = 86400 * 10**9


def reading(trusted: bool = True, boot_id: str = BOOT, offset_ns: int = 0) -> Reading:
    boottime = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return Reading(time.time_ns() + offset_ns, boottime, boot_id, trusted)


def net_samples(n: int, start: int = 0, t0: int | None = None, pad: int = 0) -> list[Sample]:
    t0 = time.time_ns() if t0 is None else t0
    return [Sample("net", t0 + i, {"hub": HUB, "host": HOST, "iface": f"eth{(start + i) % 4}"},
                   {"rx_bytes_total": start + i, "tx_bytes_total": 2 * (start + i), "link_up": True,
                    **({"speed_mbps": float(pad)} if pad else {})}) for i in range(n)]


def drain(outbox: Outbox, r: Reading | None = None) -> list[wire.Envelope]:
    """Pack everything and return the messages' envelopes, in seq order."""
    while outbox.pack(r or reading(), force=True):
        pass
    return [wire.decode(m.payload) for m in outbox.messages_after(0, 10**6)]


def keys(samples) -> set[tuple]:
    return {(s.measurement, tuple(sorted(s.tags.items())), s.time_ns) for s in samples}


def test_batches_carry_every_sample_once_with_contiguous_seqs_that_survive_a_restart(tmp_path):
    path = tmp_path / "outbox.db"
    taken = []
    with Outbox(path, HUB, HOST, batch_max_samples=100, batch_max_bytes=8 * 1024) as outbox:
        for cycle in range(25):
            batch = net_samples(37, start=cycle * 37)
            taken += batch
            outbox.add(batch, reading())
        envelopes = drain(outbox)
        seqs = [e.seq for e in envelopes]
        assert seqs == list(range(1, len(seqs) + 1))
        assert all(len(e.samples) <= 100 for e in envelopes)
        assert all(len(wire.encode(e, compress=False)) <= 8 * 1024 + 200 for e in envelopes)
        got = [s for e in envelopes for s in e.samples]
        assert len(got) == len(taken) and keys(got) == keys(taken)
        assert all(e.hub == HUB and e.host == HOST for e in envelopes)
        stored = {m.seq: m.payload for m in outbox.messages_after(0, 10**6)}
        acked = outbox.ack([(1, 3), (5, 5)])
        assert acked == [1, 2, 3, 5]
        assert outbox.stats().last_acked_seq == 5
        last = seqs[-1]
    # After a restart: the unacked messages are byte-for-byte the same, and seq goes on.
    with Outbox(path, HUB, HOST) as outbox:
        again = {m.seq: m.payload for m in outbox.messages_after(0, 10**6)}
        assert again == {s: p for s, p in stored.items() if s not in (1, 2, 3, 5)}
        outbox.add(net_samples(3, start=10_000), reading())
        assert outbox.pack(reading()) == [(last + 1, "metrics")]
        stats = outbox.stats()
        assert stats.samples == len(taken) - sum(len(e.samples) for e in envelopes if e.seq in (1, 2, 3, 5)) + 3
        assert stats.counters["messages_acked_total"] == 4


def test_payload_is_zlib_only_when_that_is_smaller(tmp_path):
    with Outbox(tmp_path / "o.db", HUB, HOST) as outbox:
        outbox.add(net_samples(1), reading())
        outbox.add(net_samples(200, start=1), reading())
        outbox.pack(reading(), force=True)
        [message] = outbox.messages_after(0, 10)  # both commits went into one message
        envelope = wire.decode(message.payload)
        plain = wire.encode(envelope, compress=False)
        assert message.payload[:1] != b"{" and len(message.payload) < len(plain) / 4
    tiny = wire.Envelope(HUB, HOST, 1, 1.5, (Sample("battery", 1, {}, {"plugged": True}),))
    assert wire.encode(tiny)[:1] == b"{" or len(wire.encode(tiny)) < len(wire.encode(tiny, compress=False))


def test_metrics_wait_for_age_or_size_but_events_go_at_once(tmp_path):
    with Outbox(tmp_path / "o.db", HUB, HOST, batch_max_samples=50, batch_max_age_s=60) as outbox:
        outbox.add(net_samples(10), reading())
        assert outbox.pack(reading()) == []           # neither old nor big enough
        outbox.add(net_samples(1, start=99), reading(), kind="events")
        assert outbox.pack(reading()) == [(1, "events")]
        outbox.add(net_samples(45, start=10), reading())
        made = outbox.pack(reading())                  # 55 >= 50: due
        assert [k for _, k in made] == ["metrics", "metrics"]
        assert outbox.pack(reading()) == []


def test_metrics_that_cannot_be_sent_wait_until_they_fill_a_batch(tmp_path):
    with Outbox(tmp_path / "o.db", HUB, HOST, batch_max_samples=50) as outbox:  # batch_max_age 0
        outbox.add(net_samples(30), reading())
        assert outbox.pack(reading(), metrics=False) == []                 # the link is down: they wait
        outbox.add(net_samples(45, start=30), reading())
        assert outbox.pack(reading(), metrics=False) == [(1, "metrics")]   # one full batch, the rest waits
        assert outbox.stats().pending == 25
        outbox.add(net_samples(1, start=99), reading(), kind="events")
        assert outbox.pack(reading(), metrics=False) == [(2, "events")]    # power events go at once
        assert outbox.pack(reading()) == [(3, "metrics")]                  # the link is back
        sizes = [len(wire.decode(m.payload).samples) for m in outbox.messages_after(0, 10)]
        assert sizes == [50, 1, 25]


def test_the_cap_keeps_the_file_within_max_mb_and_counts_every_dropped_sample(tmp_path):
    path = tmp_path / "outbox.db"
    cap_mb = 1.0
    taken = 0
    largest = 0
    with Outbox(path, HUB, HOST, max_mb=cap_mb, batch_max_samples=200) as outbox:
        for cycle in range(300):  # about 4 MB of hardly compressible samples, the broker down
            batch = [Sample(s.measurement, s.time_ns, s.tags, {**s.fields, "noise": os.urandom(96).hex()})
                     for s in net_samples(50, start=taken)]
            taken += outbox.add(batch, reading())
            if cycle % 5 == 0:
                outbox.pack(reading(), force=True)
            largest = max(largest, outbox.file_bytes())
        stats = outbox.stats()
        assert stats.counters["dropped_samples_total"] > 0
        assert stats.counters["dropped_samples_total"] == taken - stats.samples
        kept = [s for e in drain(outbox) for s in e.samples]
        assert len(kept) == stats.samples
        # what is kept is the newest: the oldest went first
        assert min(s.fields["rx_bytes_total"] for s in kept) == taken - len(kept)
    assert largest <= cap_mb * 2**20 * 1.10, f"outbox grew to {largest} bytes"
    print(f"largest outbox file: {largest} bytes for a cap of {cap_mb * 2**20:.0f}")
    assert read_stats(path).counters["dropped_samples_total"] == taken - len(kept)


def _fill(path: Path, n: int, packed: int = 0) -> list[Sample]:
    """An outbox holding n samples (the first ``packed`` of them in messages), closed cleanly."""
    taken = []
    with Outbox(path, HUB, HOST, batch_max_samples=100) as outbox:
        if packed:
            first = net_samples(packed, pad=1)
            outbox.add(first, reading())
            outbox.pack(reading(), force=True)
            taken += first
        for i in range(packed, n, 100):
            batch = net_samples(min(100, n - i), start=i, pad=2)
            outbox.add(batch, reading())
            taken += batch
    return taken


def _recovered(outbox: Outbox) -> list[Sample]:
    return [s for e in drain(outbox) for s in e.samples]


def test_a_truncated_outbox_is_set_aside_and_what_can_be_read_is_kept(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    taken = _fill(path, 3000, packed=1000)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)
    with Outbox(path, HUB, HOST) as outbox:
        [q] = outbox.quarantined
        assert q.moved_to.exists() and q.moved_to.name.startswith("outbox.db.corrupt-")
        assert q.lost is not None and q.recovered + q.lost == len(taken)
        recovered = _recovered(outbox)
        assert len(recovered) == q.recovered and keys(recovered) <= keys(taken)
        assert outbox.stats().counters["lost_samples_total"] == q.lost
        # the fresh outbox works and its seqs go on past the old ones
        outbox.add(net_samples(5, start=50_000), reading())
        assert outbox.pack(reading(), force=True)[0][0] > 10
    assert "could not be recovered" in caplog.text and q.moved_to.name in caplog.text


def test_damaged_pages_in_the_middle_lose_only_what_they_held(tmp_path):
    path = tmp_path / "outbox.db"
    taken = _fill(path, 4000)
    size = path.stat().st_size
    rng = random.Random(7)
    with open(path, "r+b") as f:  # scribble over a few pages in the middle
        for page in rng.sample(range(size // 4096 // 3, size // 4096 * 2 // 3), 4):
            f.seek(page * 4096)
            f.write(rng.randbytes(4096))
    with Outbox(path, HUB, HOST) as outbox:
        [q] = outbox.quarantined
        assert 0 < q.recovered < len(taken)
        assert q.recovered + q.lost == len(taken)
        recovered = _recovered(outbox)
        assert keys(recovered) <= keys(taken) and len(recovered) == q.recovered


def test_random_bytes_are_set_aside_with_an_unknown_count_and_a_fresh_outbox_starts(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    path.write_bytes(random.Random(1).randbytes(300_000))
    with Outbox(path, HUB, HOST) as outbox:
        [q] = outbox.quarantined
        assert q.recovered == 0 and q.lost is None
        outbox.add(net_samples(3), reading())
        [(seq, _)] = outbox.pack(reading())
        assert seq > 1_000_000_000  # seq unknown: started past any earlier one, never reused
    assert "an unknown number" in caplog.text
    assert (tmp_path / q.moved_to.name).read_bytes()[:100] == random.Random(1).randbytes(100)
    # and it opens cleanly the next time
    with Outbox(path, HUB, HOST) as outbox:
        assert outbox.quarantined == [] and outbox.stats().samples == 3


def test_a_foreign_sqlite_file_is_not_overwritten(tmp_path):
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE important (x)")
    conn.commit()
    conn.close()
    with Outbox(path, HUB, HOST) as outbox:
        [q] = outbox.quarantined
        assert "not a hubwatch outbox" in q.reason
    assert sqlite3.connect(q.moved_to).execute("SELECT name FROM sqlite_master").fetchall() == [("important",)]


def test_only_the_newest_quarantined_files_are_kept(tmp_path):
    path = tmp_path / "outbox.db"
    for i in range(5):
        path.write_bytes(b"garbage" * 1000)
        Outbox(path, HUB, HOST).close()
        time.sleep(0.01)
    kept = [p for p in tmp_path.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 3


def test_a_second_agent_on_the_same_outbox_is_refused(tmp_path):
    with Outbox(tmp_path / "o.db", HUB, HOST):
        with pytest.raises(OutboxError, match="in use by another hubwatch-agent"):
            Outbox(tmp_path / "o.db", HUB, HOST)


def test_status_reads_the_outbox_while_it_is_open(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path, HUB, HOST) as outbox:
        outbox.add(net_samples(7), reading())
        outbox.pack(reading())
        outbox.ack([(1, 1)])
        outbox.add(net_samples(4), reading())
        stats = read_stats(path)
        assert (stats.samples, stats.messages, stats.pending, stats.last_acked_seq) == (4, 0, 4, 1)
        assert stats.oldest_t_ns is not None and stats.file_bytes > 0
    with pytest.raises(OutboxError, match="no outbox"):
        read_stats(tmp_path / "missing.db")


# --- the clock ---------------------------------------------------------------------------------

class SteppedClock:
    """A clock seam: the real boot-time clock, a wall clock ``offset_ns`` off, settable sync."""

    def __init__(self, offset_ns: int, synced: bool | None, boot_id: str = BOOT):
        self.offset_ns = offset_ns
        self.is_synced = synced
        self._boot_id = boot_id

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def boottime_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def synced(self):
        return self.is_synced

    def boot_id(self) -> str:
        return self._boot_id


def test_samples_taken_on_a_wrong_clock_are_held_then_get_their_true_time(tmp_path):
    clock = SteppedClock(-3 * DAY_NS, synced=False)
    guard = ClockGuard(clock, require_sync=True, max_step_s=1, settle_s=30)
    with Outbox(tmp_path / "o.db", HUB, HOST) as outbox:
        true_times = []
        for i in range(5):
            r = guard.read()
            assert not r.trusted
            outbox.add([Sample("system", clock.wall_ns(), {"hub": HUB, "host": HOST}, {"load1": float(i)})], r)
            true_times.append(time.time_ns())
            assert outbox.pack(r, force=True) == []  # nothing goes out on a known-wrong clock
            time.sleep(0.02)
        clock.offset_ns, clock.is_synced = 0, True   # NTP steps the clock
        r = guard.read()
        assert r.trusted and guard.jumps == 1
        [envelope] = drain(outbox, r)
        for sample, true in zip(envelope.samples, true_times):
            assert abs(sample.time_ns - true) < 50_000_000  # within 50 ms of when it was taken


def test_a_jump_without_sync_information_holds_samples_until_the_clock_settles():
    clock = SteppedClock(0, synced=None)
    guard = ClockGuard(clock, require_sync="auto", max_step_s=1, settle_s=0.2)
    assert guard.read().trusted
    clock.offset_ns = 5 * 10**9
    assert not guard.read().trusted
    time.sleep(0.25)
    assert guard.read().trusted


def test_auto_requires_sync_only_on_a_machine_seen_synchronised():
    clock = SteppedClock(0, synced=False)
    assert ClockGuard(clock, require_sync="auto").read().trusted
    assert not ClockGuard(clock, require_sync="auto", seen_synced=True).read().trusted
    assert ClockGuard(clock, require_sync=False, seen_synced=True).read().trusted


def test_samples_of_a_boot_that_ended_before_its_clock_was_trusted(tmp_path):
    """Kept at their recorded time when it is possible, dropped and counted when it cannot be."""
    with Outbox(tmp_path / "o.db", HUB, HOST) as outbox:
        now = time.time_ns()
        old_boot = Reading(now - DAY_NS, 5 * 10**9, "old-boot", False)
        good = Sample("system", now - DAY_NS, {"hub": HUB, "host": HOST}, {"load1": 1.0})
        future = Sample("system", now + DAY_NS, {"hub": HUB, "host": HOST}, {"load1": 2.0})
        outbox.add([good, future], old_boot)
        [envelope] = drain(outbox, reading())
        assert [s.fields["load1"] for s in envelope.samples] == [1.0]
        assert envelope.samples[0].time_ns == good.time_ns
        assert outbox.stats().counters["time_unknown_samples_total"] == 1
        assert outbox.stats().samples == 1
