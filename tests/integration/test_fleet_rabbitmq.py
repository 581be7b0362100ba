"""The delivery contract on RabbitMQ, through real worker processes.

Every scenario ends with the same check: nothing pending, every good image in the index
exactly once, every bad one in the DLQ exactly once with its reason.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from PIL import Image

from common.identity import image_id_for
from common.schema import SCHEMA_VERSION, Job, Lane, decode_job
from common.storage.local import LocalStorage
from index.segments import list_segments, read_segment
from tests.support.faulty_image_server import FaultyImageServer
from tests.support.fleet import kill_when, reaped
from tests.support.rabbitmq import RabbitFleet, drain_image_ids
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _segment_image_ids(store_root: Path) -> Counter[int]:
    storage = LocalStorage(store_root)
    ids: Counter[int] = Counter()
    for key in list_segments(storage):
        ids.update(record.image_id for record in read_segment(storage, key).records())
    return ids


def _indexed(fleet: RabbitFleet) -> int:
    """Records in the fleet's segments so far."""
    return sum(_segment_image_ids(fleet.store_root).values())


def _produce(fleet: RabbitFleet, catalogue: Path, *extra: str) -> int:
    out = fleet.run("produce", "catalogue", str(catalogue), "--json", *extra)
    return int(json.loads(out.strip().splitlines()[-1])["jobs"])


def _assert_every_job_settled_once(fleet: RabbitFleet, jobs: int) -> None:
    pending, dead, ids = fleet.outcomes()
    assert pending == 0
    indexed = ids.tolist()
    assert len(indexed) == len(set(indexed)), "an image is in the index more than once"
    dead_keys = Counter(decode_job(letter.body).image_id for letter in dead)
    assert all(n == 1 for n in dead_keys.values()), "a job was dead-lettered twice"
    assert len(indexed) + len(dead) == jobs
    reasons = {decode_job(letter.body).image_id: letter.reason for letter in dead}
    problems = []
    for image_id, want in fleet.expected.items():
        got = reasons.get(image_id)
        if want is None and image_id not in set(indexed):
            problems.append(f"{image_id}: expected indexed, got {got}")
        elif want == "truncated" and got not in (None, "truncated"):
            problems.append(f"{image_id}: expected truncated or recovered, got {got}")
        elif want not in (None, "truncated") and got != want:
            problems.append(f"{image_id}: expected {want}, got {got or 'indexed'}")
    assert problems == []


def test_two_workers_index_a_few_thousand_jobs_exactly_once(rabbit_fleet: RabbitFleet) -> None:
    catalogue = rabbit_fleet.write_big_catalogue(2000)
    jobs = _produce(rabbit_fleet, catalogue, "--run-id", "nightly-1")
    assert jobs == 2000
    # Before the workers ran, the run cannot be finalised: nothing is accounted for.
    early = rabbit_fleet.run_raw("index", "finalize", "--run", "nightly-1", "--json")
    assert early.returncode == 1 and json.loads(early.stdout)["finalized"] is False
    workers = [rabbit_fleet.spawn("work", "--until-idle", "--worker-id", f"w{i}") for i in range(2)]
    for worker in workers:
        out, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, out.decode()[-3000:]
    _assert_every_job_settled_once(rabbit_fleet, jobs)
    # The nightly run is complete (indexed + dead-lettered = expected) and publishes.
    final = json.loads(
        rabbit_fleet.run("index", "finalize", "--run", "nightly-1", "--json").splitlines()[-1]
    )
    assert final["finalized"] is True and final["forced"] is False
    # Both workers took part: each wrote segments of its own.
    writers = {
        key.rsplit("/", 1)[-1].split("-")[1]
        for key in list_segments(LocalStorage(rabbit_fleet.store_root))
    }
    assert {"w0", "w1"} <= writers


def test_kill9_mid_run_then_restart_loses_and_duplicates_nothing(
    rabbit_fleet: RabbitFleet,
) -> None:
    jobs = _produce(rabbit_fleet, rabbit_fleet.write_big_catalogue(600))
    victim = rabbit_fleet.spawn("work", "--worker-id", "victim")
    kill_when(victim, lambda: _indexed(rabbit_fleet) >= 60, 180, "the first segments")
    assert _indexed(rabbit_fleet) < jobs, "finished too soon"
    rabbit_fleet.run("work", "--until-idle", "--worker-id", "survivor", timeout_s=600)
    _assert_every_job_settled_once(rabbit_fleet, jobs)


def test_connection_cuts_during_a_run_lose_and_duplicate_nothing(
    rabbit_fleet: RabbitFleet,
) -> None:
    jobs = _produce(rabbit_fleet, rabbit_fleet.write_big_catalogue(600))
    cuts: list[int] = []
    with TcpProxy("127.0.0.1", 5672) as proxy:
        stop = threading.Event()

        def cutter() -> None:
            # Cut whenever the worker is connected and has made progress since the last cut.
            last = 0
            while not stop.is_set() and len(cuts) < 4:
                time.sleep(1.5)
                done = _indexed(rabbit_fleet)
                if done > last:
                    cuts.append(proxy.cut_all())
                    last = done

        thread = threading.Thread(target=cutter, daemon=True)
        thread.start()
        try:
            rabbit_fleet.run(
                "work",
                "--until-idle",
                "--worker-id",
                "cut",
                timeout_s=600,
                IMGFLEET_BROKER__URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
            )
        finally:
            stop.set()
            thread.join(10)
        assert proxy.connections_seen >= 2, "the worker never had to reconnect"
    assert len(cuts) >= 2 and sum(cuts) >= 2
    _assert_every_job_settled_once(rabbit_fleet, jobs)


def test_poison_jobs_dead_letter_once_and_transient_failures_recover(
    tmp_path: Path, rabbit_fleet: RabbitFleet
) -> None:
    images = tmp_path / "poison"
    images.mkdir()
    for name, colour in (("ok.jpg", "red"), ("flaky.jpg", "blue")):
        Image.new("RGB", (300, 200), colour).save(images / name, "JPEG")
    (images / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)

    with FaultyImageServer(tmp_path) as server:
        server.fail_next("flaky.jpg", 503, times=2)

        def job(item: str, name: str) -> Job:
            return Job(item_id=item, url=f"{server.base_url}/poison/{name}")

        good = [job("ok", "ok.jpg"), job("flaky", "flaky.jpg")]
        bad = {"missing": job("missing", "nope.jpg"), "garbage": job("garbage", "garbage.jpg")}
        raw = {
            "bad_message": b"{this is not json",
            "unsupported_schema": orjson.dumps(
                {"schema_version": 999, "item_id": "x", "url": "http://a/b"}
            ),
            "unknown_op": orjson.dumps(
                {"schema_version": SCHEMA_VERSION, "item_id": "y", "op": "merge", "url": "u"}
            ),
        }

        rabbit_fleet.publish([*good, *bad.values()], list(raw.values()))
        rabbit_fleet.run("work", "--until-idle", "--worker-id", "poison", timeout_s=300)
        assert server.request_count("/poison/flaky.jpg") == 3

    pending, dead, ids = rabbit_fleet.outcomes()
    assert pending == 0
    assert sorted(ids.tolist()) == sorted(j.image_id for j in good)
    by_body = Counter(letter.body for letter in dead)
    assert all(n == 1 for n in by_body.values()), "a poison job was dead-lettered twice"
    reasons = {letter.body: letter.reason for letter in dead}
    assert reasons[raw["bad_message"]] == "bad_message"
    assert reasons[raw["unsupported_schema"]] == "unsupported_schema"
    assert reasons[raw["unknown_op"]] == "bad_message"
    by_item = {letter.item_id: letter for letter in dead if letter.item_id}
    assert by_item["missing"].reason == "http_404"
    assert by_item["garbage"].reason in ("undecodable", "not_an_image")
    assert len(dead) == 5


def test_a_live_job_overtakes_20k_bulk_jobs_and_sigterm_loses_nothing(
    tmp_path: Path, rabbit_fleet: RabbitFleet
) -> None:
    image = tmp_path / "one" / "product.jpg"
    image.parent.mkdir()
    Image.new("RGB", (320, 240), "orange").save(image, "JPEG")
    n_bulk = 20_000
    with FaultyImageServer(tmp_path) as server:
        url = f"{server.base_url}/one/product.jpg"
        bulk = [Job(item_id=f"bulk-{i}", url=url) for i in range(n_bulk)]
        live = Job(item_id="cms-change", url=url, lane=Lane.LIVE)

        rabbit_fleet.publish(bulk)
        with reaped(rabbit_fleet.spawn("work", "--worker-id", "prio")) as worker:
            wait_for(lambda: _indexed(rabbit_fleet) >= 20, 180, "bulk work to start")
            rabbit_fleet.publish([live])
            wait_for(
                lambda: live.image_id in _segment_image_ids(rabbit_fleet.store_root),
                120,
                "the live job to be indexed",
            )
            done_when_live_landed = _indexed(rabbit_fleet)
            worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, out.decode()[-3000:]
    # The live job jumped the queue: only a small part of the backlog went before it.
    assert done_when_live_landed < 2_000

    # SIGTERM lost nothing: what the worker did not index is still queued.
    indexed = set(_segment_image_ids(rabbit_fleet.store_root))
    remaining = drain_image_ids(rabbit_fleet.url, rabbit_fleet.prefix)
    expected = {job.image_id for job in bulk} | {image_id_for("cms-change", "0")}
    assert indexed | remaining == expected
