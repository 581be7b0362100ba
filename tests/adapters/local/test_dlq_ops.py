"""The local (SQLite) broker's dead letters and figures: a batch being settled stays listed,
and lane_stats count leases and waiting retries.

How settle_dead_letters selects, batches, keeps order and stops on a failed action or a
limit, what the lane figures count, and what requeue, purge and status do, on every
broker, is in tests/contract/test_broker_contract.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from common.brokers.base import DeadLetter
from common.brokers.local.broker import LocalBroker
from common.schema import Job, Lane, decode_job
from tests.support.waiting import take_deliveries


def _broker(tmp_path: Path, prefetch: int = 256) -> LocalBroker:
    return LocalBroker(
        tmp_path / "q.sqlite3", prefetch=prefetch, visibility_timeout_s=30, poll_interval_s=0.01
    )


async def _dead_letter_all(broker: LocalBroker, reasons: list[str]) -> None:
    """Publish one job per reason, then dead-letter each in order."""
    jobs = [
        Job(item_id=f"item-{i}", url=f"http://img/{i}.jpg", run_id="run-1")
        for i in range(len(reasons))
    ]
    await broker.publish(jobs)
    deliveries = await take_deliveries(broker, len(jobs))
    for delivery, reason in zip(deliveries, reasons, strict=True):
        await broker.dead_letter(delivery, reason, f"{reason}!", 3, decode_job(delivery.body))


def test_a_batch_stays_listed_until_its_action_returns(tmp_path: Path) -> None:
    # Deleted in one transaction after act: a reader meanwhile still lists the batch.
    # (RabbitMQ hides letters a reader holds unacked, so this is the local broker's.)
    async def scenario() -> None:
        broker = _broker(tmp_path)
        await _dead_letter_all(broker, ["http_5xx", "http_404"] * 5)
        batches = 0

        async def act(batch: list[DeadLetter]) -> None:
            nonlocal batches
            # Nothing of this batch has left the DLQ yet.
            left = {d.dlq_id for d in await broker.dead_letters(100)}
            assert {d.dlq_id for d in batch} <= left
            batches += 1

        settled = await broker.settle_dead_letters(
            lambda d: d.reason == "http_5xx", act, batch_size=2
        )
        assert (settled, batches) == (5, 3)
        await broker.close()

    asyncio.run(scenario())


def test_lane_stats_count_leased_jobs_and_waiting_retries(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = _broker(tmp_path, prefetch=4)
        await broker.publish([Job(item_id=f"b{i}", url="http://img/b.jpg") for i in range(5)])
        await broker.publish(
            [Job(item_id=f"l{i}", url="http://img/l.jpg", lane=Lane.LIVE) for i in range(2)]
        )
        held = await take_deliveries(broker, 4)  # live first: l0, l1, then b0, b1
        await broker.retry(held[2], decode_job(held[2].body).next_attempt(), 60.0)
        await broker.dead_letter(held[3], "http_404", "gone", 1, decode_job(held[3].body))
        stats = {s.lane: s for s in await broker.lane_stats()}
        assert (stats["live"].ready, stats["live"].in_flight) == (0, 2)
        assert (stats["bulk"].ready, stats["bulk"].in_flight) == (3, 0)
        assert stats["retry"].ready == 1
        await broker.close()

    asyncio.run(scenario())
