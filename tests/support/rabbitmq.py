"""Fixtures for tests against the RabbitMQ server on 127.0.0.1:5672.

Each test gets its own queue-name prefix and deletes its queues afterwards. Without a
reachable server the tests fail under CI=true and are skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from yarl import URL

from common.brokers.base import DeadLetter
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.config import BrokerConfig, load_settings
from common.identity import image_id_for
from common.schema import Job
from common.storage.local import LocalStorage
from imgfleet.demo.corpus import EXPECTED_REASON_BY_KIND, make_corpus
from index.publish import build_generation
from index.search import Searcher
from tests.conftest import require_service
from tests.support.aio import ask
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.fleet import REPO_ROOT, Fleet, broker_env

RABBITMQ_URL = os.environ.get("IMGFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = URL(RABBITMQ_URL)
    try:
        socket.create_connection((url.host or "127.0.0.1", url.port or 5672), timeout=3).close()
    except OSError as exc:
        require_service("RabbitMQ", f"not reachable at {url.host}:{url.port}: {exc}")
    return RABBITMQ_URL


def rabbit_settings(url: str, prefix: str, **broker: Any) -> dict[str, Any]:
    return {
        "kind": "rabbitmq",
        "url": url,
        "name_prefix": prefix,
        "retry_base_s": 0.1,
        "retry_max_s": 0.4,
        "max_attempts": 4,
        **broker,
    }


def broker_config(url: str, prefix: str, **broker: Any) -> BrokerConfig:
    return load_settings(broker=rabbit_settings(url, prefix, **broker)).broker


@contextlib.asynccontextmanager
async def connected(
    url: str, prefix: str, *, prefetch: int = 64, **broker: Any
) -> AsyncIterator[RabbitMQBroker]:
    """An adapter connected to the queues of ``prefix``, closed when the block ends."""
    adapter = RabbitMQBroker(broker_config(url, prefix, **broker), prefetch=prefetch)
    await adapter.connect()
    try:
        yield adapter
    finally:
        await adapter.close()


# ``connected`` with the test's server and queues bound: ``async with rabbit() as broker``.
Connect = Callable[..., contextlib.AbstractAsyncContextManager[RabbitMQBroker]]


@pytest.fixture
def rabbit(rabbitmq_url: str, rabbit_prefix: str) -> Connect:
    return functools.partial(connected, rabbitmq_url, rabbit_prefix)


async def _delete_topology(config: BrokerConfig) -> None:
    broker = RabbitMQBroker(config)
    await broker.connect()
    await broker.delete_topology()
    await broker.close()


def drain_image_ids(url: str, prefix: str, *, idle_s: float = 3.0) -> set[int]:
    """Consume and ack everything queued under ``prefix``; the image ids it held."""
    from common.schema import decode_job

    image_ids: set[int] = set()

    async def drain() -> None:
        broker = RabbitMQBroker(broker_config(url, prefix), prefetch=2000)
        await broker.connect()
        stream = broker.consume()
        batch = []
        while True:
            try:
                delivery = await asyncio.wait_for(anext(stream), idle_s)
            except TimeoutError:
                break
            image_ids.add(decode_job(delivery.body).image_id)
            batch.append(delivery)
            if len(batch) >= 500:
                await broker.ack(batch)
                batch = []
        await broker.ack(batch)
        assert await broker.pending() == 0
        await stream.aclose()  # type: ignore[attr-defined]
        await broker.close()

    asyncio.run(drain())
    return image_ids


@pytest.fixture
def rabbit_prefix(rabbitmq_url: str) -> Iterator[str]:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    yield prefix
    asyncio.run(_delete_topology(broker_config(rabbitmq_url, prefix)))


@dataclass
class RabbitFleet(Fleet):
    """Worker subprocesses on RabbitMQ, sharing one store."""

    url: str = ""
    prefix: str = ""
    expected: dict[int, str | None] = field(default_factory=dict)  # image id -> reason

    def env(self, **extra: str) -> dict[str, str]:
        rabbit = broker_env(
            "rabbitmq", self.url, self.prefix, RETRY_BASE_S="0.1", RETRY_MAX_S="0.4"
        )
        return super().env(**{**rabbit, **extra})

    def run_raw(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the CLI and return the result whatever its exit code."""
        return subprocess.run(
            [sys.executable, "-m", "imgfleet", *args],
            cwd=REPO_ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    @property
    def config(self) -> BrokerConfig:
        return broker_config(self.url, self.prefix)

    def write_big_catalogue(self, n_items: int) -> Path:
        """``n_items`` items, each one image of the corpus (cycled); records the expectation."""
        images = [(image.kind, image) for item in self.corpus.items for image in item.images]
        path = self.root / f"catalogue-{n_items}.jsonl"
        with path.open("w") as fh:
            for i in range(n_items):
                kind, image = images[i % len(images)]
                item_id = f"sku-{i:06d}"
                row = {
                    "item_id": item_id,
                    "image_urls": [self.corpus.url_of(image, self.base_url)],
                    "version": 1,
                }
                fh.write(json.dumps(row) + "\n")
                self.expected[image_id_for(item_id, "0")] = EXPECTED_REASON_BY_KIND.get(kind)
        return path

    def publish(self, jobs: Sequence[Job], raw: Sequence[bytes] = ()) -> None:
        """Publish ``jobs``, then the ``raw`` bodies, to the fleet's queues."""

        async def go(broker: RabbitMQBroker) -> None:
            await broker.publish(jobs)
            if raw:
                await broker.publish_raw(list(raw))

        ask(RabbitMQBroker(self.config), go)

    def dead_letters(self) -> list[DeadLetter]:
        """Every letter in the fleet's DLQ."""
        return ask(RabbitMQBroker(self.config), lambda broker: broker.dead_letters(10**6))

    def outcomes(self) -> tuple[int, list[DeadLetter], np.ndarray]:
        """(jobs still pending, dead letters, image ids in a freshly built index)."""

        async def read(broker: RabbitMQBroker) -> tuple[int, list[DeadLetter]]:
            return await broker.pending(), await broker.dead_letters(10**6)

        pending, dead = ask(RabbitMQBroker(self.config), read)
        storage = LocalStorage(self.store_root)
        build_generation(storage, 4)
        return pending, dead, Searcher(storage).image_ids()


@contextlib.contextmanager
def served_fleet(
    tmp_path: Path, url: str, prefix: str, *, items: int, seed: int
) -> Iterator[tuple[RabbitFleet, ImageServer]]:
    """A generated corpus served over loopback HTTP, and a fleet publishing its catalogue."""
    corpus = make_corpus(tmp_path / "corpus", items, seed=seed)
    with ImageServer(corpus.root) as server:
        catalogue = corpus.write_catalogue_jsonl(tmp_path / "catalogue.jsonl", server.base_url)
        fleet = RabbitFleet(tmp_path, corpus, server.base_url, catalogue, url=url, prefix=prefix)
        yield fleet, server


@pytest.fixture
def served(
    request: pytest.FixtureRequest, tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> Iterator[tuple[RabbitFleet, ImageServer]]:
    """``served_fleet`` for a test; ``@pytest.mark.corpus(items=N, seed=S)`` on the test or
    its module says which corpus."""
    corpus = request.node.get_closest_marker("corpus")
    assert corpus is not None, "name the corpus: @pytest.mark.corpus(items=N, seed=S)"
    with served_fleet(tmp_path, rabbitmq_url, rabbit_prefix, **corpus.kwargs) as pair:
        yield pair


@pytest.fixture
def rabbit_fleet(tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str) -> Iterator[RabbitFleet]:
    with served_fleet(tmp_path, rabbitmq_url, rabbit_prefix, items=48, seed=11) as (fleet, _):
        yield fleet
