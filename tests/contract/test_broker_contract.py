"""The broker contract: what every adapter guarantees, written once and run on all three.

Each test runs against the local (SQLite) broker, RabbitMQ (the server on 127.0.0.1:5672)
and Kafka (Tansu on loopback), built as their adapter tests build them. The guarantees are
the role protocols' of ``common.brokers.base``: publish, consume and settle (ack, nack,
retry, dead-letter), the publish ledger, the dead-letter store and the queue figures, and
what the ops commands (``imgfleet status``, ``dlq list``, ``requeue``, ``purge``, and
``producers.ops`` beneath them) do with them.

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
import functools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest

from common.brokers.base import Broker, DeadLetter, Delivery
from common.brokers.local.broker import LocalBroker
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.config import load_settings
from common.schema import Job, Lane, decode_job
from common.storage.local import LocalStorage
from imgfleet.factories import kafka_broker
from index.runs import RunInfo, write_run
from producers.ops.dead_letters import LetterArchive, purge_dead_letters, requeue_dead_letters
from producers.ops.filters import LetterFilter
from tests.support import kafka, rabbitmq
from tests.support.aio import nothing_more, take
from tests.support.cli import Cli, config_env

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
    """How an adapter's guarantees differ, where they legitimately do (the defaults are
    what most of them do)."""

    marks_redeliveries: bool = True  # a job handed out again has Delivery.redelivered set
    live_window_of_its_own: bool = True  # a live job overtakes even a full bulk window
    commits_in_background: bool = False  # pending() catches up with acks a moment later
    orders_a_lane: bool = True  # a lane hands its jobs out in the order they were published
    # The lane figures: what live and bulk count (``LaneStats.unit``), whether the jobs
    # handed out and not settled are counted (``in_flight``; else None), and whether the
    # workers' lag is reported (``lag``; else None).
    work_lane_unit: str = "jobs"
    counts_in_flight: bool = False
    reports_lag: bool = False


TRAITS = {
    # One window for both lanes; leases are rows it can count.
    "local": Traits(live_window_of_its_own=False, counts_in_flight=True),
    # A work queue counts messages (one carries up to jobs_per_message jobs: one here).
    "rabbitmq": Traits(work_lane_unit="messages"),
    # Kafka cannot tell a redelivery, and an ack is an offset its poll thread commits; a
    # lane is several partitions, each in order; its figures are the group's lag.
    "kafka": Traits(
        marks_redeliveries=False, commits_in_background=True, orders_a_lane=False, reports_lag=True
    ),
}


@dataclass
class BrokerUnderTest:
    """One adapter kind over one test's queue: every ``open`` is another process's view.

    ``section`` is the same broker as the ``[broker]`` settings the CLI reads."""

    kind: str
    traits: Traits
    section: dict[str, Any]
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
        """Run ``scenario``, then close the adapters it opened (a test may run several)."""

        async def main() -> None:
            try:
                await asyncio.wait_for(scenario, 120)
            finally:
                opened, self._opened = self._opened, []
                for adapter in opened:
                    await self.close(adapter)

        asyncio.run(main())

    def cli(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> Cli:
        """`imgfleet` on this broker, with its store at ``tmp_path / "store"``."""
        sections = {"broker": self.section, "storage": {"root": str(tmp_path / "store")}}
        return Cli(monkeypatch, capsys, config_env(tmp_path / "imgfleet.toml", sections))


def scenario(
    test: Callable[[BrokerUnderTest], Coroutine[Any, Any, None]],
) -> Callable[[BrokerUnderTest], None]:
    """A contract test written as its scenario: run on the broker, its adapters closed."""

    @functools.wraps(test)
    def run(broker: BrokerUnderTest) -> None:
        broker.run(test(broker))

    return run


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
        section: dict[str, Any] = {"kind": "local", "local_path": str(path)}

        def build(prefetch: int) -> Adapter:
            return LocalBroker(
                path,
                prefetch=prefetch,
                visibility_timeout_s=LOCAL_VISIBILITY_S,
                poll_interval_s=0.01,
            )

    elif kind == "rabbitmq":
        # rabbit_prefix deletes the queues after the test.
        section = rabbitmq.rabbit_settings(
            request.getfixturevalue("rabbitmq_url"),
            request.getfixturevalue("rabbit_prefix"),
            rabbitmq={"jobs_per_message": 1},
        )
        config = load_settings(broker=section).broker

        def build(prefetch: int) -> Adapter:
            return RabbitMQBroker(config, prefetch=prefetch)

    else:
        section = kafka.broker_settings(request.getfixturevalue("tansu"), **kafka.QUICK_JOIN)
        config = load_settings(broker=section).broker

        def build(prefetch: int) -> Adapter:
            return kafka_broker(config.model_copy(update={"prefetch": prefetch}))

    yield BrokerUnderTest(kind, TRAITS[kind], section, build)


def jobs(n: int, prefix: str = "item", lane: Lane = Lane.BULK) -> list[Job]:
    return [
        Job(item_id=f"{prefix}-{i}", url=f"http://img.test/{prefix}/{i}.jpg", lane=lane)
        for i in range(n)
    ]


def item_ids(deliveries: list[Delivery]) -> list[str]:
    return [decode_job(d.body).item_id for d in deliveries]


def job_ids(published: list[Job]) -> set[str]:
    return {job.job_id for job in published}


# -- connecting ---------------------------------------------------------------------------


@scenario
async def test_connect_brings_the_link_up_and_close_takes_it_down(broker: BrokerUnderTest) -> None:
    adapter = broker.build()
    assert not adapter.is_connected()
    await adapter.connect()
    assert adapter.is_connected()
    assert adapter.assigned_partitions is None  # nothing is assigned before consuming
    await adapter.close()
    assert not adapter.is_connected()


# -- consuming and settling ---------------------------------------------------------------


@scenario
async def test_acked_jobs_are_gone_and_the_rest_come_back_to_the_next_consumer(
    broker: BrokerUnderTest,
) -> None:
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


@scenario
async def test_a_live_job_overtakes_the_bulk_backlog(broker: BrokerUnderTest) -> None:
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


@scenario
async def test_a_retry_comes_back_after_its_delay_with_the_next_attempt(
    broker: BrokerUnderTest,
) -> None:
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


# -- dead letters -------------------------------------------------------------------------


@scenario
async def test_dead_letters_keep_the_original_bytes_and_the_failure(
    broker: BrokerUnderTest,
) -> None:
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


async def dead_letter_in_order(
    broker: BrokerUnderTest, adapter: Adapter, reasons: list[str], raw: tuple[bytes, ...] = ()
) -> None:
    """One job per reason, dead-lettered in item order (item-0 first) with that reason;
    then each ``raw`` body, which is no job, as a bad message."""
    failing = [
        Job(item_id=f"item-{i}", url=f"http://img.test/{i}.jpg", run_id="run-1")
        for i in range(len(reasons))
    ]
    await adapter.publish(failing)
    if raw:
        await adapter.publish_raw(list(raw))
    # Kafka hands out its partitions interleaved: settle in item order, not arrival order.
    got = await take(broker.consume(adapter), len(failing) + len(raw))
    by_body = {d.body: d for d in got}
    for job, reason in zip(failing, reasons, strict=True):
        await adapter.dead_letter(by_body[job.to_bytes()], reason, f"{reason}!", 3, job)
    for body in raw:
        await adapter.dead_letter(by_body[body], "bad_message", "not a job", 1, None)


@scenario
async def test_settle_removes_the_selected_letters_in_batches_and_keeps_the_rest_in_order(
    broker: BrokerUnderTest,
) -> None:
    adapter = await broker.open()
    await dead_letter_in_order(broker, adapter, ["http_5xx", "http_404"] * 5)
    batches: list[list[str | None]] = []

    async def act(batch: list[DeadLetter]) -> None:
        batches.append([d.item_id for d in batch])

    settled = await adapter.settle_dead_letters(lambda d: d.reason == "http_5xx", act, batch_size=2)
    assert settled == 5
    assert batches == [["item-0", "item-2"], ["item-4", "item-6"], ["item-8"]]
    rest = await adapter.dead_letters(100)
    assert [d.item_id for d in rest] == ["item-1", "item-3", "item-5", "item-7", "item-9"]


@scenario
async def test_a_failed_action_keeps_its_batch_and_a_limit_stops_early(
    broker: BrokerUnderTest,
) -> None:
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


# -- queue figures ------------------------------------------------------------------------


@scenario
async def test_pending_and_lane_stats_count_what_waits_in_each_lane(
    broker: BrokerUnderTest,
) -> None:
    adapter = await broker.open()
    await adapter.publish(jobs(3, "b"))
    await adapter.publish(jobs(1, "l", Lane.LIVE))
    assert await adapter.pending() == 4
    stats = {s.lane: s for s in await adapter.lane_stats()}
    assert set(stats) == {"live", "bulk", "retry", "dlq"}
    ready = {lane: s.ready for lane, s in stats.items()}
    assert ready == {"live": 1, "bulk": 3, "retry": 0, "dlq": 0}
    unit = broker.traits.work_lane_unit
    assert {lane: s.unit for lane, s in stats.items()} == {
        "live": unit,
        "bulk": unit,
        "retry": "jobs",
        "dlq": "jobs",
    }
    in_flight = {lane: s.in_flight for lane, s in stats.items()}
    assert in_flight == dict.fromkeys(stats, 0 if broker.traits.counts_in_flight else None)
    lag = {lane: s.lag for lane, s in stats.items() if lane != "dlq"}
    waiting = {"live": 1, "bulk": 3, "retry": 0}  # the lag: records the group has not committed
    assert lag == (waiting if broker.traits.reports_lag else dict.fromkeys(waiting))
    # A dead letter is counted in the DLQ's figure as soon as it is written.
    stream = broker.consume(adapter)
    [first] = await take(stream, 1)
    await adapter.dead_letter(first, "http_404", "gone", 1, decode_job(first.body))
    assert {s.lane: s.ready for s in await adapter.lane_stats()}["dlq"] == 1


# -- the publish ledger -------------------------------------------------------------------


@scenario
async def test_the_ledger_holds_what_was_published_with_it_since_a_mark(
    broker: BrokerUnderTest,
) -> None:
    # What a dropped ledger still answers is the adapter's: Kafka's ledger is the lane
    # topics themselves, kept until retention.
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


# -- the ops commands ---------------------------------------------------------------------


def test_ops_commands_report_requeue_and_purge_the_dead_letters(
    broker: BrokerUnderTest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`imgfleet status`, `requeue --dry-run`, `purge` and `dlq list` over the CLI, and
    requeue and purge through ``producers.ops`` (whose clock the test sets)."""
    cli = broker.cli(tmp_path, monkeypatch, capsys)
    now_s = 1_800_000_000.0
    write_run(LocalStorage(tmp_path / "store"), RunInfo("run-1", "cat.jsonl", 5, time.time() - 60))

    async def fill() -> None:
        adapter = await broker.open()
        reasons = ["http_5xx", "http_404", "http_5xx", "http_404", "http_5xx"]
        await dead_letter_in_order(broker, adapter, reasons, raw=(b"junk-0",))
        await broker.expect_pending(adapter, 0)

    broker.run(fill())
    status = cli("status")
    assert status["dead_letters"] == {
        "total": 6,
        "by_reason": {"http_5xx": 3, "http_404": 2, "bad_message": 1},
    }
    assert {lane["lane"] for lane in status["lanes"]} == {"live", "bulk", "retry", "dlq"}
    (run,) = status["runs"]
    assert (run["expected"], run["indexed"], run["failed"], run["remaining"]) == (5, 0, 5, 0)
    dry = cli("requeue", "--reason", "http_5xx", "--reason", "bad_message", "--dry-run")
    assert dry["dry_run"] and dry["by_reason"] == {"http_5xx": 3}
    assert dry["not_requeueable_by_reason"] == {"bad_message": 1}

    async def requeue() -> None:
        adapter = await broker.open()
        assert len(await adapter.dead_letters(100)) == 6  # a dry run moves nothing
        flt = LetterFilter.build(now_s=now_s, reasons=["http_5xx", "bad_message"])
        report = await requeue_dead_letters(adapter, flt, now_s=now_s)
        assert report.moved == Counter({"http_5xx": 3})
        # A letter whose body is not a job is counted and stays, for purge.
        assert report.not_requeueable == Counter({"bad_message": 1})
        assert sorted(d.reason for d in await adapter.dead_letters(100)) == [
            "bad_message",
            "http_404",
            "http_404",
        ]

    broker.run(requeue())
    (run,) = cli("status", "--run", "run-1")["runs"]
    assert (run["failed"], run["remaining"], run["failures_by_reason"]) == (
        2,
        3,
        {"http_404": 2},
    )
    lanes = {lane["lane"]: lane for lane in cli("status")["lanes"]}
    assert (lanes["live"]["ready"], lanes["dlq"]["ready"]) == (3, 3)
    assert lanes["live"]["lag"] == (3 if broker.traits.reports_lag else None)

    async def requeued_then_purged() -> None:
        adapter = await broker.open()
        got = await take(broker.consume(adapter), 3)
        back = [decode_job(d.body) for d in got]
        ids = [j.item_id for j in back]
        expected = ["item-0", "item-2", "item-4"]
        assert (ids if broker.traits.orders_a_lane else sorted(ids)) == expected
        # Back on the live lane with a fresh set of attempts, the failure in its history.
        assert all(j.lane is Lane.LIVE and j.attempt == 0 for j in back)
        for job in back:
            assert [(h.reason, h.attempts, h.requeued_at_s) for h in job.history] == [
                ("http_5xx", 3, now_s)
            ]
        await adapter.ack(got)

        archive = LetterArchive(tmp_path / "out" / "purged.jsonl")
        flt = LetterFilter.build(now_s=now_s, reasons=["bad_message"])
        purged = await purge_dead_letters(adapter, flt, archive=archive)
        assert purged.total == 1 and purged.archive == str(archive.path)
        lines = [orjson.loads(x) for x in archive.path.read_bytes().splitlines()]
        assert [(x["reason"], x["body"]) for x in lines] == [("bad_message", "junk-0")]
        assert [d.reason for d in await adapter.dead_letters(100)] == ["http_404", "http_404"]
        # A purge that matches nothing writes no archive.
        nothing = LetterArchive(tmp_path / "none.jsonl")
        flt = LetterFilter.build(now_s=now_s, reasons=["timeout"])
        empty = await purge_dead_letters(adapter, flt, archive=nothing)
        assert empty.total == 0 and empty.archive is None and not nothing.path.exists()

    broker.run(requeued_then_purged())
    archive = tmp_path / "purged.jsonl"
    purged = cli("purge", "--item", "item-1", "--archive", str(archive))
    assert purged["moved"] == 1 and purged["archive"] == str(archive)
    (line,) = archive.read_text().splitlines()
    assert decode_job(json.loads(line)["body"].encode()).item_id == "item-1"
    listing = cli("dlq", "list")
    assert listing["counts"] == {"http_404": 1}
    assert [j["item_id"] for j in listing["jobs"]] == ["item-3"]
