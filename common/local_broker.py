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

from common.broker import DeadLetter, Delivery
from common.errors import Reason, TransientError
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


class LocalBroker:
    def __init__(
        self,
        path: str | Path,
        *,
        prefetch: int = 256,
        visibility_timeout_s: float = 120.0,
        poll_interval_s: float = 0.2,
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
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a confirmed publish or settled outcome survives power loss, not only kill -9.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

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

    async def publish(self, jobs: Sequence[Job]) -> None:
        now = time.time()
        rows = [(_LANES[job.lane.value], job.to_bytes(), now) for job in jobs]
        await self._run(_insert_jobs, rows)

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
        self,
        delivery: Delivery,
        reason: str,
        error: str,
        attempts: int,
        job: Job | None,
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
        return [
            DeadLetter(str(r[0]), bytes(r[1]), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows
        ]


def _insert_jobs(conn: sqlite3.Connection, rows: list[tuple[int, bytes, float]]) -> None:
    conn.executemany("INSERT INTO jobs (lane, body, visible_at) VALUES (?, ?, ?)", rows)


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
