"""The delivery contract on the local broker: kill -9 and SIGTERM lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest

from common.brokers.local.broker import LocalBroker
from common.schema import decode_job
from common.storage.local import LocalStorage
from imgfleet.demo.run import check_outcomes
from index.publish import build_generation
from index.search import Searcher
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _segment_count(fleet: Fleet) -> int:
    seg_root = fleet.store_root / "segments"
    return sum(1 for p in seg_root.rglob("*.seg")) if seg_root.exists() else 0


def _outcomes(fleet: Fleet) -> tuple[int, list, np.ndarray]:
    async def read() -> tuple[int, list]:
        broker = LocalBroker(fleet.queue_path)
        pending, dead = await broker.pending(), await broker.dead_letters(10**6)
        await broker.close()
        return pending, dead

    pending, dead = asyncio.run(read())
    storage = LocalStorage(fleet.store_root)
    build_generation(storage, 4)
    return pending, dead, Searcher(storage).image_ids()


def _assert_every_job_once(fleet: Fleet, jobs: int) -> None:
    pending, dead, ids = _outcomes(fleet)
    assert pending == 0
    assert len(ids) == len(set(ids.tolist())), "an image is in the index more than once"
    dead_jobs = [decode_job(d.body) for d in dead]
    dead_keys = Counter((job.item_id, job.image_key) for job in dead_jobs)
    assert all(n == 1 for n in dead_keys.values()), "a job was dead-lettered twice"
    assert len(ids) + len(dead) == jobs
    # Every good image indexed, every broken one dead-lettered with its expected reason.
    assert check_outcomes(fleet.corpus, set(ids.tolist()), dead) == []


def test_kill9_mid_run_then_restart_loses_nothing(fleet: Fleet) -> None:
    out = fleet.run("produce", "catalogue", str(fleet.catalogue), "--json")
    jobs = int(json.loads(out.strip().splitlines()[-1])["jobs"])
    worker = fleet.spawn("work", "--worker-id", "victim")
    try:
        wait_for(lambda: _segment_count(fleet) >= 2, 120, "the first segments")
        # The worker alone, as the OOM killer or `kill -9 <pid>` does: its decode processes
        # follow it, and the resource tracker unlinks their shared memory (a group kill
        # would take the tracker too, and leak it in /dev/shm).
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    pending_after_kill, _, _ = _outcomes(fleet)
    assert pending_after_kill > 0, "the worker finished before it was killed"
    fleet.run("work", "--until-idle", "--worker-id", "survivor")
    _assert_every_job_once(fleet, jobs)


def test_sigterm_drains_within_deadline_and_restart_completes(fleet: Fleet) -> None:
    out = fleet.run("produce", "catalogue", str(fleet.catalogue), "--json")
    jobs = int(json.loads(out.strip().splitlines()[-1])["jobs"])
    worker = fleet.spawn(
        "work", "--worker-id", "graceful", IMGFLEET_WORKER__SHUTDOWN_DEADLINE_S="10"
    )
    try:
        wait_for(lambda: _segment_count(fleet) >= 1, 120, "the first segment")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        drain_s = time.monotonic() - t0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    log = worker.stdout.read().decode() if worker.stdout else ""
    assert code == 0, log[-3000:]
    assert drain_s < 15
    assert "stop requested" in log
    # Nothing is left leased: whatever was not finished went back to the queue at once.
    fleet.run("work", "--until-idle", "--worker-id", "second", timeout_s=120)
    _assert_every_job_once(fleet, jobs)


def test_two_workers_share_one_queue_and_one_dies(fleet: Fleet) -> None:
    out = fleet.run("produce", "catalogue", str(fleet.catalogue), "--json")
    jobs = int(json.loads(out.strip().splitlines()[-1])["jobs"])
    steady = fleet.spawn("work", "--until-idle", "--worker-id", "steady")
    victim = fleet.spawn("work", "--worker-id", "victim")
    try:
        wait_for(lambda: _segment_count(fleet) >= 2, 120, "the first segments")
        os.kill(victim.pid, signal.SIGKILL)  # alone, as above
        victim.wait(10)
        # The survivor picks up the victim's leased jobs once their visibility times out.
        code = steady.wait(180)
    finally:
        for proc in (steady, victim):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = steady.stdout.read().decode() if steady.stdout else ""
    assert code == 0, log[-3000:]
    _assert_every_job_once(fleet, jobs)
