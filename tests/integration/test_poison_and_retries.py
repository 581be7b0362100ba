"""Poison messages and transient failures through the real pipeline on the local broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from PIL import Image

from common.brokers.local.broker import LocalBroker
from common.config import load_settings
from common.schema import SCHEMA_VERSION, Job, Lane, Op
from common.storage.local import LocalStorage
from imgfleet.factories import run_worker
from index.publish import build_generation
from index.search import Searcher
from tests.support.faulty_image_server import FaultyImageServer

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_settings(
        broker={
            "local_path": str(tmp_path / "q.sqlite3"),
            "retry_base_s": 0.05,
            "retry_max_s": 0.2,
            "max_attempts": 4,
            "poll_interval_s": 0.02,
        },
        storage={"root": str(tmp_path / "store")},
        worker={
            "decode_processes": 1,
            "segment_flush_interval_s": 0.3,
            "max_batch": 8,
            "fetch_allow_networks": ["127.0.0.1/32"],  # the loopback image server
        },
        index={"n_shards": 2},
    )


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
            broker = LocalBroker(settings.broker.local_path)
            await broker.publish(good + poison)
            await broker.publish_raw(raw)
            await broker.publish([Job(item_id="gone", op=Op.DELETE, lane=Lane.LIVE)])
            await broker.close()
            stats = await run_worker(settings, worker_id="t", until_idle=True)
            broker = LocalBroker(settings.broker.local_path)
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
