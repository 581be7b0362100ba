"""The local broker's publish ledger: job ids in the queue file, same transaction as the jobs.

A run's ledger rows carry the mark epoch they were written in. ``mark`` starts a new epoch
and drops the rows two epochs old: the producer writes its checkpoint after a mark, so a
crash between the mark and that write still finds every row since the previous mark,
which is where the checkpoint it resumes from stands.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    name TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    job_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_name ON ledger (name, epoch);
CREATE TABLE IF NOT EXISTS ledger_marks (
    name TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
"""


def _epoch(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT epoch FROM ledger_marks WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def record(conn: sqlite3.Connection, name: str, job_ids: Sequence[str]) -> None:
    """Add job ids to the ledger; call inside the transaction that inserts the jobs."""
    epoch = _epoch(conn, name)
    conn.executemany(
        "INSERT INTO ledger (name, epoch, job_id) VALUES (?, ?, ?)",
        [(name, epoch, job_id) for job_id in job_ids],
    )


def mark(conn: sqlite3.Connection, name: str) -> dict[str, int]:
    epoch = _epoch(conn, name) + 1
    conn.execute(
        "INSERT INTO ledger_marks (name, epoch) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch",
        (name, epoch),
    )
    conn.execute("DELETE FROM ledger WHERE name = ? AND epoch < ?", (name, epoch - 1))
    return {"epoch": epoch}


def job_ids(conn: sqlite3.Connection, name: str, since: dict[str, int] | None) -> set[str]:
    first = int((since or {}).get("epoch", 0))
    rows = conn.execute(
        "SELECT job_id FROM ledger WHERE name = ? AND epoch >= ?", (name, first)
    ).fetchall()
    return {str(r[0]) for r in rows}


def drop(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM ledger WHERE name = ?", (name,))
    conn.execute("DELETE FROM ledger_marks WHERE name = ?", (name,))
