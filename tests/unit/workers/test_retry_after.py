"""Retry-After: the pure policy (reading, capping, the per-host table), the HTTP fetcher
against a real loopback origin, and a held-off job that keeps its attempts."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.brokers.local.broker import LocalBroker
from common.errors import JobFailure, Reason, TransientError
from common.schema import Job
from common.storage.local import LocalStorage
from index.segments import SegmentWriter
from tests.support.clock import FakeClock
from tests.support.faulty_image_server import FaultyImageServer
from tests.support.fetching import url_fetcher
from workers.ack_policy import decide
from workers.decode.types import DecodeResult
from workers.fetch.retry_after import HostHolds, hold_s, origin_of
from workers.fetch.types import FetchResult
from workers.pipeline import PipelineSettings, Worker

LOOPBACK = ["127.0.0.1/32"]
POLICY = {"max_attempts": 3, "retry_base_s": 1.0, "retry_max_s": 10.0}


# -- the pure policy -----------------------------------------------------------------------


def test_the_origin_is_scheme_host_and_port_whatever_the_spelling() -> None:
    assert origin_of("http://Img.Example.com/a.jpg") == "http://img.example.com:80"
    assert origin_of("https://user:pw@img.example.com/a") == "https://img.example.com:443"
    assert origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert origin_of("http://img.example.com:8080/") != origin_of("http://img.example.com/")


def test_a_hold_is_what_a_429_or_503_asked_for_capped() -> None:
    assert hold_s(429, "2", 120.0) == 2.0
    assert hold_s(503, "7.5", 120.0) == 7.5
    assert hold_s(429, "3600", 120.0) == 120.0  # capped
    now_s = time.time()
    date = email.utils.formatdate(now_s + 30, usegmt=True)
    assert hold_s(503, date, 120.0, now_s=now_s) == pytest.approx(30.0, abs=1.0)
    assert hold_s(503, date, 10.0, now_s=now_s) == 10.0
    # Nothing to honour: other statuses, no or unreadable header, no wait, switched off.
    for status, value, cap in [
        (500, "2", 120.0),
        (302, "2", 120.0),
        (200, "2", 120.0),
        (429, None, 120.0),
        (429, "soon", 120.0),
        (429, "-5", 120.0),
        (429, "0", 120.0),
        (429, email.utils.formatdate(now_s - 60, usegmt=True), 120.0),
        (429, "2", 0.0),
    ]:
        assert hold_s(status, value, cap) is None, (status, value, cap)


def test_holds_per_origin_keep_the_longest_and_expire() -> None:
    clock = FakeClock()
    holds = HostHolds(clock=clock)
    holds.hold("http://a:80", 5.0, 429)
    holds.hold("http://a:80", 2.0, 503)  # answers that cross: the longer wait stays
    assert holds.held("http://b:80") is None
    held = holds.held("http://a:80")
    assert held is not None and (held.left_s, held.status) == (5.0, 429)
    clock.now_s += 4.0
    holds.hold("http://a:80", 3.0, 503)  # ends later than what is left: replaces it
    held = holds.held("http://a:80")
    assert held is not None and (held.left_s, held.status) == (3.0, 503)
    clock.now_s += 3.0
    assert holds.held("http://a:80") is None and len(holds) == 0


def test_the_table_stays_small_dropping_expired_then_the_soonest_holds() -> None:
    clock = FakeClock()
    holds = HostHolds(max_hosts=3, clock=clock)
    holds.hold("old", 1.0, 429)
    clock.now_s += 2.0  # "old" has expired
    for origin, seconds in [("a", 30.0), ("b", 10.0), ("c", 20.0), ("d", 40.0)]:
        holds.hold(origin, seconds, 429)
    assert len(holds) == 3
    assert holds.held("b") is None  # the soonest to end made room
    assert all(holds.held(o) is not None for o in ("a", "c", "d"))


def test_a_retry_waits_at_least_what_the_origin_asked() -> None:
    rng = random.Random(3)
    exc = TransientError("HTTP 429", Reason.HTTP_429, retry_after_s=30.0)
    delays = [decide(exc, 0, **POLICY, rng=rng).delay_s for _ in range(200)]
    assert min(delays) >= 30.0 and max(delays) <= 36.0  # spread up to 20 % past it
    out = decide(exc, 0, **POLICY)
    assert (out.retry, out.reason, out.uses_attempt) == (True, "http_429", True)
    # The attempts still run out, with the reason the origin gave.
    last = decide(exc, 2, **POLICY)
    assert (last.retry, last.reason) == (False, "http_429")
    assert last.error.startswith("gave up after 3 attempts: HTTP 429")


def test_a_job_held_off_without_a_request_keeps_its_attempts() -> None:
    held = TransientError("held off", Reason.HTTP_429, retry_after_s=4.0, tried=False)
    out = decide(held, 2, **POLICY)  # would be its last attempt
    assert out.retry and not out.uses_attempt and 4.0 <= out.delay_s <= 4.8


# -- the HTTP fetcher against a real origin ------------------------------------------------


def _fetch(fetcher: Any, url: str) -> FetchResult | JobFailure:
    try:
        return asyncio.run(_open_and_fetch(fetcher, url))
    except JobFailure as exc:
        return exc


async def _open_and_fetch(fetcher: Any, url: str) -> FetchResult:
    await fetcher.__aenter__()
    try:
        return await fetcher.fetch(url)  # type: ignore[no-any-return]
    finally:
        await fetcher.aclose()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 16), "red").save(tmp_path / "images" / name, "JPEG")
    return tmp_path


def test_the_fetcher_holds_the_host_off_capped_and_not_other_hosts(images: Path) -> None:
    with FaultyImageServer(images) as limited, FaultyImageServer(images) as free:
        limited.fail_next("a.jpg", 429, retry_after_s=3600)
        fetcher = url_fetcher(allow_networks=LOOPBACK, retry_after_max_s=0.5)
        first = _fetch(fetcher, f"{limited.base_url}/images/a.jpg")
        assert isinstance(first, TransientError)
        assert (first.reason, first.retry_after_s, first.tried) == (Reason.HTTP_429, 0.5, True)
        # Another image of the held host: handed back without a request.
        second = _fetch(fetcher, f"{limited.base_url}/images/b.jpg")
        assert isinstance(second, TransientError) and not second.tried
        assert second.reason is Reason.HTTP_429 and 0 < (second.retry_after_s or 0) <= 0.5
        assert limited.request_count("/images/b.jpg") == 0
        # Another host is asked at once.
        assert isinstance(_fetch(fetcher, f"{free.base_url}/images/b.jpg"), FetchResult)
        time.sleep(0.6)  # the hold is over
        assert isinstance(_fetch(fetcher, f"{limited.base_url}/images/b.jpg"), FetchResult)


def test_the_fetcher_reads_an_http_date_and_ignores_retry_after_when_switched_off(
    images: Path,
) -> None:
    with FaultyImageServer(images) as origin:
        url = f"{origin.base_url}/images/a.jpg"
        origin.fail_next("a.jpg", 503, retry_after_s=3, retry_after_date=True)
        dated = _fetch(url_fetcher(allow_networks=LOOPBACK), url)
        assert isinstance(dated, TransientError) and dated.reason is Reason.HTTP_5XX
        assert 2.0 - 0.1 <= (dated.retry_after_s or 0) <= 3.0  # whole seconds in a date
        origin.fail_next("a.jpg", 429, retry_after_s=30)
        fetcher = url_fetcher(allow_networks=LOOPBACK, retry_after_max_s=0)
        ignored = _fetch(fetcher, url)
        assert isinstance(ignored, TransientError) and ignored.retry_after_s is None
        assert isinstance(_fetch(fetcher, url), FetchResult)  # no hold was kept


# -- the pipeline --------------------------------------------------------------------------


class _HeldThenLimited:
    """Held off ``held`` times (no request made), then a 429 every time."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.calls = 0

    async def fetch(self, url: str, **_: Any) -> FetchResult:
        self.calls += 1
        if self.calls <= self.held:
            raise TransientError("held off", Reason.HTTP_429, retry_after_s=0.01, tried=False)
        raise TransientError("HTTP 429", Reason.HTTP_429, retry_after_s=0.01)


class _Decoder:
    async def decode(self, data: bytes) -> DecodeResult:
        return DecodeResult(np.zeros((4, 4, 3), np.uint8), "jpeg", 4, 4, False, 0.0, "pillow")


class _Embedder:
    model_id = "model-t"

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.ones((len(batch), 8), np.float32)


def test_hold_offs_do_not_use_up_the_attempts_of_the_job(tmp_path: Path) -> None:
    fetcher = _HeldThenLimited(held=4)

    async def go() -> list[Any]:
        broker = LocalBroker(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish([Job(item_id="x", url="http://img.test/x.jpg")])
        settings = PipelineSettings(max_attempts=2, retry_base_s=0.01, retry_max_s=0.02)
        worker = Worker(
            broker,
            SegmentWriter(LocalStorage(tmp_path / "store"), 2, "t"),
            fetcher,
            _Decoder(),
            _Embedder(),
            settings,
        )
        await worker.run(until_idle=True)
        dead = await broker.dead_letters()
        await broker.close()
        return dead

    [letter] = asyncio.run(go())
    assert fetcher.calls == 4 + 2  # four hold-offs, then both attempts of the job
    assert (letter.reason, letter.attempts) == ("http_429", 2)
