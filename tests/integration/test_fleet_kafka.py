"""Worker processes (`python -m imgfleet work`) on Kafka: the same contract as on the queue.

Every scenario ends by checking the outcome the fleet promises: each job of the catalogue
is indexed or dead-lettered with its expected reason, no image is in the index twice, no
job is dead-lettered twice, and the group has nothing left uncommitted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from common.brokers.base import DeadLetter
from common.brokers.kafka.broker import KafkaBroker
from common.identity import image_id_for
from common.schema import SCHEMA_VERSION, Job, Lane, decode_job
from common.storage.local import LocalStorage
from imgfleet.demo.corpus import GOOD_KINDS
from imgfleet.demo.run import check_outcomes
from index.publish import build_generation
from index.search import Searcher
from index.segments import list_segments, read_segment
from tests.support.aio import ask
from tests.support.fleet import kill_when, reaped
from tests.support.kafka import KafkaFleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

WORKER_TIMEOUT_S = 150
# A worker's first segment comes 5-10 s after it starts on a loaded 2-core machine; a
# worker that consumes nothing fails here instead of at WORKER_TIMEOUT_S.
DEFAULTS_FIRST_SEGMENT_S = 60


def _kafka(fleet: KafkaFleet, fn: Any) -> Any:
    return ask(fleet.broker(), fn)


def _produce(fleet: KafkaFleet) -> int:
    out = fleet.run("produce", "catalogue", str(fleet.catalogue), "--json")
    return int(json.loads(out.strip().splitlines()[-1])["jobs"])


def _segments(fleet: KafkaFleet) -> list[str]:
    return list_segments(LocalStorage(fleet.store_root)) if fleet.store_root.exists() else []


def _finish(*procs: subprocess.Popen[bytes]) -> list[str]:
    logs = []
    with contextlib.ExitStack() as running:
        for proc in procs:
            running.enter_context(reaped(proc))
        for proc in procs:
            code = proc.wait(WORKER_TIMEOUT_S)
            log = proc.stdout.read().decode() if proc.stdout else ""
            assert code == 0, log[-4000:]
            logs.append(log)
    return logs


def _outcomes(fleet: KafkaFleet) -> tuple[int, list[DeadLetter], np.ndarray]:
    async def read(broker: KafkaBroker) -> tuple[int, list[DeadLetter]]:
        return await broker.pending(), await broker.dead_letters(10**6)

    pending, dead = _kafka(fleet, read)
    storage = LocalStorage(fleet.store_root)
    build_generation(storage, 4)
    return pending, dead, Searcher(storage).image_ids()


def _assert_every_job_once(fleet: KafkaFleet, jobs: int) -> list[DeadLetter]:
    pending, dead, ids = _outcomes(fleet)
    assert pending == 0
    assert len(ids) == len(set(ids.tolist())), "an image is in the index more than once"
    keyed = [decode_job(d.body) for d in dead if d.item_id is not None]
    dead_keys = Counter((job.item_id, job.image_key) for job in keyed)
    assert all(n == 1 for n in dead_keys.values()), f"dead-lettered twice: {dead_keys}"
    assert len(ids) + len(keyed) == jobs
    assert check_outcomes(fleet.corpus, set(ids.tolist()), dead) == []
    return dead


def test_a_worker_with_the_default_config_consumes_and_indexes_the_bulk_lane(
    kafka_fleet: KafkaFleet,
) -> None:
    # broker.prefetch is left at its default (0: the pipeline's capacity), as users run
    # it. Kafka once got that 0 as its window, kept the bulk partitions paused, and the
    # worker sat assigned and idle with the whole backlog as lag.
    fleet = kafka_fleet
    assert "IMGFLEET_BROKER__PREFETCH" not in fleet.env()
    jobs = _produce(fleet)
    worker = fleet.spawn("work", "--until-idle", "--worker-id", "defaults")
    try:
        wait_for(lambda: len(_segments(fleet)) >= 1, DEFAULTS_FIRST_SEGMENT_S, "a first segment")
    except AssertionError:
        os.killpg(worker.pid, signal.SIGKILL)
        log = worker.stdout.read().decode() if worker.stdout else ""
        raise AssertionError(f"nothing indexed; worker log: {log[-3000:]}") from None
    _finish(worker)
    _assert_every_job_once(fleet, jobs)


def test_two_workers_index_everything_once_with_poison_and_transient_failures(
    kafka_fleet: KafkaFleet,
) -> None:
    fleet = kafka_fleet
    assert fleet.server is not None
    flaky_item, flaky = next(
        (item, image)
        for item in fleet.corpus.items
        for image in item.images
        if image.kind in GOOD_KINDS
    )
    flaky_path = f"/images/{flaky.filename}"
    fleet.server.fail_next(flaky.filename, 503, times=2)  # succeeds on the third try
    jobs = _produce(fleet)
    malformed = [
        b"{this is not json",
        orjson.dumps({"schema_version": 999, "item_id": "x", "url": "http://a/b"}),
        orjson.dumps({"schema_version": SCHEMA_VERSION, "item_id": "y", "op": "merge"}),
    ]
    _kafka(fleet, lambda broker: broker.publish_raw(malformed))

    workers = [fleet.spawn("work", "--until-idle", "--worker-id", f"w{i}") for i in (1, 2)]
    _finish(*workers)

    dead = _assert_every_job_once(fleet, jobs)
    assert fleet.server.request_count(flaky_path) == 3
    assert image_id_for(flaky_item.item_id, flaky.image_key) in set(_outcomes(fleet)[2].tolist())
    unkeyed = sorted((d.reason, d.body) for d in dead if d.item_id is None)
    assert unkeyed == sorted(
        [
            ("bad_message", malformed[0]),
            ("unsupported_schema", malformed[1]),
            ("bad_message", malformed[2]),
        ]
    )


def test_kill9_of_one_worker_rebalances_to_the_survivor_and_loses_nothing(
    kafka_fleet: KafkaFleet,
) -> None:
    fleet = kafka_fleet
    jobs = _produce(fleet)
    steady = fleet.spawn("work", "--until-idle", "--worker-id", "steady")
    victim = fleet.spawn("work", "--worker-id", "victim")
    kill_when(
        victim,
        lambda: any("-victim-" in key for key in _segments(fleet)),
        WORKER_TIMEOUT_S,
        "the victim's first segment",
    )
    # The survivor gets the victim's partitions once its session expires, resumes at their
    # committed offsets, and only then finds the group drained.
    [log] = _finish(steady)
    assert log.count("partitions assigned") >= 2, log[-3000:]
    _assert_every_job_once(fleet, jobs)


def test_a_live_job_overtakes_a_bulk_backlog(kafka_fleet: KafkaFleet) -> None:
    fleet = kafka_fleet
    good = [
        (item.item_id, image)
        for item in fleet.corpus.items
        for image in item.images
        if image.kind in GOOD_KINDS
    ]
    assert good
    backlog = [
        Job(
            item_id=f"bulk-{n}",
            url=fleet.corpus.url_of(good[n % len(good)][1], fleet.base_url),
            run_id="nightly",
        )
        for n in range(600)
    ]
    live = Job(
        item_id="live-item",
        url=fleet.corpus.url_of(good[0][1], fleet.base_url),
        lane=Lane.LIVE,
        run_id="cms",
    )
    _kafka(fleet, lambda broker: broker.publish(backlog))
    # The default window holds about 240 jobs, which a CPU worker does not finish within
    # the 30 s default shutdown deadline (measured: SIGTERM to exit took the full 30 s);
    # a short one hands the rest back instead, which this test does not look at.
    worker = fleet.spawn("work", "--worker-id", "solo", IMGFLEET_WORKER__SHUTDOWN_DEADLINE_S="5")
    try:
        wait_for(lambda: len(_segments(fleet)) >= 1, WORKER_TIMEOUT_S, "the first segment")
        _kafka(fleet, lambda broker: broker.publish([live]))
        storage = LocalStorage(fleet.store_root)

        def live_indexed() -> bool:
            return any(
                live.image_id in read_segment(storage, key).image_ids.tolist()
                for key in _segments(fleet)
            )

        wait_for(live_indexed, WORKER_TIMEOUT_S, "the live job in a segment")
        backlog_left = _kafka(fleet, lambda broker: broker.pending())
    finally:
        worker.send_signal(signal.SIGTERM)  # graceful: drain, commit, leave the group
        with reaped(worker):
            code = worker.wait(60)
    # The live job did not wait for the 600 bulk jobs queued before it.
    assert backlog_left > 100, backlog_left
    log = worker.stdout.read().decode() if worker.stdout else ""
    assert code == 0, log[-3000:]
    assert "stop requested" in log
