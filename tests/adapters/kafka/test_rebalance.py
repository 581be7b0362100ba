"""Rebalances that keep partitions with the same consumer, against Tansu on loopback.

kafka-python 3 keeps a partition's fetch position across an eager rebalance when the
partition stays with the member, so the consumer must put the position back itself to the
first record it has not handed out: records it had fetched and dropped at the revoke are
otherwise skipped, and the commit after the next settled record passes over them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress

import pytest
from kafka import KafkaConsumer
from kafka.partitioner.default import murmur2

from common.brokers.base import Delivery
from common.brokers.kafka.broker import KafkaBroker
from common.brokers.kafka.client import client_settings
from common.config import BrokerConfig
from common.schema import Job, decode_job
from imgfleet.factories import kafka_broker
from tests.support.kafka import QUICK_JOIN, TansuBroker, broker_config

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0


def _jobs_on(partition: int, partitions: int, n: int, tag: str) -> list[Job]:
    """``n`` jobs whose key (the item id) the default partitioner sends to ``partition``."""
    jobs: list[Job] = []
    i = 0
    while len(jobs) < n:
        item = f"{tag}-{i}"
        if (murmur2(item.encode()) & 0x7FFFFFFF) % partitions == partition:
            jobs.append(Job(item_id=item, url=f"http://img/{item}"))
        i += 1
    return jobs


@contextmanager
def _member_of_another_topic(config: BrokerConfig, topic: str) -> Iterator[None]:
    """A member of the same group that subscribes to another topic only, polled throughout.

    The range assignor splits each topic among its own subscribers, so the workers' member
    keeps every partition it had, yet goes through a full eager revoke and assign. It must
    keep polling: a later rebalance (the leader learning the topic's metadata) waits for it.
    """
    k = config.kafka
    other = KafkaConsumer(
        **client_settings(config).kwargs(
            group_id=k.group_id,
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            client_id="imgfleet-test-other-member",
        )
    )
    other.subscribe([topic])
    joined, stop = threading.Event(), threading.Event()

    def poll() -> None:
        while not stop.is_set():
            other.poll(timeout_ms=100)
            if other.assignment():
                joined.set()

    thread = threading.Thread(target=poll, name="other-member", daemon=True)
    thread.start()
    try:
        if not joined.wait(TIMEOUT_S):
            raise AssertionError("the second member never got its assignment")
        yield
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        other.close()


async def _ack_until(
    broker: KafkaBroker, stream: AsyncIterator[Delivery], wanted: set[bytes], timeout_s: float
) -> list[Delivery]:
    """Take and ack deliveries until every wanted body came (or the time is up)."""
    got: list[Delivery] = []

    async def go() -> None:
        while not wanted <= {d.body for d in got}:
            delivery = await anext(stream)
            await broker.ack([delivery])
            got.append(delivery)

    with suppress(TimeoutError):
        await asyncio.wait_for(go(), timeout_s)
    return got


async def _pending_once_committed(broker: KafkaBroker) -> int:
    """``pending()`` once it reaches 0 (commits run on the poll thread), or when time is up."""
    deadline_s = time.monotonic() + TIMEOUT_S
    while True:
        pending = await broker.pending()
        if pending == 0 or time.monotonic() > deadline_s:
            return pending
        await asyncio.sleep(0.05)


def test_records_fetched_but_not_handed_out_survive_a_revoke_that_keeps_the_partition(
    tansu: TansuBroker,
) -> None:
    # A window of one job over two partitions: one poll fetches both partitions' records,
    # one goes out and is held past the short revoke wait, the rest wait in the buffer and
    # are dropped at the revoke. Both partitions come back to the same member.
    config = broker_config(tansu, partitions=2, prefetch=1, revoke_wait_s=0.3, **QUICK_JOIN)

    async def scenario() -> None:
        broker = kafka_broker(config)
        first = _jobs_on(0, 2, 3, "a") + _jobs_on(1, 2, 3, "a")
        await broker.publish(first)
        stream = broker.consume()
        held = await asyncio.wait_for(anext(stream), TIMEOUT_S)
        other = _member_of_another_topic(config, broker.topics.retries[-1])
        await asyncio.to_thread(other.__enter__)
        try:
            await broker.ack([held])  # settled after the revoke: its partition came back
            later = _jobs_on(0, 2, 2, "b") + _jobs_on(1, 2, 2, "b")
            await broker.publish(later)
            wanted = {job.to_bytes() for job in first + later} - {held.body}
            got = await _ack_until(broker, stream, wanted, TIMEOUT_S)
            pending = await _pending_once_committed(broker)
            missing = sorted(decode_job(b).item_id for b in wanted - {d.body for d in got})
            # The bug: the kept partition resumed after its dropped records, and the commit
            # after its next acked record passed over them (pending 0, jobs never seen).
            assert missing == [], f"never delivered, pending={pending}: {missing}"
            assert pending == 0
        finally:
            await asyncio.to_thread(other.__exit__, None, None, None)
            await stream.aclose()  # type: ignore[attr-defined]
            await broker.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
