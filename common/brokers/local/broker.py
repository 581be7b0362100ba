"""The local broker: a durable on-disk queue in SQLite for the embedded default.

Survives ``kill -9`` of any process using it: a leased job that is never settled becomes
visible again once its visibility timeout passes, and consumers extend the leases of what
they still hold. Several processes may share one queue file (SQLite WAL + immediate
transactions). The live lane is always served before the bulk lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import common.brokers.local.ledger as local_ledger
from common.brokers.base import ActOnLetters, DeadLetter, Delivery, LaneStats, Pick
from common.config import LocalBrokerConfig
from common.errors import ConfigError, Reason, TransientError
from common.schema import Job, Lane

_LANES = {Lane.LIVE.value: 0, Lane.BULK.value: 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    lane INTEGER NOT NULL,
    body BLOB NOT NULL,
    visible_at REAL NOT NULL,
    lease_token TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (lane, visible_at);
CREATE TABLE IF NOT EXISTS dlq (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    run_id TEXT,
    item_id TEXT
);
CREATE INDEX IF NOT EXISTS dlq_reason ON dlq (reason);
"""


_LOCAL = LocalBrokerConfig()  # [broker.local]'s defaults


class LocalBroker:
    def __init__(
        self,
        path: str | Path,
        *,
        prefetch: int = 256,
        visibility_timeout_s: float = _LOCAL.visibility_timeout_s,
        poll_interval_s: float = _LOCAL.poll_interval_s,
    ) -> None:
        self.path = Path(path)
        self.prefetch = prefetch
        self.visibility_timeout_s = visibility_timeout_s
        self.poll_interval_s = poll_interval_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # delivery_id -> token, for lease extension
        self._room = asyncio.Event()  # set when a settled delivery frees prefetch room
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"LocalBroker({str(self.path)!r})"

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except (OSError, sqlite3.Error) as exc:
            # A path that cannot be created or opened will not fix itself: a setting to fix.
            raise ConfigError(
                f"local broker: cannot open the queue file {str(self.path)!r}: {exc}"
            ) from exc

    def _open(self) -> None:
        # Under the process lock: concurrent first calls (publishes in flight before any
        # connect) must open one connection, not race two on a new file.
        with self._lock:
            if self._conn is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            try:
                _enable_wal(conn)
                # FULL: a confirmed publish or settled outcome survives power loss.
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA + local_ledger.LEDGER_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def is_connected(self) -> bool:
        """A file on this host: up from connect() to close()."""
        return self._conn is not None

    @property
    def assigned_partitions(self) -> int | None:
        return None  # every consumer shares the one queue

    async def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _tx(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn(conn, *args) in one immediate transaction under the process lock."""
        with self._lock:
            if self._conn is None:
                raise TransientError("local broker is closed", Reason.BROKER)
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = fn(conn, *args)
                conn.execute("COMMIT")
                return result
            except sqlite3.OperationalError as exc:
                conn.execute("ROLLBACK") if conn.in_transaction else None
                raise TransientError(f"local broker: {exc}", Reason.BROKER) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        if self._conn is None:
            await self.connect()
        return await asyncio.to_thread(self._tx, fn, *args)

    # -- publishing -------------------------------------------------------------------

    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        now = time.time()
        rows = [(_LANES[job.lane.value], job.to_bytes(), now) for job in jobs]
        if ledger is None:
            await self._run(_insert_jobs, rows)
        else:
            await self._run(_insert_jobs_with_ledger, rows, ledger, [j.job_id for j in jobs])

    # The publish ledger (common.brokers.local.ledger): rows written in the jobs' own transaction.

    def ledger_capacity(self, batch_jobs: int) -> int | None:
        return None  # rows are kept until the next mark but one: no bound to respect

    async def ledger_mark(self, ledger: str) -> dict[str, int]:
        position: dict[str, int] = await self._run(local_ledger.mark, ledger)
        return position

    async def ledger_job_ids(self, ledger: str, since: dict[str, int] | None = None) -> set[str]:
        ids: set[str] = await self._run(local_ledger.job_ids, ledger, since)
        return ids

    async def drop_ledger(self, ledger: str) -> None:
        await self._run(local_ledger.drop, ledger)

    async def publish_raw(self, bodies: Sequence[bytes], lane: str = "bulk") -> None:
        now = time.time()
        await self._run(_insert_jobs, [(_LANES[lane], body, now) for body in bodies])

    # -- consuming --------------------------------------------------------------------

    async def consume(self) -> AsyncIterator[Delivery]:
        heartbeat = asyncio.create_task(self._extend_leases_forever())
        try:
            while not self._closed.is_set():
                free = self.prefetch - len(self._held)
                if free <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                leased = await self._run(self._lease, free, time.time())
                if not leased:
                    await asyncio.sleep(self.poll_interval_s)
                    continue
                # Held from the moment of leasing, so the heartbeat extends them too.
                self._held.update((d.delivery_id, d.token) for d in leased)
                for delivery in leased:
                    yield delivery
        finally:
            heartbeat.cancel()

    def _lease(self, conn: sqlite3.Connection, limit: int, now: float) -> list[Delivery]:
        rows: list[tuple[int, bytes, int]] = []
        for lane in (0, 1):
            if len(rows) >= limit:
                break
            rows += conn.execute(
                "SELECT seq, body, deliveries FROM jobs WHERE lane = ? AND visible_at <= ? "
                "ORDER BY visible_at LIMIT ?",
                (lane, now, limit - len(rows)),
            ).fetchall()
        until = now + self.visibility_timeout_s
        deliveries = [
            Delivery(
                body=bytes(body),
                delivery_id=str(seq),
                token=uuid.uuid4().hex,
                redelivered=previous_deliveries > 0,
            )
            for seq, body, previous_deliveries in rows
        ]
        conn.executemany(
            "UPDATE jobs SET visible_at = ?, lease_token = ?, deliveries = deliveries + 1 "
            "WHERE seq = ?",
            [(until, d.token, int(d.delivery_id)) for d in deliveries],
        )
        return deliveries

    async def _extend_leases_forever(self) -> None:
        interval_s = max(self.visibility_timeout_s / 3.0, 0.05)
        while True:
            await asyncio.sleep(interval_s)
            held = list(self._held.items())
            if held:
                # A failed beat is retried by the next; a lost lease only means a redelivery.
                with contextlib.suppress(TransientError):
                    await self._run(_extend, held, time.time() + self.visibility_timeout_s)

    def _settled(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._held.pop(delivery.delivery_id, None)
        self._room.set()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        await self._run(_delete, [(int(d.delivery_id), d.token) for d in deliveries])
        self._settled(deliveries)

    async def retry(self, delivery: Delivery, job: Job, delay_s: float) -> None:
        await self._run(
            _requeue,
            int(delivery.delivery_id),
            delivery.token,
            job.to_bytes(),
            time.time() + delay_s,
        )
        self._settled([delivery])

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched for immediate redelivery (shutdown path)."""
        if not deliveries:
            return
        await self._run(_release, [(int(d.delivery_id), d.token) for d in deliveries])
        self._settled(deliveries)

    async def dead_letter(
        self, delivery: Delivery, reason: str, error: str, attempts: int, job: Job | None
    ) -> None:
        await self._run(
            _to_dlq,
            int(delivery.delivery_id),
            delivery.token,
            delivery.body,
            (
                reason,
                error[:4000],
                attempts,
                time.time(),
                job.run_id if job else None,
                job.item_id if job else None,
            ),
        )
        self._settled([delivery])

    # -- inspection -------------------------------------------------------------------

    async def pending(self) -> int:
        return int(await self._run(lambda c: c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]))

    async def depths(self) -> dict[str, int]:
        rows = await self._run(
            lambda c: c.execute("SELECT lane, COUNT(*) FROM jobs GROUP BY lane").fetchall()
        )
        names = {v: k for k, v in _LANES.items()}
        out = {name: 0 for name in _LANES}
        out.update({names[lane]: n for lane, n in rows})
        return out

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id, body, reason, error, attempts, failed_at, run_id, item_id "
                "FROM dlq ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_letter_of(r) for r in rows]

    async def settle_dead_letters(
        self, select: Pick, act: ActOnLetters, *, limit: int | None = None, batch_size: int = 500
    ) -> int:
        """Walk the DLQ in id order; delete each acted-on batch in one transaction."""
        settled = 0
        after_id = 0
        batch: list[DeadLetter] = []

        async def flush() -> None:
            nonlocal settled
            if batch:
                await act(list(batch))
                await self._run(_delete_letters, [int(d.dlq_id) for d in batch])
                settled += len(batch)
                batch.clear()

        while limit is None or settled + len(batch) < limit:
            rows = await self._run(_letters_after, after_id, _SCAN_ROWS)
            if not rows:
                break
            for row in rows:
                after_id = int(row[0])
                letter = _letter_of(row)
                if not select(letter):
                    continue
                batch.append(letter)
                if len(batch) >= batch_size:
                    await flush()
                if limit is not None and settled + len(batch) >= limit:
                    break
        await flush()
        return settled

    async def lane_stats(self) -> list[LaneStats]:
        rows, dead = await self._run(_lane_counts, time.time())
        names = {v: k for k, v in _LANES.items()}
        ready = {name: 0 for name in _LANES}
        leased = {name: 0 for name in _LANES}
        waiting = 0
        for lane, state, n in rows:
            if state == "ready":
                ready[names[lane]] += n
            elif state == "leased":
                leased[names[lane]] += n
            else:
                waiting += n
        stats = [LaneStats(lane, ready[lane], in_flight=leased[lane]) for lane in _LANES]
        # Jobs waiting out a retry delay sit in their lane's table rows until due.
        stats.append(LaneStats("retry", waiting, in_flight=0))
        stats.append(LaneStats("dlq", int(dead), in_flight=0))
        return stats


def _enable_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch to WAL, waiting out another process doing the same on a new file.

    Changing the journal mode takes an exclusive lock that SQLite's busy timeout does not
    always wait for, so a worker and a producer opening a fresh queue together could fail.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _insert_jobs(conn: sqlite3.Connection, rows: list[tuple[int, bytes, float]]) -> None:
    conn.executemany("INSERT INTO jobs (lane, body, visible_at) VALUES (?, ?, ?)", rows)


def _insert_jobs_with_ledger(
    conn: sqlite3.Connection,
    rows: list[tuple[int, bytes, float]],
    ledger: str,
    job_ids: list[str],
) -> None:
    _insert_jobs(conn, rows)
    local_ledger.record(conn, ledger, job_ids)


def _delete(conn: sqlite3.Connection, keys: list[tuple[int, str]]) -> None:
    conn.executemany("DELETE FROM jobs WHERE seq = ? AND lease_token = ?", keys)


def _release(conn: sqlite3.Connection, keys: list[tuple[int, str]]) -> None:
    conn.executemany(
        "UPDATE jobs SET visible_at = 0, lease_token = NULL WHERE seq = ? AND lease_token = ?",
        keys,
    )


def _extend(conn: sqlite3.Connection, held: list[tuple[str, str]], until: float) -> None:
    conn.executemany(
        "UPDATE jobs SET visible_at = ? WHERE seq = ? AND lease_token = ?",
        [(until, int(seq), token) for seq, token in held],
    )


def _requeue(conn: sqlite3.Connection, seq: int, token: str, body: bytes, at: float) -> None:
    conn.execute(
        "UPDATE jobs SET body = ?, visible_at = ?, lease_token = NULL "
        "WHERE seq = ? AND lease_token = ?",
        (body, at, seq, token),
    )


def _to_dlq(
    conn: sqlite3.Connection,
    seq: int,
    token: str,
    body: bytes,
    meta: tuple[object, ...],
) -> None:
    # Only the current lease holder may dead-letter, so a redelivered copy cannot add a
    # second DLQ entry for the same job.
    cur = conn.execute("DELETE FROM jobs WHERE seq = ? AND lease_token = ?", (seq, token))
    if cur.rowcount:
        conn.execute(
            "INSERT INTO dlq (body, reason, error, attempts, failed_at, run_id, item_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (body, *meta),
        )


_SCAN_ROWS = 1000  # DLQ rows read per query while settling

_LETTER_COLUMNS = "id, body, reason, error, attempts, failed_at, run_id, item_id"


def _letter_of(row: Sequence[Any]) -> DeadLetter:
    rid, body, reason, error, attempts, failed_at, run_id, item_id = row
    return DeadLetter(
        str(rid), bytes(body), reason, error, int(attempts), float(failed_at), run_id, item_id
    )


def _letters_after(conn: sqlite3.Connection, after_id: int, n: int) -> list[Any]:
    return conn.execute(
        f"SELECT {_LETTER_COLUMNS} FROM dlq WHERE id > ? ORDER BY id LIMIT ?", (after_id, n)
    ).fetchall()


def _delete_letters(conn: sqlite3.Connection, ids: list[int]) -> None:
    conn.executemany("DELETE FROM dlq WHERE id = ?", [(i,) for i in ids])


def _lane_counts(conn: sqlite3.Connection, now: float) -> tuple[list[tuple[int, str, int]], int]:
    # A lease past its visibility timeout is ready again; an unleased row not yet visible
    # is a retry waiting out its delay.
    rows = conn.execute(
        "SELECT lane, CASE WHEN visible_at <= ? THEN 'ready' "
        "WHEN lease_token IS NOT NULL THEN 'leased' ELSE 'waiting' END AS state, COUNT(*) "
        "FROM jobs GROUP BY lane, state",
        (now,),
    ).fetchall()
    dead = conn.execute("SELECT COUNT(*) FROM dlq").fetchone()[0]
    return rows, int(dead)
