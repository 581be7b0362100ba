"""Ops on RabbitMQ: settling dead letters (a letter's copies, reading a large DLQ), queue
figures of multi-job messages and consumers, and the CLI's error lines.

What the ops commands do on every broker is in tests/contract/test_broker_contract.py; the
3 a.m. story with real workers is tests/integration/test_ops_story_rabbitmq.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import common.brokers.rabbitmq.dlq as rabbitmq_dlq
from common.brokers.base import DeadLetter
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.schema import Job, decode_job
from tests.support.aio import run_async, take
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.fleet import REPO_ROOT
from tests.support.rabbitmq import Connect, RabbitFleet

pytestmark = [pytest.mark.integration, pytest.mark.corpus(items=12, seed=5)]  # `served`


async def _dlq_messages(broker: RabbitMQBroker) -> int:
    return (await broker.depths())[broker.topology.dead_letter_queue]


async def _fill_dlq(rabbit: Connect) -> list[Job]:
    """Five dead letters; the first job's letter is in the DLQ twice (a worker crash copy).

    Jobs a..e with reasons http_5xx, http_404, http_5xx, http_404, http_5xx.
    """
    jobs = [Job(item_id=f"item-{c}", url=f"http://img.test/{c}.jpg") for c in "abcde"]
    reasons = ["http_5xx", "http_404", "http_5xx", "http_404", "http_5xx"]
    async with rabbit() as first:
        await first.publish(jobs)  # one AMQP message carrying all five
        stream = first.consume()
        held = await take(stream, 5, 20)
        # Job a is dead-lettered, then the worker dies before the message is acked...
        await first.dead_letter(held[0], reasons[0], "HTTP 503", 4, jobs[0])
        await stream.aclose()  # type: ignore[attr-defined]
    # ...so the next worker gets all five again and dead-letters a a second time.
    async with rabbit() as second:
        stream = second.consume()
        again = await take(stream, 5, 20)
        for delivery, reason in zip(again, reasons, strict=True):
            job = decode_job(delivery.body)
            await second.dead_letter(delivery, reason, f"{reason} for {job.item_id}", 4, job)
        await stream.aclose()  # type: ignore[attr-defined]
        assert await _dlq_messages(second) == 6
    return jobs


@pytest.mark.parametrize("read_prefetch", [1000, 2], ids=["consumer", "basic-get"])
@run_async
async def test_settle_takes_both_copies_keeps_the_rest_in_order_and_survives_a_failed_action(
    rabbit: Connect, monkeypatch: pytest.MonkeyPatch, read_prefetch: int
) -> None:
    # A small DLQ is read by a consumer; with a prefetch of 2 this one is too big for
    # that and is read with basic.get, as a DLQ of thousands is.
    monkeypatch.setattr(rabbitmq_dlq, "READ_PREFETCH", read_prefetch)
    await _fill_dlq(rabbit)
    async with rabbit() as broker:
        letters = await broker.dead_letters(100)
        assert [d.item_id for d in letters] == [f"item-{c}" for c in "abcde"]  # a once
        assert letters[0].dlq_id == decode_job(letters[0].body).job_id

        async def fail(batch: list[DeadLetter]) -> None:
            raise RuntimeError("republish failed")

        with pytest.raises(RuntimeError):
            await broker.settle_dead_letters(lambda d: d.reason == "http_5xx", fail)
        assert [d.item_id for d in await broker.dead_letters(100)] == [f"item-{c}" for c in "abcde"]
        assert await _dlq_messages(broker) == 6

        batches: list[list[str | None]] = []

        async def act(batch: list[DeadLetter]) -> None:
            batches.append([d.item_id for d in batch])

        settled = await broker.settle_dead_letters(
            lambda d: d.reason == "http_5xx", act, batch_size=2, limit=2
        )
        assert settled == 2 and batches == [["item-a", "item-c"]]
        # Both copies of a went with it; b, d (not selected) and e (past the limit) stay.
        assert [d.item_id for d in await broker.dead_letters(100)] == ["item-b", "item-d", "item-e"]
        assert await _dlq_messages(broker) == 3

        settled = await broker.settle_dead_letters(lambda d: d.item_id != "item-d", act)
        assert settled == 2 and batches[-1] == ["item-b", "item-e"]
        remaining = await broker.dead_letters(100)
        assert [(d.item_id, d.reason) for d in remaining] == [("item-d", "http_404")]

        # Two equal bodies that never were jobs are two failures, not copies of one.
        await broker.publish_raw([b"junk", b"junk"])
        stream = broker.consume()
        for delivery in await take(stream, 2, 20):
            await broker.dead_letter(delivery, "bad_message", "not JSON", 1, None)
        await stream.aclose()  # type: ignore[attr-defined]
        junk = [d for d in await broker.dead_letters(100) if d.reason == "bad_message"]
        assert len(junk) == 2 and junk[0].dlq_id != junk[1].dlq_id
        assert await broker.settle_dead_letters(lambda d: d.reason == "bad_message", act) == 2
        assert [d.item_id for d in await broker.dead_letters(100)] == ["item-d"]
        assert await _dlq_messages(broker) == 1


@run_async
async def test_lane_stats_report_ready_messages_and_consumers(rabbit: Connect) -> None:
    async with rabbit(rabbitmq={"jobs_per_message": 2}) as broker:
        await broker.publish([Job(item_id=f"i{i}", url="http://img.test/i.jpg") for i in range(5)])
        await broker.publish_raw([b"junk"])
        stats = {s.lane: s for s in await broker.lane_stats()}
        assert (stats["bulk"].ready, stats["bulk"].consumers, stats["bulk"].unit) == (
            4,  # three messages of up to two jobs, one raw body
            0,
            "messages",
        )
        assert stats["live"].ready == 0 and stats["retry"].ready == 0
        assert stats["dlq"].ready == 0 and stats["bulk"].in_flight is None
        async with rabbit() as worker:
            stream = worker.consume()
            await take(stream, 1, 20)
            stats = {s.lane: s for s in await broker.lane_stats()}
            assert stats["bulk"].consumers == 1 and stats["live"].consumers == 1
            assert stats["bulk"].ready < 4
            await stream.aclose()  # type: ignore[attr-defined]


# -- the CLI ------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli_process(fleet: RabbitFleet, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgfleet", *args],
        cwd=REPO_ROOT,
        env=fleet.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str], secret: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("imgfleet:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and secret not in proc.stderr + proc.stdout
    return lines[0]


def test_cli_says_in_one_line_when_the_broker_is_unreachable_or_refuses(
    served: tuple[RabbitFleet, ImageServer],
) -> None:
    fleet, _ = served
    timeout = {"IMGFLEET_BROKER__RABBITMQ__CONNECT_TIMEOUT_S": "1"}
    unreachable = _cli_process(
        fleet,
        "status",
        IMGFLEET_BROKER__URL=f"amqp://ops:s3cret-pw@127.0.0.1:{_closed_port()}/",
        **timeout,
    )
    assert unreachable.returncode == 1
    line = _one_error_line(unreachable, "s3cret-pw")
    assert "unreachable" in line and "127.0.0.1" in line
    refused = _cli_process(
        fleet,
        "dlq",
        "list",
        IMGFLEET_BROKER__URL=f"amqp://guest:wrong-pw-123@127.0.0.1:{_amqp_port(fleet)}/",
        **timeout,
    )
    assert refused.returncode == 2
    assert "refused the credentials" in _one_error_line(refused, "wrong-pw-123")


def _amqp_port(fleet: RabbitFleet) -> int:
    from yarl import URL

    return URL(fleet.url).port or 5672
