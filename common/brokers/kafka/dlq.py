"""Dead letters on Kafka: DLQ records into letters, minus the ones ops already settled.

Kafka cannot delete one record, so requeue and purge write a mark per settled DLQ record
to the compacted ``<prefix>.dlq.resolved`` topic (key ``<partition>:<offset>``) and every
reader skips marked records. Pure functions over records; the adapter does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from common.brokers.base import DeadLetter
from common.brokers.kafka.topics import (
    H_ATTEMPTS,
    H_ERROR,
    H_FAILED_AT_MS,
    H_ITEM_ID,
    H_REASON,
    H_RUN_ID,
    H_SOURCE,
    header,
    header_int,
)


@dataclass(frozen=True)
class KafkaLetter:
    """One dead letter and the keys of every DLQ record that carries it (copies too)."""

    letter: DeadLetter
    record_keys: tuple[str, ...]


def record_key(record: Any) -> str:
    return f"{record.partition}:{record.offset}"


def resolved_keys(records: Iterable[Any]) -> set[str]:
    """Keys marked in the resolved topic (a record with no value un-marks its key)."""
    keys: set[str] = set()
    for rec in records:
        if rec.key is None:
            continue
        key = rec.key.decode("utf-8", "replace")
        if rec.value is None:
            keys.discard(key)
        else:
            keys.add(key)
    return keys


def resolution_value(action: str, now_s: float) -> bytes:
    return orjson.dumps({"action": action, "resolved_at_ms": int(now_s * 1000)})


def collect_letters(records: Iterable[Any], resolved: set[str]) -> list[KafkaLetter]:
    """Letters in record order, copies collapsed, settled ones left out.

    A job dead-lettered and then redelivered before its offset was committed (a crash in
    between) is written twice with the same source; it reads once. A letter is settled once
    any of its records is marked, so a copy written after a requeue does not bring it back.
    """
    order: list[str] = []
    first: dict[str, Any] = {}
    keys: dict[str, list[str]] = {}
    for rec in records:
        key = record_key(rec)
        source = header(rec.headers, H_SOURCE) or f"dlq:{key}"
        if source not in first:
            order.append(source)
            first[source] = rec
            keys[source] = []
        keys[source].append(key)
    letters: list[KafkaLetter] = []
    for source in order:
        if any(key in resolved for key in keys[source]):
            continue
        letters.append(KafkaLetter(letter_of(first[source]), tuple(keys[source])))
    return letters


def letter_of(rec: Any) -> DeadLetter:
    failed_at_ms = header_int(rec.headers, H_FAILED_AT_MS) or rec.timestamp
    return DeadLetter(
        dlq_id=record_key(rec),
        body=rec.value or b"",
        reason=header(rec.headers, H_REASON) or "unknown",
        error=header(rec.headers, H_ERROR) or "",
        attempts=header_int(rec.headers, H_ATTEMPTS) or 1,
        failed_at_s=failed_at_ms / 1000.0,
        run_id=header(rec.headers, H_RUN_ID),
        item_id=header(rec.headers, H_ITEM_ID),
    )
