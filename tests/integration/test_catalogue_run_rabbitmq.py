"""The nightly catalogue run on the real RabbitMQ: `imgfleet produce catalogue` processes.

- With workers, end to end on the generated corpus (bad and repeated rows added): every
  job is indexed or dead-lettered and `index finalize` publishes the run.
- At 100k rows without workers (embedding 200k images on the test machine would take
  many minutes): the lane queue is drained and must hold every expected job id exactly
  once, and finalize is checked with one segment record per drained job standing in for
  the workers' output. A second run (20k items) with items removed publishes exactly the
  right deletes; a truncated file trips the mass-delete guard.
- SIGKILL of the producer mid-run (timing-based), and exactly between a confirm and the
  checkpoint that would record it (fault hook), then `--resume`: the queue holds every
  expected job id exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq.exceptions
import numpy as np
import pytest

from common.brokers.base import Delivery
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.brokers.rabbitmq.ledger import ledger_queue
from common.config import BrokerConfig
from common.schema import Job, Op, decode_job
from common.storage.local import LocalStorage
from imgfleet.run_registry import IndexRunRegistry
from index.runs import read_run
from producers.catalogue.reader import open_catalogue
from producers.nightly.checkpoint import load_checkpoint
from producers.nightly.run import CatalogueRun, RunOptions
from producers.nightly.upserts import PublishReport
from tests.support.catalogue_factory import Written, write_catalogue
from tests.support.faulty_cli import FAULTY_CLI, KILL_AFTER_JOBS_ENV
from tests.support.fleet import REPO_ROOT, broker_env
from tests.support.rabbitmq import RabbitFleet, broker_config
from tests.support.segments import write_job_records
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _env(root: Path, url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **broker_env(
            "rabbitmq", url, prefix, RETRY_BASE_S="0.1", RETRY_MAX_S="0.4", MAX_ATTEMPTS="4"
        ),
        "IMGFLEET_STORAGE__ROOT": str(root / "store"),
        "IMGFLEET_PRODUCER__CATALOGUE_NAME": "shop",
        "IMGFLEET_LOGGING__LEVEL": "warning",
        "IMGFLEET_INDEX__FLAT_MAX_VECTORS": "1000000",
        "IMGFLEET_INDEX__EVAL_QUERIES": "0",
        **extra,
    }


def _imgfleet(
    env: dict[str, str], *args: str, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", FAULTY_CLI if KILL_AFTER_JOBS_ENV in env else "imgfleet", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _produce(env: dict[str, str], source: Path, *args: str) -> dict[str, Any]:
    out = _imgfleet(env, "produce", "catalogue", str(source), "--json", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return summary


async def _drain(config: BrokerConfig, idle_s: float = 0.5) -> list[Job]:
    """Consume and ack everything queued; return the jobs."""
    broker = RabbitMQBroker(config, prefetch=5000)
    await broker.connect()
    jobs: list[Job] = []
    arrived: asyncio.Queue[Delivery] = asyncio.Queue()

    async def pump() -> None:
        # Cancelling anext() would close the stream: a task feeds a queue instead.
        async for delivery in broker.consume():
            arrived.put_nowait(delivery)

    pumping = asyncio.create_task(pump())
    try:
        batch: list[Delivery] = []
        while True:
            try:
                delivery = await asyncio.wait_for(arrived.get(), idle_s)
            except TimeoutError:
                await broker.ack(batch)
                batch = []
                if await broker.pending() == 0:
                    break
                continue
            jobs.append(decode_job(delivery.body))
            batch.append(delivery)
            if len(batch) >= 1000:
                await broker.ack(batch)
                batch = []
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
        await broker.close()
    return jobs


async def _run_in_process(
    root: Path, config: BrokerConfig, run_id: str, source: Path, **options: Any
) -> PublishReport:
    """A catalogue run in this process (no CLI start-up), the CLI's registry and all."""
    broker = RabbitMQBroker(config)
    await broker.connect()
    storage = LocalStorage(root / "store")
    try:
        run = CatalogueRun(
            RunOptions(run_id=run_id, source=str(source), catalogue="shop", **options),
            broker=broker,
            storage=storage,
            registry=IndexRunRegistry(storage),
        )
        return await run.run(lambda: open_catalogue(source))
    finally:
        await broker.close()


def _assert_exactly_once(jobs: list[Job], expected: set[str]) -> None:
    counts = Counter(job.job_id for job in jobs)
    assert len(counts) == len(expected) and set(counts) == expected
    assert max(counts.values()) == 1, "a job was published twice"


async def _ledger_depth(config: BrokerConfig, run_id: str) -> int | None:
    broker = RabbitMQBroker(config)
    await broker.connect()
    try:
        channel = await broker._require(broker._connection).channel()
        queue = await channel.declare_queue(
            ledger_queue(config.name_prefix, run_id), passive=True, robust=False
        )
        return int(queue.declaration_result.message_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        await broker.close()


@dataclass
class Nights:
    """A test's catalogue runs: their broker, the environment of its `imgfleet` processes,
    and the run ids (``ledgers``) whose ledger queues are deleted after the test."""

    root: Path
    url: str
    prefix: str
    ledgers: list[str] = field(default_factory=list)

    @property
    def config(self) -> BrokerConfig:
        return broker_config(self.url, self.prefix)

    def env(self, **extra: str) -> dict[str, str]:
        return _env(self.root, self.url, self.prefix, **extra)


@pytest.fixture
def nights(tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str) -> Iterator[Nights]:
    runs = Nights(tmp_path, rabbitmq_url, rabbit_prefix)
    yield runs

    async def drop() -> None:
        broker = RabbitMQBroker(runs.config)
        await broker.connect()
        for run_id in runs.ledgers:
            with contextlib.suppress(Exception):
                await broker.drop_ledger(run_id)
        await broker.close()

    asyncio.run(drop())


def _write_segments(store: Path, jobs: list[Job]) -> None:
    """One record per job, as the workers would write them (tiny vectors)."""
    rng = np.random.default_rng(0)
    vectors = iter(rng.standard_normal((len(jobs), 8)).astype(np.float32))

    def vector_of(job: Job) -> np.ndarray | None:
        vector = next(vectors)
        return None if job.op is Op.DELETE else vector / np.linalg.norm(vector)

    write_job_records(LocalStorage(store), 4, "stand-in", jobs, vector_of)


def test_end_to_end_with_workers_then_finalize(rabbit_fleet: RabbitFleet) -> None:
    rows = rabbit_fleet.catalogue.read_text().splitlines()
    catalogue = rabbit_fleet.root / "catalogue-extra.jsonl"
    # The corpus catalogue plus a repeat of every fifth row and two broken rows.
    extra = [*rows, *rows[::5], "{broken", '{"image_urls": ["http://x/a.jpg"]}']
    catalogue.write_text("\n".join(extra) + "\n")
    expected_jobs = sum(len(json.loads(row)["image_urls"]) for row in rows)
    rejects = rabbit_fleet.root / "rejects.jsonl"
    out = rabbit_fleet.run(
        "produce",
        "catalogue",
        str(catalogue),
        "--run-id",
        "e2e-1",
        "--json",
        "--rejects",
        str(rejects),
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["jobs"] == expected_jobs and summary["rejected"] == 2
    assert summary["duplicate_images"] >= len(rows[::5])
    assert len(rejects.read_text().splitlines()) == 2
    run = read_run(LocalStorage(rabbit_fleet.store_root), "e2e-1")
    assert (run.state, run.expected_jobs) == ("published", expected_jobs)
    rabbit_fleet.run("work", "--until-idle", "--worker-id", "w0", timeout_s=600)
    final = json.loads(
        rabbit_fleet.run("index", "finalize", "--run", "e2e-1", "--json").splitlines()[-1]
    )
    assert final["finalized"] is True and final["forced"] is False
    assert final["accounted_jobs"] == expected_jobs and final["dead_lettered_jobs"] > 0


def test_100k_rows_publish_every_job_once_and_finalize(tmp_path: Path, nights: Nights) -> None:
    nights.ledgers.append("night-1")
    config, env = nights.config, nights.env()
    first = write_catalogue(tmp_path / "first.jsonl", 97_300)
    assert first.rows >= 100_000
    rejects = tmp_path / "rejects.jsonl"
    summary = _produce(env, first.path, "--run-id", "night-1", "--rejects", str(rejects))
    assert (summary["rows"], summary["jobs"]) == (first.rows, len(first.images))
    assert summary["rejected"] == first.bad_rows == len(rejects.read_text().splitlines())
    assert summary["duplicate_images"] > 0 and summary["deleted"] == 0
    assert asyncio.run(_ledger_depth(config, "night-1")) is None  # dropped once published
    jobs = asyncio.run(_drain(config))
    _assert_exactly_once(jobs, first.job_ids("night-1"))

    # Every job settled (here: one record each in a segment): the run finalises.
    _write_segments(tmp_path / "store", jobs)
    final = _imgfleet(env, "index", "finalize", "--run", "night-1", "--json")
    assert final.returncode == 0, final.stderr[-3000:]
    record = json.loads(final.stdout.splitlines()[-1])
    assert record["finalized"] is True and record["indexed_jobs"] == len(first.images)


def test_deletes_of_a_second_run_and_the_guard(tmp_path: Path, nights: Nights) -> None:
    nights.ledgers += ["night-1", "night-2", "night-3"]
    config, env = nights.config, nights.env()
    first = write_catalogue(tmp_path / "first.jsonl", 20_000)
    asyncio.run(_run_in_process(tmp_path, config, "night-1", first.path))
    asyncio.run(_drain(config))

    # Items removed and items with fewer images: exactly those images are deleted.
    second = write_catalogue(
        tmp_path / "second.jsonl", 20_000, drop=range(0, 20_000, 20), fewer=range(7, 20_000, 20)
    )
    gone = second.gone_since(first)
    report = asyncio.run(_run_in_process(tmp_path, config, "night-2", second.path))
    assert (report.deleted, report.previous_run_id) == (len(gone), "night-1")
    jobs = asyncio.run(_drain(config))
    _assert_exactly_once(
        jobs,
        second.job_ids("night-2") | Written(first.path, images=gone).job_ids("night-2", "delete"),
    )
    deletes = {(j.item_id, j.image_key) for j in jobs if j.op is Op.DELETE}
    assert deletes == set(gone.values())
    run = read_run(LocalStorage(tmp_path / "store"), "night-2")
    assert run.expected_jobs == len(second.images) + len(gone)

    # A truncated dump: the guard stops the run (exit 3) before any delete goes out.
    truncated = write_catalogue(tmp_path / "truncated.jsonl", 6_000)
    out = _imgfleet(env, "produce", "catalogue", str(truncated.path), "--run-id", "night-3")
    assert out.returncode == 3 and "would delete" in out.stderr, out.stderr[-2000:]
    assert {j.op for j in asyncio.run(_drain(config))} == {Op.UPSERT}
    report = asyncio.run(
        _run_in_process(
            tmp_path, config, "night-3", truncated.path, resume=True, delete_missing=False
        )
    )
    assert report.deleted == 0 and asyncio.run(_drain(config)) == []
    assert read_run(LocalStorage(tmp_path / "store"), "night-3").state == "published"


def test_sigkill_mid_run_then_resume(tmp_path: Path, nights: Nights) -> None:
    nights.ledgers.append("night-k")
    config, env = nights.config, nights.env(IMGFLEET_PRODUCER__CHECKPOINT_INTERVAL_S="0.3")
    written = write_catalogue(tmp_path / "cat.jsonl", 10_000)
    producer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgfleet",
            "produce",
            "catalogue",
            str(written.path),
            "--run-id",
            "night-k",
            "--max-rate",
            "4000",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = LocalStorage(tmp_path / "store")
    try:
        wait_for(
            lambda: (
                (cp := load_checkpoint(storage, "night-k")) is not None
                and cp.jobs_confirmed >= 6000
            ),
            120,
            "checkpoints with confirmed jobs",
        )
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
    finally:
        if producer.poll() is None:
            producer.kill()
    checkpoint = load_checkpoint(storage, "night-k")
    assert checkpoint is not None and checkpoint.jobs_confirmed < len(written.images)
    refused = _imgfleet(env, "index", "finalize", "--run", "night-k", "--force")
    assert refused.returncode == 1 and "still publishing" in refused.stderr
    summary = _produce(env, written.path, "--resume", "night-k")
    assert summary["resumed_from_row"] == checkpoint.rows_consumed
    _assert_exactly_once(asyncio.run(_drain(config)), written.job_ids("night-k"))


def test_kill_between_confirm_and_checkpoint_then_resume(tmp_path: Path, nights: Nights) -> None:
    nights.ledgers.append("night-x")
    # A small ledger (256 messages): checkpoints are forced by its bound, not by time.
    config, env = (
        nights.config,
        nights.env(
            IMGFLEET_BROKER__RABBITMQ__LEDGER_MAX_MESSAGES="256",
            IMGFLEET_PRODUCER__CHECKPOINT_INTERVAL_S="3600",
        ),
    )
    written = write_catalogue(tmp_path / "cat.jsonl", 20_000)
    killed = _imgfleet(
        {**env, KILL_AFTER_JOBS_ENV: "25000"},
        "produce",
        "catalogue",
        str(written.path),
        "--run-id",
        "night-x",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = load_checkpoint(LocalStorage(tmp_path / "store"), "night-x")
    assert checkpoint is not None and 0 < checkpoint.jobs_confirmed < 25_000
    depth = asyncio.run(_ledger_depth(config, "night-x"))
    assert depth is not None and 0 < depth <= 256  # bounded, and holds the post-checkpoint jobs

    summary = _produce(env, written.path, "--resume", "night-x")
    assert summary["already_published"] >= 25_000 - checkpoint.jobs_confirmed
    _assert_exactly_once(asyncio.run(_drain(config)), written.job_ids("night-x"))
    assert asyncio.run(_ledger_depth(config, "night-x")) is None


def test_unreachable_broker_and_refused_credentials_exit_1_with_one_line(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 10)
    for url, says in (
        ("amqp://guest:guest@127.0.0.1:1/", "unreachable"),
        ("amqp://guest:not-the-password@127.0.0.1:5672/", "refused the credentials"),
    ):
        env = _env(
            tmp_path,
            url,
            rabbit_prefix,
            IMGFLEET_BROKER__RABBITMQ__CONNECT_TIMEOUT_S="1",
            IMGFLEET_LOGGING__LEVEL="error",
        )
        out = _imgfleet(env, "produce", "catalogue", str(written.path), "--run-id", "night-u")
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("imgfleet: cannot connect to the broker")
        assert says in lines[0] and "not-the-password" not in out.stderr
