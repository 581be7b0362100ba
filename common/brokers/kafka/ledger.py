"""The Kafka publish ledger: the lane topics themselves, read from a marked position.

Kafka keeps records after they are consumed (until retention), so a run's job records
are their own ledger: each carries the ledger name and its job id in headers. A mark is
the lane topics' end offsets taken while nothing of the run is in flight; every record
the run publishes afterwards sits at or past those offsets, so reading from the mark to
the end and keeping the records with the ledger's header finds exactly the jobs that
reached the broker after the mark. Nothing is written besides the jobs, so the ledger is
atomic with them by construction. Dropping it is a no-op; retention removes the records.

End offsets come from a fetch's high watermark, as in ``common.brokers.kafka.client`` (the test
broker answers ListOffsets(latest) with a batch base offset).

Everything here blocks; the adapter calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import KafkaConsumer, TopicPartition

from common.brokers.kafka.client import ClientSettings
from common.errors import Reason, TransientError

H_LEDGER = "imgfleet-ledger"
H_JOB_ID = "imgfleet-job-id"


def ledger_headers(ledger: str, job_id: str) -> list[tuple[str, bytes]]:
    return [(H_LEDGER, ledger.encode()), (H_JOB_ID, job_id.encode())]


def _key(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


class LedgerReader:
    def __init__(self, settings: ClientSettings, *, timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s

    def _consumer(self, **extra: object) -> KafkaConsumer:
        return KafkaConsumer(
            **self._settings.kwargs(
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=20,
                client_id="imgfleet-ledger",
                **extra,
            )
        )

    @staticmethod
    def _partitions(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for topic in topics:
            out.extend(
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            )
        return out

    def end_offsets(self, topics: Iterable[str]) -> dict[str, int]:
        """High watermark of every partition of ``topics``, keyed "topic:partition"."""
        consumer = self._consumer(fetch_max_bytes=1, max_partition_fetch_bytes=1)
        try:
            tps = self._partitions(consumer, topics)
            if not tps:
                return {}
            starts = consumer.beginning_offsets(tps)
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, int(starts.get(tp, 0)))
            deadline_s = time.monotonic() + self._timeout_s
            while True:
                marks = {tp: consumer.highwater(tp) for tp in tps}
                if all(mark is not None for mark in marks.values()):
                    return {_key(tp): int(mark) for tp, mark in marks.items() if mark is not None}
                if time.monotonic() > deadline_s:
                    raise TransientError("kafka: no fetch answer for end offsets", Reason.BROKER)
                consumer.poll(timeout_ms=50, max_records=1)
        finally:
            consumer.close()

    def job_ids(self, topics: Iterable[str], ledger: str, since: dict[str, int] | None) -> set[str]:
        """Job ids of ``ledger`` in ``topics`` from ``since`` (default: log start) to the end."""
        topics = list(topics)
        until = self.end_offsets(topics)
        consumer = self._consumer()
        wanted = ledger.encode()
        ids: set[str] = set()
        try:
            tps = self._partitions(consumer, topics)
            starts = consumer.beginning_offsets(tps) if tps else {}
            positions = {
                tp: max(int((since or {}).get(_key(tp), 0)), int(starts.get(tp, 0))) for tp in tps
            }
            todo = [tp for tp in tps if positions[tp] < until.get(_key(tp), 0)]
            if not todo:
                return ids
            consumer.assign(todo)
            for tp in todo:
                consumer.seek(tp, positions[tp])
            deadline_s = time.monotonic() + self._timeout_s
            while todo:
                batch = consumer.poll(timeout_ms=100, max_records=10_000)
                for records in batch.values():
                    for rec in records:
                        headers = dict(rec.headers or ())
                        if headers.get(H_LEDGER) == wanted and headers.get(H_JOB_ID):
                            ids.add(headers[H_JOB_ID].decode())
                if batch:
                    deadline_s = time.monotonic() + self._timeout_s
                todo = [tp for tp in todo if consumer.position(tp) < until[_key(tp)]]
                if todo and time.monotonic() > deadline_s:
                    raise TransientError(
                        f"kafka: reading ledger {ledger!r} timed out", Reason.BROKER
                    )
        finally:
            consumer.close()
        return ids
