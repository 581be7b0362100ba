"""Ops on RabbitMQ: settling dead letters, queue figures, the CLI's error lines, and the
3 a.m. story (status -> dlq list -> fix the origin -> requeue) with a real worker."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import common.brokers.rabbitmq.dlq as rabbitmq_dlq
from common.brokers.base import DeadLetter, Delivery
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.schema import Job, decode_job
from common.storage.local import LocalStorage
from imgfleet.cli import main
from index.segments import list_segments, read_segment
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.fleet import REPO_ROOT
from tests.support.rabbitmq import RabbitFleet, broker_config, served_fleet

pytestmark = pytest.mark.integration


async def _connected(url: str, prefix: str, **kw: Any) -> RabbitMQBroker:
    broker = RabbitMQBroker(broker_config(url, prefix, **kw), prefetch=64)
    await broker.connect()
    return broker


async def _take(stream: AsyncIterator[Delivery], n: int) -> list[Delivery]:
    async def take() -> list[Delivery]:
        return [await anext(stream) for _ in range(n)]

    return await asyncio.wait_for(take(), 20)


async def _dlq_messages(broker: RabbitMQBroker) -> int:
    return (await broker.depths())[broker.topology.dead_letter_queue]


async def _fill_dlq(url: str, prefix: str) -> list[Job]:
    """Five dead letters; the first job's letter is in the DLQ twice (a worker crash copy).

    Jobs a..e with reasons http_5xx, http_404, http_5xx, http_404, http_5xx.
    """
    jobs = [Job(item_id=f"item-{c}", url=f"http://img.test/{c}.jpg") for c in "abcde"]
    reasons = ["http_5xx", "http_404", "http_5xx", "http_404", "http_5xx"]
    first = await _connected(url, prefix)
    await first.publish(jobs)  # one AMQP message carrying all five
    stream = first.consume()
    held = await _take(stream, 5)
    # Job a is dead-lettered, then the worker dies before the message is acked...
    await first.dead_letter(held[0], reasons[0], "HTTP 503", 4, jobs[0])
    await stream.aclose()  # type: ignore[attr-defined]
    await first.close()
    # ...so the next worker gets all five again and dead-letters a a second time.
    second = await _connected(url, prefix)
    stream = second.consume()
    again = await _take(stream, 5)
    for delivery, reason in zip(again, reasons, strict=True):
        job = decode_job(delivery.body)
        await second.dead_letter(delivery, reason, f"{reason} for {job.item_id}", 4, job)
    await stream.aclose()  # type: ignore[attr-defined]
    assert await _dlq_messages(second) == 6
    await second.close()
    return jobs


@pytest.mark.parametrize("read_prefetch", [1000, 2], ids=["consumer", "basic-get"])
def test_settle_takes_both_copies_keeps_the_rest_in_order_and_survives_a_failed_action(
    rabbitmq_url: str, rabbit_prefix: str, monkeypatch: pytest.MonkeyPatch, read_prefetch: int
) -> None:
    # A small DLQ is read by a consumer; with a prefetch of 2 this one is too big for
    # that and is read with basic.get, as a DLQ of thousands is.
    monkeypatch.setattr(rabbitmq_dlq, "READ_PREFETCH", read_prefetch)

    async def main() -> None:
        await _fill_dlq(rabbitmq_url, rabbit_prefix)
        broker = await _connected(rabbitmq_url, rabbit_prefix)
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
        for delivery in await _take(stream, 2):
            await broker.dead_letter(delivery, "bad_message", "not JSON", 1, None)
        await stream.aclose()  # type: ignore[attr-defined]
        junk = [d for d in await broker.dead_letters(100) if d.reason == "bad_message"]
        assert len(junk) == 2 and junk[0].dlq_id != junk[1].dlq_id
        assert await broker.settle_dead_letters(lambda d: d.reason == "bad_message", act) == 2
        assert [d.item_id for d in await broker.dead_letters(100)] == ["item-d"]
        assert await _dlq_messages(broker) == 1
        await broker.close()

    asyncio.run(main())


def test_lane_stats_report_ready_messages_and_consumers(
    rabbitmq_url: str, rabbit_prefix: str
) -> None:
    async def main() -> None:
        broker = await _connected(rabbitmq_url, rabbit_prefix, rabbitmq={"jobs_per_message": 2})
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
        worker = await _connected(rabbitmq_url, rabbit_prefix)
        stream = worker.consume()
        await _take(stream, 1)
        stats = {s.lane: s for s in await broker.lane_stats()}
        assert stats["bulk"].consumers == 1 and stats["live"].consumers == 1
        assert stats["bulk"].ready < 4
        await stream.aclose()  # type: ignore[attr-defined]
        await worker.close()
        await broker.close()

    asyncio.run(main())


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


@pytest.fixture
def story(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> Iterator[tuple[RabbitFleet, ImageServer]]:
    with served_fleet(tmp_path, rabbitmq_url, rabbit_prefix, items=12, seed=5) as served:
        yield served


def test_cli_says_in_one_line_when_the_broker_is_unreachable_or_refuses(
    story: tuple[RabbitFleet, ImageServer],
) -> None:
    fleet, _ = story
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


# -- the story ----------------------------------------------------------------------------


def _run_ids_in_segments(store_root: Path, run_id: str) -> set[int]:
    storage = LocalStorage(store_root)
    ids: set[int] = set()
    for key in list_segments(storage):
        segment = read_segment(storage, key)
        ids.update(int(i) for i in segment.image_ids[segment.run_ids == run_id])
    return ids


class _Cli:
    """The CLI in this process (the workers run as processes): saves an interpreter start
    and the model-free imports per command."""

    def __init__(
        self,
        fleet: RabbitFleet,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        for key, value in fleet.env().items():
            if key.startswith("IMGFLEET_"):
                monkeypatch.setenv(key, value)
        self._capsys = capsys

    def __call__(self, *args: str) -> Any:
        code = main([*args, "--json", "--log-level", "warning"])
        out, err = self._capsys.readouterr()
        assert code == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])


def _letters(fleet: RabbitFleet) -> list[DeadLetter]:
    async def read() -> list[DeadLetter]:
        broker = RabbitMQBroker(fleet.config)
        await broker.connect()
        try:
            return await broker.dead_letters(10**6)
        finally:
            await broker.close()

    return asyncio.run(read())


def _work(fleet: RabbitFleet) -> None:
    worker = fleet.spawn("work", "--until-idle", "--worker-id", "w1")
    out, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, out.decode()[-3000:]


def test_requeue_after_the_origin_is_fixed_indexes_exactly_the_failed_jobs(
    tmp_path: Path,
    story: tuple[RabbitFleet, ImageServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet, server = story
    cli = _Cli(fleet, monkeypatch, capsys)
    good = [img for item in fleet.corpus.items for img in item.images if img.kind == "jpeg"][:8]
    assert len(good) == 8
    flaky, flaky_forever = good[:3], good[3]
    catalogue = tmp_path / "story.jsonl"
    rows = []
    for n, image in enumerate(good):
        rows.append(
            {"item_id": f"sku-{n}", "image_urls": [fleet.corpus.url_of(image, fleet.base_url)]}
        )
    rows.append({"item_id": "sku-gone", "image_urls": [f"{fleet.base_url}/images/missing.jpg"]})
    catalogue.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for image in [*flaky, flaky_forever]:
        server.fail_next(image.filename, 503, times=10_000)

    produced = cli("produce", "catalogue", str(catalogue), "--run-id", "night")
    assert produced["jobs"] == 9
    _work(fleet)

    # status: the run is accounted for, with its failures by reason.
    before = cli("status", "--run", "night")
    (run,) = before["runs"]
    indexed = _run_ids_in_segments(fleet.store_root, "night")
    letters = _letters(fleet)
    assert Counter(d.reason for d in letters) == Counter({"http_5xx": 4, "http_404": 1})
    assert (
        (run["expected"], run["indexed"], run["failed"], run["remaining"])
        == (
            9,
            len(indexed),
            len(letters),
            0,
        )
        == (9, 4, 5, 0)
    )
    assert run["failures_by_reason"] == {"http_5xx": 4, "http_404": 1}
    assert before["dead_letters"]["total"] == 5
    assert {lane["lane"]: lane["ready"] for lane in before["lanes"]}["dlq"] == 5

    # dlq list: grouped by reason.
    listing = cli("dlq", "list")
    assert [(g["reason"], g["count"]) for g in listing["by_reason"]] == [
        ("http_5xx", 4),
        ("http_404", 1),
    ]

    # Fix the origin (all but one flaky image) and requeue what failed with 5xx.
    server.clear_faults()
    server.fail_next(flaky_forever.filename, 503, times=10_000)
    dry = cli("requeue", "--reason", "http_5xx", "--dry-run")
    assert dry["dry_run"] and dry["by_reason"] == {"http_5xx": 4}
    assert len(_letters(fleet)) == 5  # a dry run moves nothing
    moved = cli("requeue", "--reason", "http_5xx")
    assert moved["moved"] == 4 and moved["by_reason"] == {"http_5xx": 4}
    assert [d.reason for d in _letters(fleet)] == ["http_404"]  # the 404 stayed
    _work(fleet)

    after = cli("status", "--run", "night")
    (run,) = after["runs"]
    indexed = _run_ids_in_segments(fleet.store_root, "night")
    letters = _letters(fleet)
    assert (run["indexed"], run["failed"], run["remaining"]) == (len(indexed), len(letters), 0)
    assert (run["indexed"], run["failed"]) == (7, 2)
    assert Counter(d.reason for d in letters) == Counter({"http_5xx": 1, "http_404": 1})
    # The job that failed again keeps its first failure in its history.
    again = next(d for d in letters if d.reason == "http_5xx")
    shown = cli("dlq", "show", again.dlq_id)["letters"][0]
    assert shown["item_id"] == "sku-3"
    assert [h["reason"] for h in shown["history"]] == ["http_5xx"]
    assert shown["job"]["lane"] == "live"
