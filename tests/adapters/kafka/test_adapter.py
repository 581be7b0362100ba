"""What only the Kafka adapter does, against a real Kafka-protocol broker (Tansu on
loopback): offsets committed in order, retries through their delay-tier topics, revoked
partitions, and back-pressure over many partitions.

The semantics every adapter shares are in tests/contract/test_broker_contract.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from common.brokers.base import Delivery
from common.brokers.kafka.broker import KafkaBroker
from common.config import BrokerConfig
from common.errors import ConfigError
from common.schema import Job, Lane, decode_job
from imgfleet.factories import kafka_broker
from tests.support.aio import take
from tests.support.kafka import QUICK_JOIN, TansuBroker, broker_config

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0


def _jobs(n: int, lane: Lane = Lane.BULK, prefix: str = "item") -> list[Job]:
    return [
        Job(item_id=f"{prefix}-{i}", url=f"http://img/{prefix}/{i}", lane=lane) for i in range(n)
    ]


async def _take(stream: AsyncIterator[Delivery], n: int) -> list[Delivery]:
    return await take(stream, n, TIMEOUT_S)


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


def test_a_zero_job_window_is_refused(tansu: TansuBroker) -> None:
    # 0 (broker.prefetch's default) means "the pipeline's capacity": the composition root
    # computes it. Taken as a window, it kept every bulk and retry partition paused.
    config = broker_config(tansu, prefetch=0)
    with pytest.raises(ConfigError, match="at least 1 job"):
        kafka_broker(config)
    kafka_broker(config, prefetch=5)  # the computed window, as make_broker passes it


def test_commit_stops_at_the_lowest_unsettled_offset(tansu: TansuBroker) -> None:
    config = broker_config(tansu, partitions=1, **QUICK_JOIN)

    async def scenario() -> None:
        broker = kafka_broker(config)
        await broker.connect()
        await broker.connect()  # idempotent, topics included
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
        restarted = kafka_broker(config)
        stream = restarted.consume()
        redelivered = await _take(stream, 5)
        assert redelivered[0].body == got[1].body
        assert [d.body for d in redelivered] == [d.body for d in got[1:]]
        await restarted.ack(redelivered)
        await _pending_is(restarted, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await restarted.close()

    _run(scenario())


def test_a_retry_comes_back_through_its_delay_tier_topic(tansu: TansuBroker) -> None:
    # 0.5 s falls in the 0.3 s tier: the record waits there, then for its own due time.
    config = broker_config(tansu, retry_delays_s=[0.3, 5.0], **QUICK_JOIN)

    async def scenario() -> None:
        broker = kafka_broker(config)
        [job] = _jobs(1)
        await broker.publish([job])
        stream = broker.consume()
        [first] = await _take(stream, 1)
        due_s = time.time() + 0.5
        await broker.retry(first, decode_job(first.body).next_attempt(), 0.5)
        [again] = await _take(stream, 1)
        assert time.time() >= due_s - 0.01  # not when the shorter tier's wait is over
        assert again.delivery_id.startswith(f"{broker.topics.retries[0]}:")
        retried = decode_job(again.body)
        assert (retried.job_id, retried.attempt) == (job.job_id, 1)
        await broker.ack([again])
        await _pending_is(broker, 0)
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    _run(scenario())


async def _member(config: BrokerConfig) -> tuple[KafkaBroker, AsyncIterator[Delivery]]:
    broker = kafka_broker(config)
    return broker, broker.consume()


def test_revoked_partitions_commit_what_is_done_and_never_what_finishes_later(
    tansu: TansuBroker,
) -> None:
    config = broker_config(tansu, partitions=2, revoke_wait_s=0.5, **QUICK_JOIN)

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
    config = broker_config(tansu, prefetch=48, partitions=4, **QUICK_JOIN)

    async def scenario() -> None:
        broker = kafka_broker(config)
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
