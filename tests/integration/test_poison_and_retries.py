"""Poison messages and transient failures through the real pipeline on the local broker."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import orjson
import pytest
from PIL import Image

from common.brokers.local.broker import LocalBroker
from common.config import Settings
from common.schema import SCHEMA_VERSION, Job, Lane, Op
from common.storage.local import LocalStorage
from imgfleet.factories import run_worker
from index.publish import build_generation
from index.search import Searcher
from tests.support import local_worker
from tests.support.faulty_image_server import FaultyImageServer

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, **broker: object) -> Settings:
    return local_worker.settings(tmp_path, broker={"retry_max_s": 0.2, "max_attempts": 4, **broker})


def test_each_poison_job_dead_letters_once_and_transient_ones_recover(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("ok.jpg", "red"), ("flaky.jpg", "blue"), ("down.jpg", "green")):
        Image.new("RGB", (400, 300), colour).save(images / name, "JPEG")
    (images / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)
    settings = _settings(tmp_path)

    with FaultyImageServer(tmp_path) as server:
        server.fail_next("flaky.jpg", 503, times=2)  # recovers on the third try
        server.fail_next("down.jpg", 503, times=100)  # never recovers

        def job(item: str, name: str, **kw: object) -> Job:
            return Job(item_id=item, url=f"{server.base_url}/images/{name}", **kw)

        good = [job("ok", "ok.jpg"), job("flaky", "flaky.jpg"), job("down", "down.jpg")]
        poison = [job("missing", "nope.jpg"), job("garbage", "garbage.jpg")]
        raw = [
            b"{this is not json",
            orjson.dumps({"schema_version": 999, "item_id": "x", "url": "http://a/b"}),
            orjson.dumps(
                {"schema_version": SCHEMA_VERSION, "item_id": "y", "op": "merge", "url": "u"}
            ),
        ]

        async def scenario() -> tuple[list, object]:
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            await broker.publish(good + poison)
            await broker.publish_raw(raw)
            await broker.publish([Job(item_id="gone", op=Op.DELETE, lane=Lane.LIVE)])
            await broker.close()
            stats = await run_worker(settings, worker_id="t", until_idle=True)
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            dead = await broker.dead_letters()
            assert await broker.pending() == 0
            await broker.close()
            return dead, stats

        dead, stats = asyncio.run(scenario())
        assert server.request_count("/images/flaky.jpg") == 3
        assert server.request_count("/images/down.jpg") == 4  # max_attempts

    reasons = sorted((d.reason, d.item_id, d.attempts) for d in dead)
    assert reasons == [
        ("bad_message", None, 1),
        ("bad_message", None, 1),
        ("http_404", "missing", 1),
        ("http_5xx", "down", 4),
        ("undecodable", "garbage", 1),
        ("unsupported_schema", None, 1),
    ]
    # The DLQ keeps the original message byte for byte, malformed ones included.
    assert sorted(d.body for d in dead if d.item_id is None) == sorted(raw)
    assert stats.retried == 2 + 3
    build_generation(LocalStorage(settings.storage.root), 2)
    searcher = Searcher(LocalStorage(settings.storage.root))
    assert searcher.count() == 2  # ok + flaky; the delete of an absent item is harmless


# -- Retry-After ---------------------------------------------------------------------------

# A waiting retry, or a hold, may end a clock tick early (wall clock in the broker,
# monotonic in the fetcher and the server): what "no sooner than asked" tolerates.
CLOCK_SLACK_S = 0.05


def _images(tmp_path: Path, *names: str) -> None:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (64, 48), (40 * index % 256, 90, 160)).save(images / name, "JPEG")


async def _retry_waiting(broker: LocalBroker) -> int:
    return sum(s.ready for s in await broker.lane_stats() if s.lane == "retry")


def test_retry_after_holds_off_the_job_and_its_host_not_other_hosts(tmp_path: Path) -> None:
    _images(tmp_path, "ra.jpg", "late.jpg", "dated.jpg", "other.jpg")
    settings = _settings(tmp_path)
    with (
        FaultyImageServer(tmp_path) as held,
        FaultyImageServer(tmp_path) as dated,
        FaultyImageServer(tmp_path) as other,
    ):
        held.fail_next("ra.jpg", 429, retry_after_s=2)
        # An HTTP-date has whole seconds: 3 s from the answer, so at least 2 s after it.
        dated.fail_next("dated.jpg", 503, retry_after_s=3, retry_after_date=True)

        def job(server: FaultyImageServer, name: str) -> Job:
            return Job(item_id=name, url=f"{server.base_url}/images/{name}")

        async def scenario() -> tuple[list, object]:
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            await broker.publish([job(held, "ra.jpg"), job(dated, "dated.jpg")])
            worker = asyncio.create_task(run_worker(settings, worker_id="t", until_idle=True))
            # Both retries scheduled: the holds are known. Now a second job for the held
            # host, and one for a host nobody held.
            deadline_s = time.monotonic() + 30
            while await _retry_waiting(broker) < 2:
                assert time.monotonic() < deadline_s and not worker.done()
                await asyncio.sleep(0.02)
            await broker.publish([job(held, "late.jpg"), job(other, "other.jpg")])
            stats = await worker
            dead = await broker.dead_letters()
            await broker.close()
            return dead, stats

        dead, stats = asyncio.run(scenario())
        ra = held.request_times("/images/ra.jpg")
        late = held.request_times("/images/late.jpg")
        dated_times = dated.request_times("/images/dated.jpg")
        other_times = other.request_times("/images/other.jpg")

    assert dead == []
    # The 429'd job came back no sooner than asked...
    assert len(ra) == 2 and ra[1] - ra[0] >= 2.0 - CLOCK_SLACK_S
    assert len(dated_times) == 2 and dated_times[1] - dated_times[0] >= 2.0 - CLOCK_SLACK_S
    # ...the other job for its host did not ask before the hold ended (one request, after
    # it), and the job for another host was not held back.
    assert len(late) == 1 and late[0] - ra[0] >= 2.0 - CLOCK_SLACK_S
    assert len(other_times) == 1 and other_times[0] - ra[0] < 2.0
    assert stats.retried == 3  # ra, dated, and late handed back once for the hold
    build_generation(LocalStorage(settings.storage.root), 2)
    assert Searcher(LocalStorage(settings.storage.root)).count() == 4


def test_retry_after_is_capped_and_a_429_that_persists_dead_letters_as_http_429(
    tmp_path: Path,
) -> None:
    _images(tmp_path, "capped.jpg", "limited.jpg")
    settings = _settings(tmp_path, retry_after_max_s=1.0, max_attempts=3)
    with FaultyImageServer(tmp_path) as capped, FaultyImageServer(tmp_path) as limited:
        capped.fail_next("capped.jpg", 429, retry_after_s=20)  # over the 1 s cap
        limited.fail_next("limited.jpg", 429, times=100, retry_after_s=1)

        async def scenario() -> list:
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            await broker.publish(
                [
                    Job(item_id="capped", url=f"{capped.base_url}/images/capped.jpg"),
                    Job(item_id="limited", url=f"{limited.base_url}/images/limited.jpg"),
                ]
            )
            await run_worker(settings, worker_id="t", until_idle=True)
            dead = await broker.dead_letters()
            await broker.close()
            return dead

        dead = asyncio.run(scenario())
        capped_times = capped.request_times("/images/capped.jpg")
        limited_times = limited.request_times("/images/limited.jpg")

    gap_s = capped_times[1] - capped_times[0]
    assert len(capped_times) == 2 and 1.0 - CLOCK_SLACK_S <= gap_s < 10.0
    gaps = [b - a for a, b in itertools.pairwise(limited_times)]
    assert len(limited_times) == 3 and min(gaps) >= 1.0 - CLOCK_SLACK_S
    [letter] = dead
    assert (letter.item_id, letter.reason, letter.attempts) == ("limited", "http_429", 3)
    assert "gave up after 3 attempts: HTTP 429" in letter.error
    build_generation(LocalStorage(settings.storage.root), 2)
    assert Searcher(LocalStorage(settings.storage.root)).count() == 1
