"""The ops commands on the local broker: status figures against the real counts, dlq
list / show, requeue, purge, the confirmation rule and `status --watch`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgfleet.cli.ops as cli_ops
from common.brokers.local.broker import LocalBroker
from common.schema import Job, Lane, decode_job
from common.storage.local import LocalStorage
from imgfleet.cli import main
from index.runs import RunInfo, write_run
from index.segments import SegmentWriter, VectorRecord
from tests.support.fleet import REPO_ROOT
from tests.support.waiting import take_deliveries

pytestmark = pytest.mark.integration

RUN = "night-1"


@pytest.fixture
def ops_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "IMGFLEET_BROKER__KIND": "local",
        "IMGFLEET_BROKER__LOCAL_PATH": str(tmp_path / "queue.sqlite3"),
        "IMGFLEET_BROKER__POLL_INTERVAL_S": "0.01",
        "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _broker(env: dict[str, str]) -> LocalBroker:
    return LocalBroker(env["IMGFLEET_BROKER__LOCAL_PATH"], poll_interval_s=0.01)


def _index(storage: LocalStorage, jobs: list[Job]) -> None:
    """What a worker writes for indexed jobs: a segment record tagged with the run."""
    writer = SegmentWriter(storage, 2, "w-test")
    for job in jobs:
        vector = np.ones(4, dtype=np.float32)
        writer.add(
            VectorRecord(
                job.image_id, job.item_id, job.version, "h", "m", vector, run_id=job.run_id
            )
        )
    writer.flush()


def _seed(env: dict[str, str]) -> tuple[LocalStorage, list[Job]]:
    """Run night-1 of 7 jobs: 2 indexed, 3 dead-lettered (5xx, 5xx, 404), 2 waiting; plus
    one letter whose body is not a job."""
    storage = LocalStorage(env["IMGFLEET_STORAGE__ROOT"])
    jobs = [Job(item_id=f"sku-{i}", url=f"http://img.test/{i}.jpg", run_id=RUN) for i in range(7)]
    write_run(storage, RunInfo(RUN, "catalogue.jsonl", len(jobs), time.time() - 100))
    _index(storage, jobs[:2])

    async def dead_letter() -> None:
        broker = _broker(env)
        await broker.publish(jobs[2:5])
        await broker.publish_raw([b"\x00garbage"])
        held = await take_deliveries(broker, 4)
        for delivery, reason in zip(held, ["http_5xx", "http_5xx", "http_404"], strict=False):
            job = decode_job(delivery.body)
            await broker.dead_letter(delivery, reason, f"HTTP for {job.item_id}", 5, job)
        await broker.dead_letter(held[3], "bad_message", "message is not JSON", 1, None)
        await broker.publish(jobs[5:])  # still waiting
        await broker.close()

    asyncio.run(dead_letter())
    return storage, jobs


def _cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> Any:
    assert main([*args, "--log-level", "info"]) == code
    out = capsys.readouterr().out.strip()
    return json.loads(out.splitlines()[-1]) if "--json" in args else out


def test_status_requeue_purge_and_show_on_the_local_broker(
    ops_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _ = _seed(ops_env)

    status = _cli(capsys, "status", "--json")
    (run,) = status["runs"]
    assert (run["expected"], run["indexed"], run["failed"], run["remaining"]) == (7, 2, 3, 2)
    assert run["failures_by_reason"] == {"http_5xx": 2, "http_404": 1}
    assert run["state"] == "published" and run["rate_source"] == "since_start"
    assert run["rate_per_s"] > 0 and run["eta_s"] > 0
    lanes = {lane["lane"]: lane for lane in status["lanes"]}
    assert (lanes["bulk"]["ready"], lanes["live"]["ready"], lanes["dlq"]["ready"]) == (2, 0, 4)
    assert status["dead_letters"]["total"] == 4
    text = _cli(capsys, "status")
    assert RUN in text and "since each run started" in text

    shown = _cli(capsys, "dlq", "show", "sku-4", "--json")["letters"]
    assert [(d["reason"], d["url"]) for d in shown] == [("http_404", "http://img.test/4.jpg")]

    # More letters than the threshold, no terminal, no --yes: refused, nothing moves.
    monkeypatch.setattr(cli_ops, "CONFIRM_ABOVE", 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    assert main(["requeue", "--reason", "http_5xx", "--log-level", "info"]) == 1
    assert "--yes" in capsys.readouterr().err
    assert _cli(capsys, "dlq", "list", "--json")["total"] == 4

    moved = _cli(
        capsys, "requeue", "--reason", "http_5xx", "--reason", "bad_message", "--yes", "--json"
    )
    assert moved["by_reason"] == {"http_5xx": 2}
    assert moved["not_requeueable_by_reason"] == {"bad_message": 1}

    status = _cli(capsys, "status", "--json")
    (run,) = status["runs"]
    assert (run["indexed"], run["failed"], run["remaining"]) == (2, 1, 4)
    assert {lane["lane"]: lane["ready"] for lane in status["lanes"]}["live"] == 2

    async def work_the_live_lane() -> None:
        # What a worker does with the requeued jobs: index them, then ack.
        broker = _broker(ops_env)
        held = await take_deliveries(broker, 2)
        requeued = [decode_job(d.body) for d in held]
        assert all(
            j.lane is Lane.LIVE and [h.reason for h in j.history] == ["http_5xx"] for j in requeued
        )
        _index(storage, requeued)
        await broker.ack(held)
        await broker.close()

    asyncio.run(work_the_live_lane())
    (run,) = _cli(capsys, "status", "--json", "--run", RUN)["runs"]
    assert (run["indexed"], run["failed"], run["remaining"]) == (4, 1, 2)

    archive = ops_env["IMGFLEET_STORAGE__ROOT"] + "/../purged.jsonl"
    purged = _cli(capsys, "purge", "--reason", "bad_message", "--archive", archive, "--json")
    assert purged["moved"] == 1
    assert json.loads(Path(archive).read_text())["reason"] == "bad_message"
    listing = _cli(capsys, "dlq", "list", "--json")
    assert listing["counts"] == {"http_404": 1}

    assert main(["purge", "--log-level", "info"]) == 2  # no filter and no --all
    assert "--all" in capsys.readouterr().err

    # A run still publishing: what is published so far is a lower bound, and says so.
    write_run(
        storage,
        RunInfo("night-2", "c.jsonl", 0, time.time(), state="publishing", published_jobs=5),
    )
    (run,) = _cli(capsys, "status", "--json", "--run", "night-2")["runs"]
    assert (run["state"], run["expected"], run["expected_final"]) == ("publishing", 5, False)
    assert "5+" in _cli(capsys, "status", "--run", "night-2")


def test_status_watch_measures_the_rate_between_samples_and_stops_on_ctrl_c(
    ops_env: dict[str, str],
) -> None:
    _seed(ops_env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgfleet", "status", "--watch", "0.5", "--json"],
        cwd=REPO_ROOT,
        env={**os.environ, **ops_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    samples = [json.loads(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [s["runs"][0]["rate_source"] for s in samples] == ["since_start", "between_samples"]
    assert samples[1]["runs"][0]["rate_per_s"] == 0  # nothing moved between the samples


def test_a_queue_file_that_cannot_be_opened_is_one_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "a-file" / "q.sqlite3"))
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    assert main(["status", "--log-level", "info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgfleet: configuration error: local broker")
