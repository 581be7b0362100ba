"""Catalogue runs on the local broker: accounting, resume after a crash, deletes, guard.

The crash between a broker confirm and the checkpoint is made in-process here (the
confirm hook raises, so the run stops with confirmed jobs the checkpoint does not know),
and with SIGKILL of a real `imgfleet produce` process in the last test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import common.brokers.local.ledger as local_ledger
from common.brokers.local.broker import LocalBroker
from common.errors import Reason, TransientError
from common.observability.metrics import ProducerMetrics
from common.schema import Job, Op, decode_job
from common.storage.local import LocalStorage
from imgfleet.run_registry import IndexRunRegistry
from index.runs import read_run
from producers.catalogue.reader import open_catalogue
from producers.nightly.checkpoint import load_checkpoint
from producers.nightly.deletes import MassDeleteError
from producers.nightly.run import CatalogueRun, RunConflictError, RunOptions, dry_run
from producers.nightly.upserts import PublishReport
from tests.support.catalogue_factory import Written, write_catalogue
from tests.support.faulty_cli import FAULTY_CLI, KILL_AFTER_JOBS_ENV
from tests.support.fleet import REPO_ROOT, local_env
from tests.support.waiting import wait_for


class Crash(Exception):
    pass


def crash_after(jobs: int) -> Any:
    seen = [0]

    def hook(batch: list[Job]) -> None:
        seen[0] += len(batch)
        if seen[0] >= jobs:
            raise Crash(f"crash after {seen[0]} confirmed jobs")

    return hook


def _options(run_id: str, source: Path, **extra: Any) -> RunOptions:
    values: dict[str, Any] = {
        "batch_size": 100,
        "checkpoint_interval_s": 3600.0,  # only the checkpoints a run cannot do without
        "catalogue": "shop",
    }
    values.update(extra)
    return RunOptions(run_id=run_id, source=str(source), **values)


def _dry_run(storage: LocalStorage, run_id: str, source: Path) -> tuple[Any, dict[str, Any]]:
    """``dry_run``'s (estimate, deletes) for the run ``run_id`` of ``source``."""
    return asyncio.run(
        dry_run(
            lambda: open_catalogue(source),
            _options(run_id, source),
            storage=storage,
            registry=IndexRunRegistry(storage),
        )
    )


async def _run(
    root: Path,
    run_id: str,
    written: Written,
    *,
    on_confirmed: Any = None,
    metrics: ProducerMetrics | None = None,
    **extra: Any,
) -> PublishReport:
    broker = LocalBroker(root / "queue.sqlite3")
    storage = LocalStorage(root / "store")
    try:
        run = CatalogueRun(
            _options(run_id, written.path, **extra),
            broker=broker,
            storage=storage,
            registry=IndexRunRegistry(storage),
            on_confirmed=on_confirmed,
            metrics=metrics or ProducerMetrics(),
        )
        return await run.run(lambda: open_catalogue(written.path))
    finally:
        await broker.close()


async def _drain(root: Path) -> list[Job]:
    broker = LocalBroker(root / "queue.sqlite3", prefetch=100_000, poll_interval_s=0.01)
    jobs: list[Job] = []
    try:
        while await broker.pending():
            stream = broker.consume()
            batch = [await anext(stream) for _ in range(await broker.pending())]
            await stream.aclose()  # type: ignore[attr-defined]
            jobs += [decode_job(d.body) for d in batch]
            await broker.ack(batch)
    finally:
        await broker.close()
    return jobs


def _assert_exactly_once(jobs: list[Job], expected: set[str]) -> None:
    counts = Counter(job.job_id for job in jobs)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "a job was published twice"


def test_a_run_publishes_every_image_once_and_registers(tmp_path: Path) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 3000)
    rejects = tmp_path / "rejects.jsonl"
    metrics = ProducerMetrics()
    published_before = metrics.value("imgfleet_producer_jobs_published_total", op="upsert")
    rejected_before = metrics.value("imgfleet_producer_rows_total", outcome="rejected")
    report = asyncio.run(_run(tmp_path, "night-1", written, metrics=metrics, rejects_path=rejects))
    published = metrics.value("imgfleet_producer_jobs_published_total", op="upsert")
    assert published - published_before == len(written.images)
    rejected = metrics.value("imgfleet_producer_rows_total", outcome="rejected") - rejected_before
    assert rejected == written.bad_rows
    assert metrics.value(
        "imgfleet_producer_run_info", run_id="night-1", catalogue="shop", lane="bulk"
    )
    jobs = asyncio.run(_drain(tmp_path))
    _assert_exactly_once(jobs, written.job_ids("night-1"))
    assert (
        report.jobs
        == len(written.images)
        == read_run(LocalStorage(tmp_path / "store"), "night-1").expected_jobs
    )
    assert report.rejected == written.bad_rows
    assert report.duplicate_images > 0 and report.rows == written.rows
    lines = [orjson.loads(line) for line in rejects.read_text().splitlines()]
    assert len(lines) == written.bad_rows and {"line", "reason", "raw"} <= set(lines[0])
    run = read_run(LocalStorage(tmp_path / "store"), "night-1")
    assert (run.state, run.catalogue, run.rejected_rows) == ("published", "shop", written.bad_rows)
    assert run.finished_at_s is not None and run.finished_at_s >= run.started_at_s
    # The same run id again is refused: it would publish every job a second time.
    with pytest.raises(RunConflictError, match="--resume"):
        asyncio.run(_run(tmp_path, "night-1", written))
    with pytest.raises(RunConflictError, match="published already"):
        asyncio.run(_run(tmp_path, "night-1", written, resume=True))


def test_crash_between_confirm_and_checkpoint_then_resume(tmp_path: Path) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 4000)
    rejects = tmp_path / "rejects.jsonl"
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(Crash):
        asyncio.run(
            _run(
                tmp_path,
                "night-1",
                written,
                on_confirmed=crash_after(2500),
                checkpoint_interval_s=0.0,  # a checkpoint after every chunk of rows
                rejects_path=rejects,
            )
        )
    checkpoint = load_checkpoint(storage, "night-1")
    assert checkpoint is not None
    published = asyncio.run(LocalBroker(tmp_path / "queue.sqlite3").pending())
    assert published > checkpoint.jobs_confirmed, "the crash left nothing past the checkpoint"
    assert read_run(storage, "night-1").state == "publishing"

    report = asyncio.run(_run(tmp_path, "night-1", written, resume=True, rejects_path=rejects))
    assert report.resumed_from_row == checkpoint.rows_consumed
    assert report.already_published == published - checkpoint.jobs_confirmed
    _assert_exactly_once(asyncio.run(_drain(tmp_path)), written.job_ids("night-1"))
    assert read_run(storage, "night-1").expected_jobs == len(written.images)
    # The rejects file was cut back to the checkpoint: every bad row is in it once.
    assert len(rejects.read_text().splitlines()) == written.bad_rows


def test_second_run_deletes_what_is_gone_and_guard_stops_a_truncated_file(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "store")
    first = write_catalogue(tmp_path / "first.jsonl", 2000)
    asyncio.run(_run(tmp_path, "night-1", first))
    asyncio.run(_drain(tmp_path))

    second = write_catalogue(
        tmp_path / "second.jsonl", 2000, drop=range(0, 2000, 10), fewer=range(5, 2000, 10)
    )
    gone = second.gone_since(first)
    assert 0 < len(gone) < 0.2 * len(first.images)
    report = asyncio.run(_run(tmp_path, "night-2", second))
    assert (report.deleted, report.previous_run_id) == (len(gone), "night-1")
    jobs = asyncio.run(_drain(tmp_path))
    _assert_exactly_once(
        jobs,
        second.job_ids("night-2")
        | {j for j in Written(first.path, images=gone).job_ids("night-2", "delete")},
    )
    deletes = [j for j in jobs if j.op is Op.DELETE]
    assert {(j.item_id, j.image_key) for j in deletes} == set(gone.values())
    assert all(j.version == 1 and j.run_id == "night-2" for j in deletes)
    run = read_run(storage, "night-2")
    assert (run.expected_jobs, run.deleted_jobs) == (len(second.images) + len(gone), len(gone))

    truncated = write_catalogue(tmp_path / "truncated.jsonl", 1000)
    estimate, deletes_info = _dry_run(storage, "night-3", truncated.path)
    assert deletes_info["guard_trips"] is True and estimate.deleted > 0
    assert asyncio.run(_drain(tmp_path)) == []  # the dry run published nothing
    with pytest.raises(MassDeleteError, match="would delete"):
        asyncio.run(_run(tmp_path, "night-3", truncated))
    upserts_only = asyncio.run(_drain(tmp_path))
    assert {j.op for j in upserts_only} == {Op.UPSERT}
    assert read_run(storage, "night-3").state == "publishing"
    # Resumed with the deletes allowed, only the deletes go out.
    report = asyncio.run(_run(tmp_path, "night-3", truncated, resume=True, allow_mass_delete=True))
    deletes = asyncio.run(_drain(tmp_path))
    assert {j.op for j in deletes} == {Op.DELETE} and len(deletes) == report.deleted
    assert read_run(storage, "night-3").state == "published"


@pytest.mark.integration
def test_sigkill_of_the_cli_right_after_a_confirm_then_resume(tmp_path: Path) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 5000)
    env = local_env(
        tmp_path,
        IMGFLEET_PRODUCER__BATCH_SIZE="200",
        IMGFLEET_PRODUCER__CHECKPOINT_INTERVAL_S="0.2",
    )
    cmd = [sys.executable, "-m", "imgfleet", "produce", "catalogue", str(written.path), "--json"]
    killed = subprocess.run(
        [sys.executable, "-m", FAULTY_CLI, *cmd[3:], "--run-id", "night-9"],
        env={**env, KILL_AFTER_JOBS_ENV: "6000"},
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    storage = LocalStorage(tmp_path / "store")
    checkpoint = load_checkpoint(storage, "night-9")
    assert checkpoint is not None and checkpoint.jobs_confirmed < 6000
    finalize = subprocess.run(
        [sys.executable, "-m", "imgfleet", "index", "finalize", "--run", "night-9"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert finalize.returncode == 1 and b"still publishing" in finalize.stderr
    resumed = subprocess.run(
        [*cmd, "--resume", "night-9"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    summary = json.loads(resumed.stdout.decode().splitlines()[-1])
    assert summary["jobs"] == len(written.images) and summary["already_published"] > 0
    _assert_exactly_once(asyncio.run(_drain(tmp_path)), written.job_ids("night-9"))
    again = subprocess.run(
        [*cmd, "--resume", "night-9"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=120
    )
    assert again.returncode == 4 and b"published already" in again.stderr


class LedgerOnlyOnce(LocalBroker):
    """The RabbitMQ nack case: one publish reaches the ledger but not the lane, and fails."""

    failed: ClassVar[list[str]] = []

    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        if ledger is not None and not LedgerOnlyOnce.failed and len(jobs) > 10:
            await self._run(local_ledger.record, ledger, [j.job_id for j in jobs])
            LedgerOnlyOnce.failed = [j.job_id for j in jobs]
            raise TransientError("nacked by the lane queue", Reason.BROKER)
        await super().publish(jobs, ledger)


def test_a_publish_that_failed_for_good_is_sent_again_on_resume(tmp_path: Path) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 3000)
    storage = LocalStorage(tmp_path / "store")

    async def run(broker: LocalBroker, **extra: Any) -> PublishReport:
        try:
            return await CatalogueRun(
                _options("night-1", written.path, checkpoint_interval_s=0.0, **extra),
                broker=broker,
                storage=storage,
                registry=IndexRunRegistry(storage),
            ).run(lambda: open_catalogue(written.path))
        finally:
            await broker.close()

    LedgerOnlyOnce.failed = []
    with pytest.raises(TransientError, match="nacked"):
        asyncio.run(run(LedgerOnlyOnce(tmp_path / "queue.sqlite3")))
    checkpoint = load_checkpoint(storage, "night-1")
    assert checkpoint is not None
    assert set(LedgerOnlyOnce.failed) <= set(checkpoint.unconfirmed_job_ids)
    asyncio.run(run(LocalBroker(tmp_path / "queue.sqlite3"), resume=True))
    _assert_exactly_once(asyncio.run(_drain(tmp_path)), written.job_ids("night-1"))


def test_the_producer_serves_its_metrics_while_it_runs(tmp_path: Path) -> None:
    written = write_catalogue(tmp_path / "cat.jsonl", 300)
    port_file = tmp_path / "metrics.port"
    env = local_env(
        tmp_path,
        IMGFLEET_PRODUCER__BATCH_SIZE="20",
        IMGFLEET_METRICS__HOST="127.0.0.1",
        IMGFLEET_METRICS__PORT_FILE=str(port_file),
    )
    # Rate-limited so the run lasts a few seconds: long enough to be scraped mid-run.
    cmd = [sys.executable, "-m", "imgfleet", "produce", "catalogue", str(written.path)]
    cmd += ["--run-id", "scraped", "--max-rate", "100", "--json"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE)
    try:
        wait_for(port_file.exists, 60, "the producer's metrics port file")
        url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
        seen: list[float] = []

        def published_mid_run() -> bool:
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "imgfleet_producer_jobs_published_total" and (
                        sample.labels.get("op") == "upsert"
                    ):
                        seen.append(sample.value)
            return bool(seen) and seen[-1] > 0

        wait_for(published_mid_run, 60, "published jobs in the producer's metrics")
        # The same ops listener as every long-running process: liveness from the run's
        # event loop, readiness while the broker is connected.
        probes = {}
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(url.removesuffix("/metrics") + path, timeout=5) as answer:
                probes[path] = (answer.status, json.loads(answer.read()))
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert 0 < seen[-1] < len(written.images), "scraped after the run, not during it"
    live_status, live = probes["/healthz"]
    assert live_status == 200 and live["checks"]["heartbeat:event_loop"]["ok"] is True
    ready_status, ready = probes["/readyz"]
    assert ready_status == 200 and ready["conditions"] == {"broker": True}
    assert json.loads(out.decode().splitlines()[-1])["jobs"] == len(written.images)
