"""The durable outbox: every sample is committed here before anything tries to send it.

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the WAL is on the
disk, so a power cut loses nothing committed (``NORMAL`` would survive ``kill -9`` but may
roll back the last commits on power loss; measured cost of FULL in docs/delivery.md). The
agent writes one transaction per cycle.

Tables (schema version 1, ``PRAGMA application_id`` = 'hwob'):

``pending``
    samples not yet in a message: the sample without its time (``body``: ``{"m","tags","f"}``),
    its time ``t_ns``, and the clock reading taken when it was recorded (boot id, wall and
    boot-time clocks, trusted or not) so a time taken on a wrong clock can be fixed later.
``messages``
    envelopes ready to send: ``seq`` (one per message per hub/host, growing by one, never
    reused), ``kind`` (metrics/events), the encoded ``payload`` (sent again byte for byte,
    so redelivery is idempotent) and how many samples it carries. A message is deleted
    only when the collector's ack covering its seq arrives.
``meta``
    integers: ``next_seq`` (advanced in the transaction that assigns it), ``depth`` (samples
    held), ``last_acked_seq`` and the counters reported in the ``agent`` measurement
    (``dropped_samples_total`` at the cap, ``lost_samples_total`` from a corrupt outbox, ...).
``boots``
    per boot id: the boot's trusted clock offset (wall - boottime) once known, and the
    latest trusted wall time known before the boot began (a floor for its samples' times).

Bounded by ``max_mb`` (database + WAL): at the cap the oldest rows (pending samples or whole
messages, whichever is older) are deleted first and each sample dropped is counted.

A torn or corrupt file (truncated, random bytes, failed ``PRAGMA quick_check``) is renamed
aside with a UTC time stamp; whatever rows can still be read and verified are carried into a
fresh outbox, and the number of samples that could not be recovered is logged and counted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from agent import wire
from agent.clock import Reading, corrected_time
from agent.wire import Envelope, Sample, WireError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
APPLICATION_ID = 0x68776F62  # "hwob"
KINDS = ("metrics", "events")
#: Quarantined files kept beside the outbox; older ones are deleted so they cannot fill the disk.
KEEP_QUARANTINED = 3
#: Per-row bytes beyond the body that a sample costs in the database (ids, times, b-tree cells).
ROW_OVERHEAD = 96
#: Messages built in one transaction, so a big backlog is packed in bounded steps.
PACK_MESSAGES_PER_CALL = 64

#: Counters kept in ``meta``; each is reported in the ``agent`` measurement under this name.
COUNTERS = (
    "dropped_samples_total",       # deleted at the max_mb cap
    "lost_samples_total",          # could not be recovered from a corrupt outbox
    "time_unknown_samples_total",  # taken on a clock never trusted, with an impossible time
    "probe_errors_total",
    "messages_published_total",    # PUBACK with success
    "publish_errors_total",        # publish() refused by the client library (rc != 0)
    "publish_rejected_total",      # PUBACK with a failure reason code (e.g. 135 not authorised)
    "messages_resent_total",
    "messages_acked_total",        # confirmed by the collector (in InfluxDB)
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    t_ns INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    wall_ns INTEGER NOT NULL,
    boottime_ns INTEGER NOT NULL,
    trusted INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_by_kind ON pending (kind, id);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    samples INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    oldest_t_ns INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS boots (
    boot_id TEXT PRIMARY KEY,
    offset_ns INTEGER,
    floor_ns INTEGER
) WITHOUT ROWID;
"""


class OutboxError(RuntimeError):
    """The outbox cannot be used at all (e.g. its directory is not writable, or another agent holds it)."""


@dataclass(frozen=True)
class Quarantine:
    """A corrupt outbox that was set aside."""

    moved_to: Path
    reason: str
    recovered: int
    lost: int | None  # None: the file was unreadable, so nobody can say how many


@dataclass(frozen=True)
class Message:
    seq: int
    kind: str
    payload: bytes
    samples: int


@dataclass(frozen=True)
class OutboxStats:
    samples: int           # samples held (pending + in messages)
    pending: int           # not yet in a message
    messages: int          # messages waiting for the collector's ack
    file_bytes: int        # database + WAL on disk
    oldest_t_ns: int | None
    last_acked_seq: int | None
    next_seq: int
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Salvage:
    meta: dict[str, int] = field(default_factory=dict)
    boots: list[tuple] = field(default_factory=list)
    pending: list[tuple] = field(default_factory=list)
    messages: list[tuple] = field(default_factory=list)
    recovered: int = 0


def is_corruption(exc: BaseException) -> bool:
    """True for SQLite's "damaged file" errors, as opposed to busy, full or permission errors."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=5)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def sample_body(sample: Sample) -> str:
    """A sample without its time, as stored in ``pending.body``."""
    return json.dumps({"m": sample.measurement, "tags": dict(sample.tags), "f": dict(sample.fields)},
                      separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sample_from_body(body: str, t_ns: int) -> Sample:
    obj = json.loads(body)
    return Sample(obj["m"], t_ns, obj.get("tags", {}), obj["f"])


class Outbox:
    """The agent's durable queue. Used from one thread only (the agent's main loop)."""

    def __init__(self, path: str | os.PathLike[str], hub: str, host: str, *, max_mb: float = 256.0,
                 batch_max_samples: int = 1000, batch_max_bytes: int = 256 * 1024,
                 batch_max_age_s: float = 0.0):
        self.path = Path(path)
        self.hub = hub
        self.host = host
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.batch_max_samples = batch_max_samples
        self.batch_max_bytes = batch_max_bytes
        self.batch_max_age_ns = int(batch_max_age_s * 1e9)
        self.quarantined: list[Quarantine] = []
        self._staged: Counter[str] = Counter()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._page_size = 4096
        self._budget = self.max_bytes
        self._wal_limit = 4 * 2**20
        self.open()

    # --- opening, checking, quarantine -------------------------------------------------
    def open(self) -> None:
        """Open the outbox, setting a corrupt one aside; OutboxError when it cannot be used at all."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        self._take_lock()
        problem: str | None = None
        if self._exists():
            conn = None
            try:
                conn = _connect(self.path)
                self._configure(conn)
                problem = self._check(conn)
                if problem is None:
                    self._conn = conn
                    self._init_schema()
                    self._enforce_cap_txn()
                    return
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    if conn is not None:
                        conn.close()
                    self._conn = None
                    raise OutboxError(f"cannot open outbox {self.path}: {exc}") from None
                problem = str(exc)
            if conn is not None:
                conn.close()
            self._conn = None
            self._quarantine(problem or "unreadable")  # leaves a fresh outbox open
            return
        try:
            self._conn = self._configure(_connect(self.path))
            self._init_schema()
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot create outbox {self.path}: {exc}") from None

    def _exists(self) -> bool:
        for suffix in ("", "-wal"):
            p = Path(f"{self.path}{suffix}")
            if p.exists() and p.stat().st_size > 0:
                return True
        return False

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return
        lock_path = Path(f"{self.path}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(f"cannot open {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutboxError(f"{self.path} is in use by another hubwatch-agent") from None
            raise OutboxError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
        self._lock_fd = fd

    def _configure(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
        # FULL: the WAL is synced at every commit, so a committed sample survives a power cut.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA cell_size_check = ON")
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        # Keep the WAL small beside a small cap: checkpoint often and truncate it afterwards.
        wal_pages = max(16, min(1000, self.max_bytes // self._page_size // 8))
        conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit = {wal_pages * self._page_size}")
        self._wal_limit = wal_pages * (self._page_size + 24)
        # The database may use what the WAL (one limit, plus one big transaction) leaves.
        self._budget = max(self.max_bytes - 2 * self._wal_limit - 8 * self._page_size, 32 * self._page_size)
        return conn

    def _check(self, conn: sqlite3.Connection) -> str | None:
        """Why this file is not a usable outbox, or None when it is."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            return f"not a hubwatch outbox (application_id {app_id:#x})"
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            return f"written by a newer hubwatch (schema {version} > {SCHEMA_VERSION})"
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            return "quick_check: " + "; ".join(str(r) for r in result[:3])
        if app_id == APPLICATION_ID and not {"meta", "pending", "messages", "boots"} <= tables:
            return "tables are missing"
        return None

    def _init_schema(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('depth', 0)")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _quarantine(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        salvage = self._salvage(aside)
        expected = salvage.meta.get("depth")
        lost = None if expected is None else max(0, expected - salvage.recovered)
        self._conn = self._configure(_connect(self.path))
        self._init_schema()
        self._restore(salvage, lost)
        self.quarantined.append(Quarantine(aside, reason, salvage.recovered, lost))
        lost_text = "an unknown number (the file is unreadable)" if lost is None else str(lost)
        log.error("outbox %s is corrupt (%s): moved to %s; recovered %d samples, %s could not be "
                  "recovered; started a fresh outbox", self.path, reason, aside.name, salvage.recovered, lost_text)
        self._prune_quarantined()

    def _prune_quarantined(self) -> None:
        olds = sorted(self.path.parent.glob(f"{self.path.name}.corrupt-*"))
        mains = [p for p in olds if not p.name.endswith(("-wal", "-shm"))]
        for old in mains[:-KEEP_QUARANTINED]:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(f"{old}{suffix}")
                except OSError:
                    pass
            log.warning("deleted old quarantined outbox %s (keeping the newest %d)", old.name, KEEP_QUARANTINED)

    def _salvage(self, aside: Path) -> _Salvage:
        """Every row of a damaged outbox that can still be read and verified."""
        out = _Salvage()
        try:
            conn = sqlite3.connect(str(aside), isolation_level=None, timeout=1)
        except sqlite3.Error:
            return out
        try:
            try:
                # Lets SQLite read a file shorter than its header claims (a truncated outbox)
                # instead of refusing it whole; nothing is written to the damaged copy.
                conn.execute("PRAGMA writable_schema = ON")
            except sqlite3.Error:
                return out
            try:
                out.meta = {str(k): int(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            except (sqlite3.Error, ValueError, TypeError):
                pass
            try:
                out.boots = list(conn.execute("SELECT boot_id, offset_ns, floor_ns FROM boots"))
            except sqlite3.Error:
                pass
            seq_hint = out.meta.get("next_seq", 1) - 1
            id_hint = None
            try:
                row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'pending'").fetchone()
                id_hint = row[0] if row else None
            except sqlite3.Error:
                pass
            cols = "id, kind, t_ns, boot_id, wall_ns, boottime_ns, trusted, body"
            for row in _scan(conn, "pending", "id", cols, id_hint):
                try:
                    if row[1] not in KINDS:
                        continue
                    _sample_from_body(row[7], row[2])
                except (ValueError, KeyError, TypeError, WireError):
                    continue
                out.pending.append(row)
                out.recovered += 1
            cols = "seq, kind, samples, first_id, oldest_t_ns, created_ns, payload"
            for row in _scan(conn, "messages", "seq", cols, seq_hint):
                try:
                    envelope = wire.decode(bytes(row[6]))
                except (WireError, TypeError):
                    continue
                if row[1] not in KINDS or envelope.seq != row[0] or len(envelope.samples) != row[2]:
                    continue
                out.messages.append(row)
                out.recovered += row[2]
        finally:
            conn.close()
        return out

    def _restore(self, salvage: _Salvage, lost: int | None) -> None:
        max_seq = max((m[0] for m in salvage.messages), default=0)
        next_seq = max(salvage.meta.get("next_seq", 0), max_seq + 1)
        if "next_seq" not in salvage.meta:
            # The old seq is unknown: start where no earlier seq can be (fewer than one message
            # a second is ever made), so the collector sees a gap, never a seq used twice.
            next_seq = max(next_seq, time.time_ns() // 1_000_000_000)
        with self._txn():
            conn = self._conn
            for key, value in salvage.meta.items():
                if key in COUNTERS or key in ("last_acked_seq", "clock_seen_synced", "trusted_wall_ns"):
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (next_seq,))
            conn.executemany("INSERT OR IGNORE INTO boots (boot_id, offset_ns, floor_ns) VALUES (?, ?, ?)",
                             salvage.boots)
            conn.executemany("INSERT INTO pending (id, kind, t_ns, boot_id, wall_ns, boottime_ns, trusted, body) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", salvage.pending)
            conn.executemany("INSERT INTO messages (seq, kind, samples, first_id, oldest_t_ns, created_ns, payload) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", salvage.messages)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'depth'", (salvage.recovered,))
            if lost:
                self._staged["lost_samples_total"] += lost
            self._enforce_cap()

    # --- transactions and counters ----------------------------------------------------
    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        if conn is None:
            raise OutboxError("outbox is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            if self._staged:
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                    [(k, v) for k, v in self._staged.items() if v])
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self._staged.clear()
        self._trim_wal()

    def _trim_wal(self) -> None:
        """After a big transaction, fold the WAL back and truncate it, so the cap holds on disk."""
        try:
            wal = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if wal > self._wal_limit:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to a persisted counter; written with the next transaction."""
        if counter not in COUNTERS:
            raise KeyError(f"unknown outbox counter {counter!r}")
        self._staged[counter] += n

    def flush_counters(self) -> None:
        if self._staged:
            with self._txn():
                pass

    def _meta(self, key: str, default: int | None = None) -> int | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, key: str, value: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _add_depth(self, n: int) -> None:
        if n:
            self._conn.execute("UPDATE meta SET value = value + ? WHERE key = 'depth'", (n,))

    # --- the clock's persisted state ---------------------------------------------------
    def clock_state(self, boot_id: str) -> tuple[bool, int | None]:
        """(clock ever seen synchronised, this boot's trusted offset if known)."""
        seen = bool(self._meta("clock_seen_synced", 0))
        row = self._conn.execute("SELECT offset_ns FROM boots WHERE boot_id = ?", (boot_id,)).fetchone()
        return seen, (row[0] if row else None)

    def _note_clock(self, reading: Reading, seen_synced: bool | None) -> None:
        conn = self._conn
        conn.execute("INSERT OR IGNORE INTO boots (boot_id, offset_ns, floor_ns) VALUES "
                     "(?, NULL, (SELECT value FROM meta WHERE key = 'trusted_wall_ns'))", (reading.boot_id,))
        if reading.trusted:
            conn.execute("UPDATE boots SET offset_ns = ? WHERE boot_id = ?", (reading.offset_ns, reading.boot_id))
            self._set_meta("trusted_wall_ns", reading.wall_ns)
        if seen_synced:
            self._set_meta("clock_seen_synced", 1)

    # --- writing ----------------------------------------------------------------------
    def add(self, samples: Sequence[Sample], reading: Reading, kind: str = "metrics",
            seen_synced: bool | None = None) -> int:
        """Commit ``samples`` (one transaction, synced to disk); returns how many were added."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        rows = [(kind, s.time_ns, reading.boot_id, reading.wall_ns, reading.boottime_ns, int(reading.trusted),
                 sample_body(s)) for s in samples]
        with self._txn() as conn:
            self._note_clock(reading, seen_synced)
            if rows:
                self._enforce_cap(incoming=sum(len(r[6]) + ROW_OVERHEAD for r in rows))
                conn.executemany("INSERT INTO pending (kind, t_ns, boot_id, wall_ns, boottime_ns, trusted, body) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._add_depth(len(rows))
                self._enforce_cap()
        return len(rows)

    def _used_bytes(self) -> int:
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _enforce_cap_txn(self) -> None:
        with self._txn():
            self._enforce_cap()

    def _enforce_cap(self, incoming: int = 0) -> int:
        """Delete the oldest rows until ``incoming`` more bytes fit; returns samples dropped."""
        dropped = 0
        conn = self._conn
        while True:
            excess = self._used_bytes() + incoming - self._budget
            if excess <= 0:
                break
            pend = conn.execute("SELECT id FROM pending ORDER BY id LIMIT 1").fetchone()
            msg = conn.execute("SELECT seq, first_id, samples FROM messages ORDER BY seq LIMIT 1").fetchone()
            if pend is None and msg is None:
                break
            if msg is not None and (pend is None or msg[1] <= pend[0]):
                conn.execute("DELETE FROM messages WHERE seq = ?", (msg[0],))
                n = msg[2]
            else:
                limit_id = msg[1] if msg is not None else None
                ids, freed = [], 0
                for rid, size in conn.execute("SELECT id, length(body) FROM pending ORDER BY id LIMIT 2048"):
                    if limit_id is not None and rid >= limit_id:
                        break
                    ids.append((rid,))
                    freed += size + ROW_OVERHEAD
                    if freed >= excess:
                        break
                conn.executemany("DELETE FROM pending WHERE id = ?", ids)
                n = len(ids)
            self._add_depth(-n)
            dropped += n
        if dropped:
            self._staged["dropped_samples_total"] += dropped
            log.warning("outbox at its cap of %.1f MB: dropped the %d oldest samples", self.max_bytes / 2**20, dropped)
        return dropped

    def pack(self, reading: Reading, force: bool = False, seen_synced: bool | None = None,
             metrics: bool = True) -> list[tuple[int, str]]:
        """Turn pending samples into messages: ``[(seq, kind), ...]`` made by this call.

        Events are packed at once; metrics when a batch is full (count or bytes), when the
        oldest has waited ``batch_max_age``, or with ``force``. With ``metrics`` False (they
        could not be sent now) only full batches are packed: the rest waits as pending rows, so
        an outage's backlog leaves in full batches, and stays compact (compressed) on disk.
        Nothing is packed while the clock is untrusted (a message's times must be right);
        afterwards held samples get their time corrected. At most PACK_MESSAGES_PER_CALL
        messages per call: call again while it returns a full list.
        """
        if not reading.trusted:
            return []
        conn = self._conn
        has_events = conn.execute("SELECT 1 FROM pending WHERE kind = 'events' LIMIT 1").fetchone() is not None
        if metrics:
            metrics_due = (force and self.has_pending()) or self._metrics_due(reading)
        else:
            metrics_due = self._metrics_oldest() is not None and self._metrics_full()
        if not has_events and not metrics_due:
            return []  # nothing to do: no transaction, no disk write
        made: list[tuple[int, str]] = []
        with self._txn() as conn:
            self._note_clock(reading, seen_synced)
            boots = {b: (off, floor) for b, off, floor in conn.execute("SELECT boot_id, offset_ns, floor_ns FROM boots")}
            next_seq = self._meta("next_seq", 1)
            for kind in KINDS:
                if kind == "metrics" and not metrics_due:
                    continue
                budget = PACK_MESSAGES_PER_CALL - len(made)
                if budget <= 0:
                    break
                rows = conn.execute(
                    "SELECT id, t_ns, boot_id, wall_ns, boottime_ns, trusted, body FROM pending "
                    "WHERE kind = ? ORDER BY id LIMIT ?", (kind, budget * self.batch_max_samples)).fetchall()
                if not rows:
                    continue
                batches, unplaceable = self._batches(rows, reading, boots)
                if kind == "metrics" and not metrics and batches and len(batches[-1]) < self.batch_max_samples:
                    batches.pop()  # not full (every batch before it is): it waits for more, or for the link
                batches = batches[:budget]
                used_ids = [(r[0],) for batch in batches for r, _ in batch]
                for batch in batches:
                    for sub in self._encode(batch, next_seq, reading):
                        seq, payload, n, first_id, oldest = sub
                        conn.execute("INSERT INTO messages (seq, kind, samples, first_id, oldest_t_ns, created_ns, "
                                     "payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     (seq, kind, n, first_id, oldest, reading.wall_ns, payload))
                        made.append((seq, kind))
                        next_seq = seq + 1
                conn.executemany("DELETE FROM pending WHERE id = ?", used_ids)
                if unplaceable:
                    conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in unplaceable])
                    self._add_depth(-len(unplaceable))
                    self._staged["time_unknown_samples_total"] += len(unplaceable)
                    log.warning("%d samples were taken in an earlier boot whose clock was never trusted, at "
                                "times that cannot be right; they are dropped (time_unknown_samples_total)",
                                len(unplaceable))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (next_seq,))
            self._enforce_cap()
        return made

    def _metrics_oldest(self) -> tuple | None:
        return self._conn.execute("SELECT boot_id, boottime_ns, wall_ns FROM pending WHERE kind = 'metrics' "
                                  "ORDER BY id LIMIT 1").fetchone()

    def _metrics_due(self, reading: Reading) -> bool:
        oldest = self._metrics_oldest()
        if oldest is None:
            return False
        if self.batch_max_age_ns <= 0:
            return True
        if oldest[0] != reading.boot_id or reading.boottime_ns - oldest[1] >= self.batch_max_age_ns:
            return True
        return self._metrics_full()

    def _metrics_full(self) -> bool:
        """Pending metrics fill at least one batch (count or bytes)."""
        n, size = self._conn.execute("SELECT count(*), coalesce(sum(length(body)), 0) FROM pending "
                                     "WHERE kind = 'metrics'").fetchone()
        return n >= self.batch_max_samples or size + 32 * n > self.batch_max_bytes

    def _batches(self, rows, reading: Reading, boots) -> tuple[list[list[tuple]], list[int]]:
        """Rows with their true times, cut into batches bounded by count and bytes."""
        batches: list[list[tuple]] = []
        current: list[tuple] = []
        size = 0
        unplaceable = []
        boot_start = reading.offset_ns  # the current boot began at this wall time (trusted)
        for row in rows:
            rid, t, boot_id, wall, boottime, trusted, body = row
            if not trusted:
                recorded = wall - boottime
                if boot_id == reading.boot_id:
                    t = corrected_time(t, recorded, reading.offset_ns)
                elif boots.get(boot_id, (None, None))[0] is not None:
                    t = corrected_time(t, recorded, boots[boot_id][0])
                else:
                    # That boot ended before its clock was ever trusted: its time can only be
                    # checked against what is known (after the last trusted time before it,
                    # before this boot began).
                    floor = boots.get(boot_id, (None, None))[1]
                    if t > boot_start or (floor is not None and t < floor) or t < 0:
                        unplaceable.append(rid)
                        continue
            cost = len(body) + 32
            if current and (len(current) >= self.batch_max_samples or size + cost > self.batch_max_bytes):
                batches.append(current)
                current, size = [], 0
            current.append((row, t))
            size += cost
        if current:
            batches.append(current)
        return batches, unplaceable

    def _encode(self, batch, seq: int, reading: Reading) -> Iterator[tuple[int, bytes, int, int, int]]:
        samples = tuple(_sample_from_body(row[6], t) for row, t in batch)
        envelope = Envelope(self.hub, self.host, seq, round(reading.wall_ns / 1e9, 3), samples)
        payload = wire.encode(envelope)
        if len(payload) > wire.MAX_PAYLOAD_BYTES and len(batch) > 1:
            half = len(batch) // 2
            first = list(self._encode(batch[:half], seq, reading))
            yield from first
            yield from self._encode(batch[half:], first[-1][0] + 1, reading)
            return
        yield seq, payload, len(batch), batch[0][0][0], min(t for _, t in batch)

    # --- sending and acknowledging ------------------------------------------------------
    def messages_after(self, seq: int, limit: int) -> list[Message]:
        rows = self._conn.execute("SELECT seq, kind, payload, samples FROM messages WHERE seq > ? "
                                  "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def unsent_after(self, seq: int, limit: int) -> int:
        """How many messages (at most ``limit``) have a seq above ``seq``."""
        return self._conn.execute("SELECT count(*) FROM (SELECT 1 FROM messages WHERE seq > ? LIMIT ?)",
                                  (seq, limit)).fetchone()[0]

    def message(self, seq: int) -> Message | None:
        r = self._conn.execute("SELECT seq, kind, payload, samples FROM messages WHERE seq = ?", (seq,)).fetchone()
        return None if r is None else Message(r[0], r[1], bytes(r[2]), r[3])

    def ack(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Delete the messages the collector confirmed; returns their seqs (unknown ones are ignored)."""
        acked: list[int] = []
        with self._txn() as conn:
            samples = 0
            for first, last in ranges:
                found = conn.execute("SELECT seq, samples FROM messages WHERE seq BETWEEN ? AND ?",
                                     (first, last)).fetchall()
                if found:
                    conn.execute("DELETE FROM messages WHERE seq BETWEEN ? AND ?", (first, last))
                    acked.extend(s for s, _ in found)
                    samples += sum(n for _, n in found)
            if acked:
                self._add_depth(-samples)
                self._staged["messages_acked_total"] += len(acked)
                top = max(acked)
                if top > (self._meta("last_acked_seq", -1) or -1):
                    self._set_meta("last_acked_seq", top)
        return acked

    # --- reading state ------------------------------------------------------------------
    def has_pending(self) -> bool:
        return self._conn.execute("SELECT 1 FROM pending LIMIT 1").fetchone() is not None

    def last_row_id(self) -> int:
        """The id of the last sample ever committed (ids are never reused)."""
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'pending'").fetchone()
        return row[0] if row else 0

    def file_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal")) if os.path.exists(p))

    def stats(self) -> OutboxStats:
        stats = _stats(self._conn, self.path)
        for key, n in self._staged.items():  # counted, not yet written
            stats.counters[key] = stats.counters.get(key, 0) + n
        return stats

    def close(self) -> None:
        if self._conn is not None:
            try:
                self.flush_counters()
            except sqlite3.Error as exc:
                log.warning("could not save counters while closing the outbox: %s", exc)
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reopen(self) -> None:
        """After a database error at run time: close and open again (quarantining if corrupt)."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        self.open()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan(conn: sqlite3.Connection, table: str, key: str, cols: str, hint: int | None) -> list[tuple]:
    """Rows of ``table`` that can still be read, skipping damaged ranges by bisection."""
    hi = None
    try:
        lo_hi = conn.execute(f"SELECT min({key}), max({key}) FROM {table}").fetchone()
        lo, hi = lo_hi if lo_hi and lo_hi[0] is not None else (None, None)
    except sqlite3.Error:
        lo = None
    if lo is None:
        if hint is None or hint < 1:
            # Neither the table's bounds nor a hint: read from the start until it breaks.
            rows: list[tuple] = []
            try:
                for row in conn.execute(f"SELECT {cols} FROM {table} ORDER BY {key}"):
                    rows.append(row)
            except sqlite3.Error:
                pass
            return rows
        lo, hi = 0, hint
    if hint is not None and hint > (hi or 0):
        hi = hint

    def read(a: int, b: int) -> list[tuple]:
        try:
            return conn.execute(f"SELECT {cols} FROM {table} WHERE {key} BETWEEN ? AND ? ORDER BY {key}",
                                (a, b)).fetchall()
        except sqlite3.Error:
            if a >= b:
                return []
            mid = (a + b) // 2
            return read(a, mid) + read(mid + 1, b)

    return read(lo, hi)


def _stats(conn: sqlite3.Connection, path: Path) -> OutboxStats:
    meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
    pending = conn.execute("SELECT count(*) FROM pending").fetchone()[0]
    messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    oldest = [r[0] for r in (
        conn.execute("SELECT t_ns FROM pending ORDER BY id LIMIT 1").fetchone(),
        conn.execute("SELECT oldest_t_ns FROM messages ORDER BY seq LIMIT 1").fetchone()) if r is not None]
    size = sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if os.path.exists(p))
    return OutboxStats(
        samples=meta.get("depth", 0), pending=pending, messages=messages, file_bytes=size,
        oldest_t_ns=min(oldest) if oldest else None, last_acked_seq=meta.get("last_acked_seq"),
        next_seq=meta.get("next_seq", 1), counters={k: meta.get(k, 0) for k in COUNTERS})


def read_stats(path: str | os.PathLike[str]) -> OutboxStats:
    """The outbox's state, read without writing (safe while the agent runs)."""
    path = Path(path)
    if not path.exists():
        raise OutboxError(f"no outbox at {path} (has the agent run yet?)")
    try:
        conn = _connect(path, readonly=True)
        try:
            return _stats(conn, path)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read outbox {path}: {exc}") from None
