"""The broker contract: what every adapter guarantees, written once and run on all three.

Each test runs against the local (SQLite) broker, RabbitMQ (the server on 127.0.0.1:5672)
and Kafka (Tansu on loopback), built as their adapter tests build them. The guarantees are
the role protocols' of ``common.brokers.base``: publish, consume and settle (ack, nack,
retry, dead-letter), the publish ledger, the dead-letter store and the queue figures.

Where the adapters legitimately differ, the difference is a named trait of the backend
(``Traits``), never a branch on its name. What only one adapter does (multi-job messages,
offset commit order, revocation, connection cuts, topology, lease expiry) is tested beside
it in ``tests/adapters/<kind>/``.

RabbitMQ runs here with one job per message, so its message counts are job counts. Kafka
runs with short sessions (``QUICK_JOIN``): a consumer's join is most of what a Kafka test
here costs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest

from common.brokers.base import Broker, DeadLetter, Delivery
from common.brokers.kafka.broker import KafkaBroker
from common.brokers.local.broker import LocalBroker
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.schema import Job, Lane, decode_job
from tests.support import kafka, rabbitmq

TIMEOUT_S = 30.0
# The local broker's lease: a job a consumer left unsettled is handed out again this long
# after the consumer went away (its heartbeat extends held leases every third of it).
LOCAL_VISIBILITY_S = 0.5
# Within RabbitMQ's test delay steps (0.1, 0.2 and 0.4 s): a longer delay would wait in
# the 0.4 s queue, whose TTL is the ceiling, and come back before it is due.
RETRY_DELAY_S = 0.3
# Bodies that never were jobs: not JSON, cut JSON, and JSON of an unknown schema.
MALFORMED = (
    b"{not json at all",
    b"{not json",
    orjson.dumps({"schema_version": 999, "item_id": "x"}),
)


class Adapter(Broker, Protocol):
    async def publish_raw(self, bodies: list[bytes], lane: str = "bulk") -> None:
        """Every adapter's test channel for bodies that are not jobs."""
        ...


@dataclass(frozen=True)
class Traits:
    """How an adapter's guarantees differ, where they legitimately do."""

    marks_redeliveries: bool  # a job handed out again has Delivery.redelivered set
    live_window_of_its_own: bool  # a live job overtakes even a full bulk window
    commits_in_background: bool  # pending() catches up with acks a moment later


TRAITS = {
    "local": Traits(
        marks_redeliveries=True, live_window_of_its_own=False, commits_in_background=False
    ),
    "rabbitmq": Traits(
        marks_redeliveries=True, live_window_of_its_own=True, commits_in_background=False
    ),
    # Kafka cannot tell a redelivery, and an ack is an offset its poll thread commits.
    "kafka": Traits(
        marks_redeliveries=False, live_window_of_its_own=True, commits_in_background=True
    ),
}


@dataclass
class BrokerUnderTest:
    """One adapter kind over one test's queue: every ``open`` is another process's view."""

    kind: str
    traits: Traits
    _build: Callable[[int], Adapter]
    _opened: list[Adapter] = field(default_factory=list)
    _streams: dict[int, list[AsyncIterator[Delivery]]] = field(default_factory=dict)

    def build(self, prefetch: int = 64) -> Adapter:
        adapter = self._build(prefetch)
        self._opened.append(adapter)
        return adapter

    async def open(self, prefetch: int = 64) -> Adapter:
        adapter = self.build(prefetch)
        await adapter.connect()
        return adapter

    def consume(self, adapter: Adapter) -> AsyncIterator[Delivery]:
        stream = adapter.consume()
        self._streams.setdefault(id(adapter), []).append(stream)
        return stream

    async def close(self, adapter: Adapter) -> None:
        """Stop its consumers and close it, settling nothing (like a process going away)."""
        for stream in self._streams.pop(id(adapter), []):
            await stream.aclose()  # type: ignore[attr-defined]
        await adapter.close()

    async def expect_pending(self, adapter: Adapter, n: int) -> None:
        if not self.traits.commits_in_background:
            assert await adapter.pending() == n
            return
        deadline_s = time.monotonic() + TIMEOUT_S
        while (pending := await adapter.pending()) != n:
            assert time.monotonic() < deadline_s, f"pending stayed {pending}, not {n}"
            await asyncio.sleep(0.05)

    def run(self, scenario: Coroutine[Any, Any, None]) -> None:
        async def main() -> None:
            try:
                await asyncio.wait_for(scenario, 120)
            finally:
                for adapter in self._opened:
                    await self.close(adapter)

        asyncio.run(main())


@pytest.fixture(
    params=[
        "local",
        pytest.param("rabbitmq", marks=pytest.mark.integration),
        pytest.param("kafka", marks=pytest.mark.integration),
    ]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    kind: str = request.param
    build: Callable[[int], Adapter]
    if kind == "local":
        path = tmp_path / "queue.sqlite3"

        def build(prefetch: int) -> Adapter:
            return LocalBroker(
                path,
                prefetch=prefetch,
                visibility_timeout_s=LOCAL_VISIBILITY_S,
                poll_interval_s=0.01,
            )

    elif kind == "rabbitmq":
        # rabbit_prefix deletes the queues after the test.
        config = rabbitmq.broker_config(
            request.getfixturevalue("rabbitmq_url"),
            request.getfixturevalue("rabbit_prefix"),
            rabbitmq={"jobs_per_message": 1},
        )

        def build(prefetch: int) -> Adapter:
            return RabbitMQBroker(config, prefetch=prefetch)

    else:
        config = kafka.broker_config(request.getfixturevalue("tansu"), **kafka.QUICK_JOIN)

        def build(prefetch: int) -> Adapter:
            return KafkaBroker.from_config(config.model_copy(update={"prefetch": prefetch}))

    yield BrokerUnderTest(kind, TRAITS[kind], build)


def jobs(n: int, prefix: str = "item", lane: Lane = Lane.BULK) -> list[Job]:
    return [
        Job(item_id=f"{prefix}-{i}", url=f"http://img.test/{prefix}/{i}.jpg", lane=lane)
        for i in range(n)
    ]


def item_ids(deliveries: list[Delivery]) -> list[str]:
    return [decode_job(d.body).item_id for d in deliveries]


def job_ids(published: list[Job]) -> set[str]:
    return {job.job_id for job in published}


async def take(stream: AsyncIterator[Delivery], n: int) -> list[Delivery]:
    async def go() -> list[Delivery]:
        return [await anext(stream) for _ in range(n)]

    return await asyncio.wait_for(go(), TIMEOUT_S)


async def nothing_more(stream: AsyncIterator[Delivery], wait_s: float = 1.0) -> bool:
    """Whether no delivery came within ``wait_s``; the wait ends the stream (consume anew)."""
    try:
        await asyncio.wait_for(anext(stream), wait_s)
    except TimeoutError:
        return True
    return False


# -- connecting ---------------------------------------------------------------------------


def test_connect_brings_the_link_up_and_close_takes_it_down(broker: BrokerUnderTest) -> None:
    async def scenario() -> None:
        adapter = broker.build()
        assert not adapter.is_connected()
        await adapter.connect()
        assert adapter.is_connected()
        assert adapter.assigned_partitions is None  # nothing is assigned before consuming
        await adapter.close()
        assert not adapter.is_connected()

    broker.run(scenario())


# -- consuming and settling ---------------------------------------------------------------


def test_acked_jobs_are_gone_and_the_rest_come_back_to_the_next_consumer(
    broker: BrokerUnderTest,
) -> None:
    async def scenario() -> None:
        first = await broker.open()
        published = jobs(40)
        await first.publish(published)
        assert await first.pending() == 40
        stream = broker.consume(first)
        got = await take(stream, 40)
        assert sorted(item_ids(got)) == sorted(j.item_id for j in published)
        assert len({d.delivery_id for d in got}) == 40
        await first.ack(got[:30])
        await broker.expect_pending(first, 10)
        # Five are handed back, five left unsettled when the consumer goes away (a crash).
        await first.nack(got[30:35])
        await broker.close(first)

        second = await broker.open()
        stream = broker.consume(second)
        back = await take(stream, 10)
        assert sorted(d.body for d in back) == sorted(d.body for d in got[30:])  # untouched
        if broker.traits.marks_redeliveries:
            assert all(d.redelivered for d in back)
        await second.ack(back)
        quiet = asyncio.create_task(nothing_more(stream))  # waits while pending is read
        await broker.expect_pending(second, 0)
        assert await quiet, "an acked job came back"
        # The commits outlive the consumers: what comes next is only what is new.
        await second.publish(jobs(1, "late"))
        stream = broker.consume(second)  # waiting for nothing ended the last one
        late = await take(stream, 1)
        assert item_ids(late) == ["late-0"]
        await second.ack(late)
        await broker.expect_pending(second, 0)

    broker.run(scenario())


def test_a_live_job_overtakes_the_bulk_backlog(broker: BrokerUnderTest) -> None:
    async def scenario() -> None:
        adapter = await broker.open(prefetch=8)
        await adapter.publish(jobs(300, "bulk"))
        stream = broker.consume(adapter)
        window = await take(stream, 8)  # the window is full and nothing is settled
        assert all(decode_job(d.body).lane is Lane.BULK for d in window)
        await adapter.publish(jobs(1, "live", Lane.LIVE))
        unsettled = window
        if not broker.traits.live_window_of_its_own:
            await adapter.ack(window)  # one window for both lanes: the live job needs room
            unsettled = []
        live = await take(stream, 1)
        assert item_ids(live) == ["live-0"]
        await adapter.ack([*unsettled, *live])
        more = await take(stream, 8)
        assert all(item.startswith("bulk-") for item in item_ids(more))
        await adapter.ack(more)

    broker.run(scenario())


def test_a_retry_comes_back_after_its_delay_with_the_next_attempt(
    broker: BrokerUnderTest,
) -> None:
    async def scenario() -> None:
        adapter = await broker.open()
        [job] = jobs(1)
        await adapter.publish([job])
        stream = broker.consume(adapter)
        [first] = await take(stream, 1)
        due_s = time.time() + RETRY_DELAY_S
        await adapter.retry(first, decode_job(first.body).next_attempt(), RETRY_DELAY_S)
        assert await adapter.pending() >= 1  # the retry waits, so work is pending
        await broker.expect_pending(adapter, 1)
        [again] = await take(stream, 1)
        assert time.time() >= due_s - 0.01  # never handed out before it is due
        retried = decode_job(again.body)
        assert (retried.item_id, retried.job_id, retried.attempt) == (job.item_id, job.job_id, 1)
        await adapter.ack([again])
        await broker.expect_pending(adapter, 0)

    broker.run(scenario())


# -- dead letters -------------------------------------------------------------------------


def test_dead_letters_keep_the_original_bytes_and_the_failure(broker: BrokerUnderTest) -> None:
    async def scenario() -> None:
        adapter = await broker.open()
        job = Job(item_id="gone-0", url="http://img.test/gone.jpg", run_id="night-1")
        await adapter.publish([job])
        await adapter.publish_raw(list(MALFORMED[:1]))
        await adapter.publish_raw(list(MALFORMED[1:]), lane="live")
        stream = broker.consume(adapter)
        by_body = {d.body: d for d in await take(stream, 4)}
        for body in MALFORMED:
            await adapter.dead_letter(by_body[body], "bad_message", "not a job", 1, None)
        failed = job.next_attempt()
        await adapter.dead_letter(by_body[job.to_bytes()], "http_404", "GET /gone: 404", 3, failed)
        quiet = asyncio.create_task(nothing_more(stream))  # waits while the DLQ is read
        await broker.expect_pending(adapter, 0)

        first_read = await adapter.dead_letters()
        assert await adapter.dead_letters() == first_read  # reading the DLQ does not drain it
        assert len(first_read) == 4
        letters = {d.body: d for d in first_read}
        assert set(letters) == {*MALFORMED, job.to_bytes()}
        dead_job = letters[job.to_bytes()]
        assert (dead_job.reason, dead_job.error, dead_job.attempts) == (
            "http_404",
            "GET /gone: 404",
            3,
        )
        assert (dead_job.item_id, dead_job.run_id) == ("gone-0", "night-1")
        assert abs(dead_job.failed_at_s - time.time()) < 60
        assert {letters[b].reason for b in MALFORMED} == {"bad_message"}
        assert all(letters[b].item_id is None for b in MALFORMED)
        assert len(await adapter.dead_letters(limit=2)) == 2
        assert await quiet, "a dead-lettered job came back"

    broker.run(scenario())


async def dead_letter_in_order(
    broker: BrokerUnderTest, adapter: Adapter, reasons: list[str]
) -> None:
    """One job per reason, dead-lettered in item order (item-0 first) with that reason."""
    failing = [
        Job(item_id=f"item-{i}", url=f"http://img.test/{i}.jpg", run_id="run-1")
        for i in range(len(reasons))
    ]
    await adapter.publish(failing)
    # Kafka hands out its partitions interleaved: settle in item order, not arrival order.
    got = await take(broker.consume(adapter), len(failing))
    by_item = dict(zip(item_ids(got), got, strict=True))
    for job, reason in zip(failing, reasons, strict=True):
        await adapter.dead_letter(by_item[job.item_id], reason, f"{reason}!", 3, job)


def test_settle_removes_the_selected_letters_in_batches_and_keeps_the_rest_in_order(
    broker: BrokerUnderTest,
) -> None:
    async def scenario() -> None:
        adapter = await broker.open()
        await dead_letter_in_order(broker, adapter, ["http_5xx", "http_404"] * 5)
        batches: list[list[str | None]] = []

        async def act(batch: list[DeadLetter]) -> None:
            batches.append([d.item_id for d in batch])

        settled = await adapter.settle_dead_letters(
            lambda d: d.reason == "http_5xx", act, batch_size=2
        )
        assert settled == 5
        assert batches == [["item-0", "item-2"], ["item-4", "item-6"], ["item-8"]]
        rest = await adapter.dead_letters(100)
        assert [d.item_id for d in rest] == ["item-1", "item-3", "item-5", "item-7", "item-9"]

    broker.run(scenario())


def test_a_failed_action_keeps_its_batch_and_a_limit_stops_early(
    broker: BrokerUnderTest,
) -> None:
    async def scenario() -> None:
        adapter = await broker.open()
        await dead_letter_in_order(broker, adapter, ["timeout"] * 6)
        calls = 0

        async def act(batch: list[DeadLetter]) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("the republish failed")

        with pytest.raises(RuntimeError):
            await adapter.settle_dead_letters(lambda d: True, act, batch_size=2)
        # The first batch went; the failed one and everything after it stayed.
        assert [d.item_id for d in await adapter.dead_letters(100)] == [
            f"item-{i}" for i in range(2, 6)
        ]

        seen: list[str | None] = []

        async def record(batch: list[DeadLetter]) -> None:
            seen.extend(d.item_id for d in batch)

        assert await adapter.settle_dead_letters(lambda d: True, record, limit=3) == 3
        assert seen == ["item-2", "item-3", "item-4"]
        assert [d.item_id for d in await adapter.dead_letters(100)] == ["item-5"]

    broker.run(scenario())


# -- queue figures ------------------------------------------------------------------------


def test_pending_and_lane_stats_count_what_waits_in_each_lane(broker: BrokerUnderTest) -> None:
    async def scenario() -> None:
        adapter = await broker.open()
        await adapter.publish(jobs(3, "b"))
        await adapter.publish(jobs(1, "l", Lane.LIVE))
        assert await adapter.pending() == 4
        stats = {s.lane: s for s in await adapter.lane_stats()}
        assert set(stats) == {"live", "bulk", "retry", "dlq"}
        ready = {lane: s.ready for lane, s in stats.items()}
        assert ready == {"live": 1, "bulk": 3, "retry": 0, "dlq": 0}

    broker.run(scenario())


# -- the publish ledger -------------------------------------------------------------------


def test_the_ledger_holds_what_was_published_with_it_since_a_mark(
    broker: BrokerUnderTest,
) -> None:
    # What a dropped ledger still answers is the adapter's: Kafka's ledger is the lane
    # topics themselves, kept until retention.
    async def scenario() -> None:
        adapter = await broker.open()
        capacity = adapter.ledger_capacity(100)
        assert capacity is None or capacity > 0
        before = jobs(2, "before")
        await adapter.publish(before, ledger="run-a")
        mark = await adapter.ledger_mark("run-a")
        after = jobs(3, "after")
        await adapter.publish(after, ledger="run-a")
        await adapter.publish(jobs(2, "plain"))
        other = jobs(2, "other")
        await adapter.publish(other, ledger="run-b")

        since = await adapter.ledger_job_ids("run-a", since=mark)
        # Every job published with the ledger after the mark, maybe older ones, nothing else.
        assert job_ids(after) <= since <= job_ids(before) | job_ids(after)
        assert await adapter.ledger_job_ids("run-a") == job_ids(before) | job_ids(after)
        assert await adapter.ledger_job_ids("run-b") == job_ids(other)
        assert await adapter.ledger_job_ids("never-used") == set()
        await adapter.drop_ledger("run-a")
        await adapter.drop_ledger("never-used")  # a missing ledger is fine
        assert await adapter.ledger_job_ids("run-b") == job_ids(other)
        await adapter.drop_ledger("run-b")

    broker.run(scenario())
