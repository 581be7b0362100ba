"""Kafka topic layout and record headers: pure naming and delay logic, no client.

Topics (``<prefix>`` is ``broker.name_prefix``):

- ``<prefix>.jobs.live``  CMS and requeue traffic, served before everything else;
- ``<prefix>.jobs.bulk``  nightly runs;
- ``<prefix>.retry.<delay>s``  one topic per entry of ``kafka.retry_delays_s``;
- ``<prefix>.dlq``  failures: the original record value unchanged, the why in headers;
- ``<prefix>.dlq.resolved``  compacted, one partition: DLQ records ops requeued or purged.

Jobs are keyed by item id so one item's changes stay in order within a partition.

A retry record carries the wall-clock time it becomes due. A retry goes to the tier with
the largest delay not above the one asked for, so records in one tier are due in nearly
the order they were written: the consumer pauses a tier's partition until its head is due,
and whatever queues behind the head waits at most the spread of that tier.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

# Header names are part of the DLQ's public format (ops tools read them): add, never rename.
H_DUE_MS = "imgfleet-due-ms"
H_REASON = "imgfleet-reason"
H_ERROR = "imgfleet-error"
H_ATTEMPTS = "imgfleet-attempts"
H_FAILED_AT_MS = "imgfleet-failed-at-ms"
H_RUN_ID = "imgfleet-run-id"
H_ITEM_ID = "imgfleet-item-id"
H_SOURCE = "imgfleet-source"  # topic:partition:offset of the record that failed

MAX_ERROR_CHARS = 4000

# The resolved-letters topic keeps the newest record per key forever: a DLQ record must
# never reappear because its mark aged out.
RESOLVED_TOPIC_CONFIGS = {"cleanup.policy": "compact"}
RESOLVED_TOPIC_PARTITIONS = 1


class TopicKind(StrEnum):
    LIVE = "live"
    RETRY = "retry"
    BULK = "bulk"
    DLQ = "dlq"


# The order deliveries are handed out in: a retried job has already waited its delay.
SERVE_ORDER = (TopicKind.LIVE, TopicKind.RETRY, TopicKind.BULK)


def _delay_label(delay_s: float) -> str:
    return f"{delay_s:g}s".replace("+", "")


@dataclass(frozen=True)
class KafkaTopics:
    prefix: str
    retry_delays_s: tuple[float, ...]

    @classmethod
    def build(cls, prefix: str, retry_delays_s: Sequence[float]) -> KafkaTopics:
        delays = tuple(sorted({float(d) for d in retry_delays_s}))
        if not delays or delays[0] < 0:
            raise ValueError("kafka.retry_delays_s needs at least one delay >= 0")
        return cls(prefix, delays)

    @property
    def live(self) -> str:
        return f"{self.prefix}.jobs.live"

    @property
    def bulk(self) -> str:
        return f"{self.prefix}.jobs.bulk"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def dlq_resolved(self) -> str:
        """Compacted: one record per DLQ record that ops requeued or purged.

        Kafka cannot delete single records, so a settled dead letter is marked here (key
        ``<partition>:<offset>`` of the DLQ record) and DLQ readers skip it.
        """
        return f"{self.prefix}.dlq.resolved"

    @property
    def retries(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}.retry.{_delay_label(d)}" for d in self.retry_delays_s)

    @property
    def consumed(self) -> tuple[str, ...]:
        """The topics a worker reads (everything but the DLQ)."""
        return (self.live, *self.retries, self.bulk)

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.consumed, self.dlq)

    def for_lane(self, lane: str) -> str:
        if lane == "live":
            return self.live
        if lane == "bulk":
            return self.bulk
        raise ValueError(f"unknown lane {lane!r} (expected 'live' or 'bulk')")

    @cached_property
    def _kinds(self) -> dict[str, TopicKind]:
        kinds = {self.live: TopicKind.LIVE, self.bulk: TopicKind.BULK, self.dlq: TopicKind.DLQ}
        kinds.update((topic, TopicKind.RETRY) for topic in self.retries)
        return kinds

    def kind(self, topic: str) -> TopicKind:
        try:
            return self._kinds[topic]  # called per record: a dict lookup, not string work
        except KeyError:
            raise ValueError(f"topic {topic!r} is not one of ours") from None

    def retry_topic(self, delay_s: float) -> str:
        """The tier with the largest delay not above ``delay_s`` (the shortest for less)."""
        index = bisect.bisect_right(self.retry_delays_s, delay_s) - 1
        return self.retries[max(index, 0)]


def due_at_ms(delay_s: float, now_s: float | None = None) -> int:
    return int(((time.time() if now_s is None else now_s) + max(delay_s, 0.0)) * 1000)


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return None if value is None else value.decode("utf-8", "replace")
    return None


def header_int(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> int | None:
    raw = header(headers, name)
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def dlq_headers(
    *,
    reason: str,
    error: str,
    attempts: int,
    failed_at_s: float,
    run_id: str | None,
    item_id: str | None,
    source: str,
) -> list[tuple[str, bytes]]:
    headers = [
        (H_REASON, reason.encode()),
        (H_ERROR, error[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_FAILED_AT_MS, str(int(failed_at_s * 1000)).encode()),
        (H_SOURCE, source.encode()),
    ]
    if run_id is not None:
        headers.append((H_RUN_ID, run_id.encode()))
    if item_id is not None:
        headers.append((H_ITEM_ID, item_id.encode()))
    return headers
