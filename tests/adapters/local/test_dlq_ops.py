"""The local (SQLite) broker's dead letters and figures: a batch being settled stays listed,
lane_stats count leases and waiting retries, and requeue and purge run over it.

How settle_dead_letters selects, batches, keeps order and stops on a failed action or a
limit, on every broker, is in tests/contract/test_broker_contract.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson

from common.brokers.base import DeadLetter
from common.brokers.local.broker import LocalBroker
from common.schema import Job, Lane, decode_job
from producers.ops.dead_letters import LetterArchive, purge_dead_letters, requeue_dead_letters
from producers.ops.filters import LetterFilter
from tests.support.waiting import take_deliveries


def _broker(tmp_path: Path, prefetch: int = 256) -> LocalBroker:
    return LocalBroker(
        tmp_path / "q.sqlite3", prefetch=prefetch, visibility_timeout_s=30, poll_interval_s=0.01
    )


async def _dead_letter_all(broker: LocalBroker, reasons: list[str], *, raw: int = 0) -> None:
    """Publish one job per reason (and ``raw`` non-jobs), then dead-letter each in order."""
    jobs = [
        Job(item_id=f"item-{i}", url=f"http://img/{i}.jpg", run_id="run-1")
        for i in range(len(reasons))
    ]
    await broker.publish(jobs)
    await broker.publish_raw([b"junk-%d" % i for i in range(raw)])
    deliveries = await take_deliveries(broker, len(jobs) + raw)
    for delivery, reason in zip(deliveries, reasons, strict=False):
        await broker.dead_letter(delivery, reason, f"{reason}!", 3, decode_job(delivery.body))
    for delivery in deliveries[len(jobs) :]:
        await broker.dead_letter(delivery, "bad_message", "not json", 1, None)


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


def test_lane_stats_count_ready_leased_waiting_and_dead(tmp_path: Path) -> None:
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
        assert stats["dlq"].ready == 1
        assert all(s.unit == "jobs" for s in stats.values())
        await broker.close()

    asyncio.run(scenario())


def test_requeue_and_purge_over_the_local_broker(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = _broker(tmp_path)
        await _dead_letter_all(broker, ["http_5xx", "http_404", "http_5xx"], raw=1)
        now_s = 1_800_000_000.0
        flt = LetterFilter.build(now_s=now_s, reasons=["http_5xx", "bad_message"])
        report = await requeue_dead_letters(broker, flt, now_s=now_s)
        assert report.moved == Counter({"http_5xx": 2})
        assert report.not_requeueable == Counter({"bad_message": 1})
        back = [decode_job(d.body) for d in await take_deliveries(broker, 2)]
        assert [j.item_id for j in back] == ["item-0", "item-2"]
        assert all(j.lane is Lane.LIVE and j.attempt == 0 for j in back)
        assert [(h.reason, h.attempts, h.requeued_at_s) for h in back[0].history] == [
            ("http_5xx", 3, now_s)
        ]
        assert sorted(d.reason for d in await broker.dead_letters(100)) == [
            "bad_message",
            "http_404",
        ]

        archive = LetterArchive(tmp_path / "out" / "purged.jsonl")
        purged = await purge_dead_letters(
            broker, LetterFilter.build(now_s=now_s, reasons=["bad_message"]), archive=archive
        )
        assert purged.total == 1 and purged.archive == str(archive.path)
        lines = [orjson.loads(x) for x in archive.path.read_bytes().splitlines()]
        assert [(x["reason"], x["body"]) for x in lines] == [("bad_message", "junk-0")]
        assert [d.reason for d in await broker.dead_letters(100)] == ["http_404"]

        nothing = LetterArchive(tmp_path / "none.jsonl")
        empty = await purge_dead_letters(
            broker, LetterFilter.build(now_s=now_s, reasons=["timeout"]), archive=nothing
        )
        assert empty.total == 0 and empty.archive is None and not nothing.path.exists()
        await broker.close()

    asyncio.run(scenario())
