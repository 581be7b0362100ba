"""The Kafka adapter against a real Kafka-protocol broker (Tansu on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from common.brokers.base import Delivery
from common.brokers.kafka.broker import KafkaBroker
from common.config import BrokerConfig
from common.schema import Job, Lane, decode_job
from tests.support.kafka import TansuBroker, broker_config

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0


def _jobs(n: int, lane: Lane = Lane.BULK, prefix: str = "item") -> list[Job]:
    return [
        Job(item_id=f"{prefix}-{i}", url=f"http://img/{prefix}/{i}", lane=lane) for i in range(n)
    ]


async def _take(stream: AsyncIterator[Delivery], n: int) -> list[Delivery]:
    async def go() -> list[Delivery]:
        return [await anext(stream) for _ in range(n)]

    return await asyncio.wait_for(go(), TIMEOUT_S)


async def _until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline_s = time.monotonic() + TIMEOUT_S
    while not await predicate():
        if time.monotonic() > deadline_s:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _pending_is(broker: KafkaBroker, n: int) -> None:
    async def check() -> bool:
        return await broker.pending() == n

    await _until(check, f"pending == {n}")


def _run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


def test_publish_consume_ack_commits_and_a_new_member_starts_after_it(tansu: TansuBroker) -> None:
    config = broker_config(tansu)

    async def scenario() -> None:
        producer = KafkaBroker.from_config(config)
        await producer.connect()
        await producer.connect()  # idempotent, topics included
        jobs = _jobs(40)
        await producer.publish(jobs)
        assert await producer.pending() == 40
        await producer.close()

        worker = KafkaBroker.from_config(config)
        stream = worker.consume()
        got = await _take(stream, 40)
        assert sorted(decode_job(d.body).item_id for d in got) == sorted(j.item_id for j in jobs)
        # One item's records share a partition and arrive in publish order.
        assert len({d.delivery_id for d in got}) == 40
        await worker.ack(got[:30])
        await _pending_is(worker, 10)
        await worker.ack(got[30:])
        await _pending_is(worker, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await worker.close()

        # The group's commits survive the consumer: a new one gets only new records.
        again = KafkaBroker.from_config(config)
        await again.publish(_jobs(1, prefix="late"))
        stream = again.consume()
        [late] = await _take(stream, 1)
        assert decode_job(late.body).item_id == "late-0"
        await again.ack([late])
        await _pending_is(again, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await again.close()

    _run(scenario())


def test_commit_stops_at_the_lowest_unsettled_offset(tansu: TansuBroker) -> None:
    config = broker_config(tansu, partitions=1)

    async def scenario() -> None:
        broker = KafkaBroker.from_config(config)
        await broker.publish(_jobs(6))
        stream = broker.consume()
        got = await _take(stream, 6)
        offsets = [int(d.delivery_id.rsplit(":", 1)[1]) for d in got]
        assert offsets == sorted(offsets)
        await broker.ack([got[0], *got[2:]])  # all but the second
        await _pending_is(broker, 5)  # committed up to the gap only
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()  # exits without settling the second one

        # A restarted member resumes at the gap: the unsettled job and those after it.
        restarted = KafkaBroker.from_config(config)
        stream = restarted.consume()
        redelivered = await _take(stream, 5)
        assert redelivered[0].body == got[1].body
        assert [d.body for d in redelivered] == [d.body for d in got[1:]]
        await restarted.ack(redelivered)
        await _pending_is(restarted, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await restarted.close()

    _run(scenario())


def test_retry_waits_for_its_due_time_then_comes_back_with_the_next_attempt(
    tansu: TansuBroker,
) -> None:
    config = broker_config(tansu, retry_delays_s=[0.3, 5.0])

    async def scenario() -> None:
        broker = KafkaBroker.from_config(config)
        [job] = _jobs(1)
        await broker.publish([job])
        stream = broker.consume()
        [first] = await _take(stream, 1)
        due_s = time.time() + 0.5
        await broker.retry(first, decode_job(first.body).next_attempt(), 0.5)
        assert await broker.pending() >= 1  # the retry record waits, so work is pending
        [again] = await _take(stream, 1)
        assert time.time() >= due_s - 0.01  # never handed out before it is due
        assert again.delivery_id.startswith(f"{broker.topics.retries[0]}:")
        retried = decode_job(again.body)
        assert (retried.job_id, retried.attempt) == (job.job_id, 1)
        await broker.ack([again])
        await _pending_is(broker, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    _run(scenario())


def test_dead_letter_keeps_the_original_bytes_and_the_reason(tansu: TansuBroker) -> None:
    config = broker_config(tansu)
    malformed = [b"{not json", orjson.dumps({"schema_version": 999, "item_id": "x"})]

    async def scenario() -> None:
        broker = KafkaBroker.from_config(config)
        [job] = _jobs(1, prefix="gone")
        await broker.publish([job])
        await broker.publish_raw(malformed, lane="live")
        stream = broker.consume()
        got = await _take(stream, 3)
        by_body = {d.body: d for d in got}
        for body in malformed:
            await broker.dead_letter(by_body[body], "bad_message", "not a job", 1, None)
        await broker.dead_letter(
            by_body[job.to_bytes()], "http_404", "GET /gone: 404", 3, job.next_attempt()
        )
        await _pending_is(broker, 0)
        first_read = await broker.dead_letters()
        second_read = await broker.dead_letters()  # reading the DLQ does not consume it
        assert first_read == second_read
        assert len(first_read) == 3
        letters = {d.body: d for d in first_read}
        assert set(letters) == {*malformed, job.to_bytes()}
        dead_job = letters[job.to_bytes()]
        assert (dead_job.reason, dead_job.error, dead_job.attempts) == (
            "http_404",
            "GET /gone: 404",
            3,
        )
        assert (dead_job.item_id, dead_job.run_id) == ("gone-0", job.run_id)
        assert abs(dead_job.failed_at_s - time.time()) < 60
        assert {letters[b].reason for b in malformed} == {"bad_message"}
        assert all(letters[b].item_id is None for b in malformed)
        assert len(await broker.dead_letters(limit=2)) == 2
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    _run(scenario())


def test_live_records_overtake_a_full_bulk_window(tansu: TansuBroker) -> None:
    config = broker_config(tansu, prefetch=8)

    async def scenario() -> None:
        broker = KafkaBroker.from_config(config)
        await broker.publish(_jobs(300, prefix="bulk"))
        stream = broker.consume()
        held = await _take(stream, 8)  # the bulk window is full and nothing is settled
        await broker.publish(_jobs(1, lane=Lane.LIVE, prefix="live"))
        [live] = await _take(stream, 1)
        assert decode_job(live.body).item_id == "live-0"
        assert all(decode_job(d.body).lane is Lane.BULK for d in held)
        await broker.ack([*held, live])
        more = await _take(stream, 8)
        assert all(decode_job(d.body).item_id.startswith("bulk-") for d in more)
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    _run(scenario())


async def _member(config: BrokerConfig) -> tuple[KafkaBroker, AsyncIterator[Delivery]]:
    broker = KafkaBroker.from_config(config)
    return broker, broker.consume()


def test_revoked_partitions_commit_what_is_done_and_never_what_finishes_later(
    tansu: TansuBroker,
) -> None:
    config = broker_config(tansu, partitions=2, revoke_wait_s=0.5)

    async def scenario() -> None:
        first, first_stream = await _member(config)
        await first.publish(_jobs(20))
        got = await _take(first_stream, 20)
        by_partition: dict[str, list[Delivery]] = {}
        for delivery in got:
            by_partition.setdefault(delivery.delivery_id.rsplit(":", 1)[0], []).append(delivery)
        assert len(by_partition) == 2 and all(len(ds) >= 2 for ds in by_partition.values())
        # The first half of each partition is done, so whichever partition moves has
        # both committed and unfinished records.
        done = [d for ds in by_partition.values() for d in ds[: len(ds) // 2]]
        unfinished = [d for ds in by_partition.values() for d in ds[len(ds) // 2 :]]
        await first.ack(done)
        await _pending_is(first, len(unfinished))

        # A second member joins: the first gives up partitions after its short wait,
        # committing what is done; what it finishes afterwards must not be committed.
        second, second_stream = await _member(config)
        redelivered = await _take(second_stream, 1)
        unfinished_bodies = {d.body for d in unfinished}
        assert redelivered[0].body in unfinished_bodies  # done work is not handed out again

        await first.ack(unfinished)  # late: some of these partitions belong to `second` now
        await asyncio.sleep(0.5)
        owned_by_second = {d.delivery_id.rsplit(":", 1)[0] for d in redelivered}
        stale = [d for d in unfinished if d.delivery_id.rsplit(":", 1)[0] in owned_by_second]
        assert stale, "the second member took none of the unfinished records' partitions"
        assert await first.pending() >= len(stale)  # the old owner's late acks count for nothing

        count = len(stale) - 1
        redelivered += await _take(second_stream, count) if count else []
        assert sorted(d.body for d in redelivered) == sorted(d.body for d in stale)
        await second.ack(redelivered)
        await _pending_is(second, 0)
        for broker, stream in ((first, first_stream), (second, second_stream)):
            await stream.aclose()  # type: ignore[attr-defined]
            await broker.close()

    _run(scenario())


def test_a_small_window_over_many_partitions_drains_every_record(tansu: TansuBroker) -> None:
    # Back-pressure pauses and resumes partitions hundreds of times here; kafka-python
    # 3.0.12 parks fetched data of a paused partition and can fail to hand it back, which
    # once stalled consumption for good.
    config = broker_config(tansu, prefetch=48, partitions=4)

    async def scenario() -> None:
        broker = KafkaBroker.from_config(config)
        n = 4000
        await broker.publish(_jobs(n))
        stream = broker.consume()
        seen: set[str] = set()
        batch: list[Delivery] = []
        while len(seen) < n:
            [delivery] = await _take(stream, 1)
            seen.add(delivery.body.decode())
            batch.append(delivery)
            if len(batch) >= 40 or len(seen) == n:
                await broker.ack(batch)
                batch = []
        await _pending_is(broker, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    _run(scenario())
