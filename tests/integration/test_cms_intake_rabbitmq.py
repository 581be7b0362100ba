"""The CMS intake against the real RabbitMQ: exact jobs on the live queue, precise refusals
that publish nothing, idempotent replays, broker outages that lose nothing acknowledged,
graceful shutdown, the real CLI, and a CMS change indexed by a real worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.config import Settings, load_settings
from common.identity import image_id_for
from common.schema import Job, Lane, Op, decode_job
from common.storage.local import LocalStorage
from imgfleet.factories import intake_settings, make_broker, make_storage
from index.publish import build_generation
from index.search import Searcher
from producers.cms.app import Intake
from producers.cms.client import CmsClient, CmsRequestError
from producers.cms.idempotency import Claim, IdempotencyStore
from tests.support.aio import ask
from tests.support.cms_server import IntakeThread
from tests.support.fleet import REPO_ROOT
from tests.support.rabbitmq import RabbitFleet, broker_config, rabbit_settings
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

TOKEN = "cms-test-token-5f1d9c"
MAX_IMAGES = 3


def _settings(store: Path, url: str, prefix: str, **cms: Any) -> Settings:
    return load_settings(
        broker=rabbit_settings(url, prefix),
        storage={"root": str(store)},
        producer={"max_images_per_item": MAX_IMAGES},
        cms={"tokens": [TOKEN], "publish_timeout_s": 2.0, **cms},
    )


def _intake(settings: Settings, broker: Any = None) -> Intake:
    return Intake(
        broker or make_broker(settings),
        make_storage(settings),
        intake_settings(settings.cms, settings.producer),
    )


@pytest.fixture
def settings(tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str) -> Settings:
    return _settings(
        tmp_path / "store",
        rabbitmq_url,
        rabbit_prefix,
        max_items_per_request=5,
        max_body_bytes=4096,
    )


@pytest.fixture
def intake(settings: Settings) -> Iterator[IntakeThread]:
    with IntakeThread(_intake(settings)) as server:
        server.wait_ready()
        yield server


def _client(server: IntakeThread, **kw: Any) -> CmsClient:
    return CmsClient(server.base_url, TOKEN, **kw)


# -- reading the queues -----------------------------------------------------------------


def _depths(url: str, prefix: str) -> dict[str, int]:
    return ask(RabbitMQBroker(broker_config(url, prefix)), lambda broker: broker.depths())


def _drain(url: str, prefix: str, expected: int, timeout_s: float = 20) -> list[Job]:
    """Consume and ack exactly ``expected`` jobs (failing if more or fewer arrive)."""

    async def take() -> list[Job]:
        broker = RabbitMQBroker(broker_config(url, prefix), prefetch=max(expected, 10))
        await broker.connect()
        stream = broker.consume()
        jobs: list[Job] = []
        try:
            async with asyncio.timeout(timeout_s):
                while len(jobs) < expected:
                    delivery = await anext(stream)
                    jobs.append(decode_job(delivery.body))
                    await broker.ack([delivery])
            with pytest.raises(TimeoutError):  # and nothing more
                async with asyncio.timeout(0.5):
                    extra = await anext(stream)
                    jobs.append(decode_job(extra.body))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await broker.close()
        return jobs

    return asyncio.run(take())


def _expected_jobs(
    item_id: str, op: str, version: int, urls: Sequence[str] = ()
) -> set[tuple[Any, ...]]:
    rows = set()
    for position in range(MAX_IMAGES):
        upsert = op == "upsert" and position < len(urls)
        rows.add(
            (
                item_id,
                str(position),
                Op.UPSERT if upsert else Op.DELETE,
                urls[position] if upsert else None,
                version,
                Lane.LIVE,
                "cms",
            )
        )
    return rows


def _shape(job: Job) -> tuple[Any, ...]:
    return (job.item_id, job.image_key, job.op, job.url, job.version, job.lane, job.run_id)


def _http(
    server: IntakeThread,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    request = urllib.request.Request(server.base_url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


# -- the tests --------------------------------------------------------------------------


def test_upserts_deletes_and_batches_put_exactly_the_right_jobs_on_the_live_queue(
    intake: IntakeThread, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    client = _client(intake)
    urls = ["https://cdn.test/1/a.jpg", "s3://media/1/b.png"]
    put = client.upsert("sku-1", urls, 5)
    delete = client.delete("sku/2", 7)
    batch = client.send(
        [
            {"op": "upsert", "item_id": "sku-3", "image_urls": urls[:1], "version": 1},
            {"op": "delete", "item_id": "sku-4", "version": 2},
        ]
    )
    assert put["accepted"] == {"changes": 1, "upserts": 1, "deletes": 0, "jobs": 3}
    assert delete["accepted"] == {"changes": 1, "upserts": 0, "deletes": 1, "jobs": 3}
    assert batch["accepted"] == {"changes": 2, "upserts": 1, "deletes": 1, "jobs": 6}
    depths = _depths(rabbitmq_url, rabbit_prefix)
    assert depths[f"{rabbit_prefix}.live"] >= 3 and depths[f"{rabbit_prefix}.bulk"] == 0
    jobs = _drain(rabbitmq_url, rabbit_prefix, 12)
    assert {_shape(j) for j in jobs} == (
        _expected_jobs("sku-1", "upsert", 5, urls)
        | _expected_jobs("sku/2", "delete", 7)
        | _expected_jobs("sku-3", "upsert", 1, urls[:1])
        | _expected_jobs("sku-4", "delete", 2)
    )
    answered = {
        job_id
        for response in (put, delete, batch)
        for item in response["items"]
        for job_id in item["job_ids"]
    }
    assert {j.job_id for j in jobs} == answered and len(answered) == 12
    by_item = {item["item_id"]: item for item in batch["items"]}
    assert by_item["sku-3"]["images"] == 1 and by_item["sku-4"]["op"] == "delete"


def test_every_bad_request_gets_its_precise_4xx_and_nothing_is_published(
    intake: IntakeThread, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    good = {"op": "upsert", "item_id": "ok", "image_urls": ["http://h/a.jpg"], "version": 1}
    cases: list[tuple[str, str, Any, bytes | None, dict[str, str], int, str, list[Any]]] = [
        ("PUT", "/v1/items/x", None, b"{oops", {}, 400, "invalid_json", []),
        ("PUT", "/v1/items/a%00b", {"image_urls": ["http://h/a.jpg"], "version": 1}, None, {},
         422, "validation_failed", [[None, "item_id", "must not contain control characters"]]),
        ("PUT", "/v1/items/x", {"image_urls": ["ftp://h/a.jpg"], "version": 1}, None, {},
         422, "validation_failed",
         [[None, "image_urls[0]", "scheme 'ftp' is not accepted (http, https or s3)"]]),
        ("DELETE", "/v1/items/x?version=-1", None, None, {}, 422, "validation_failed",
         [[None, "version", "must be >= 0"]]),
        # All or nothing: one bad change keeps the good one out too.
        ("POST", "/v1/items", {"items": [good, {**good, "item_id": "b", "version": "2"}]}, None,
         {}, 422, "validation_failed", [[1, "version", "must be an integer"]]),
        ("POST", "/v1/items", {"items": [good, {**good, "version": 2}]}, None, {}, 422,
         "validation_failed",
         [[1, "item_id", "item 'ok' is also changed at index 0 with other content; "
           "send one change per item"]]),
        ("POST", "/v1/items", {"items": [{**good, "item_id": f"i{i}"} for i in range(6)]}, None,
         {}, 413, "too_many_items",
         [[None, "items", "holds 6 changes; at most 5 per request "
           "(cms.max_items_per_request): split the batch"]]),
        ("POST", "/v1/items", {"items": [good] * 60}, None, {}, 413, "body_too_large", []),
        ("PUT", "/v1/items/x", {"image_urls": ["http://h/a.jpg"], "version": 1}, None,
         {"Authorization": "Bearer not-the-token"}, 401, "unauthorized", []),
        ("PUT", "/v1/items/x", {"image_urls": ["http://h/a.jpg"], "version": 1}, None,
         {"Content-Type": "text/csv"}, 415, "unsupported_media_type", []),
    ]  # fmt: skip
    for method, path, body, raw, headers, status, code, problems in cases:
        got, _, answer = _http(intake, method, path, body, headers, raw)
        assert (got, answer["error"]) == (status, code), (path, answer)
        assert [[p["index"], p["field"], p["message"]] for p in answer.get("errors", [])] == (
            problems
        ), answer
    depths = _depths(rabbitmq_url, rabbit_prefix)
    assert depths[f"{rabbit_prefix}.live"] == 0 and depths[f"{rabbit_prefix}.bulk"] == 0
    # And the client surfaces the server's problem list.
    with pytest.raises(CmsRequestError) as caught:
        _client(intake).send([good, {**good, "item_id": "z", "image_urls": ["nope"]}])
    assert caught.value.status == 422
    assert caught.value.errors == [
        {
            "index": 1,
            "field": "image_urls[0]",
            "message": "must be an absolute URL (http, https or s3)",
        }
    ]


def test_an_idempotent_replay_publishes_nothing_and_a_crash_republishes_the_same_ids(
    intake: IntakeThread, settings: Settings, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    body = {"image_urls": ["http://h/a.jpg", "http://h/b.jpg"], "version": 3}
    key = {"Idempotency-Key": "cms-change-81723"}
    status, headers, first = _http(intake, "PUT", "/v1/items/sku-9", body, key)
    assert status == 202 and "Idempotent-Replayed" not in headers
    status, headers, again = _http(intake, "PUT", "/v1/items/sku-9", body, key)
    assert (status, headers["Idempotent-Replayed"], again) == (202, "true", first)
    status, _, reused = _http(intake, "PUT", "/v1/items/sku-9", {**body, "version": 4}, key)
    assert (status, reused["error"]) == (422, "idempotency_key_reused")
    jobs = _drain(rabbitmq_url, rabbit_prefix, MAX_IMAGES)
    assert {j.job_id for j in jobs} == set(first["items"][0]["job_ids"])

    # A replica that died after publishing, before recording: its claim is left in
    # progress with a lease that has run out. The retry publishes the very same job ids.
    store = IdempotencyStore(make_storage(settings), ttl_s=60, lease_s=40, clock=lambda: 0.0)
    store.storage.delete(store.storage_key("cms-change-81723"))
    assert isinstance(store.begin("cms-change-81723", "whatever"), Claim)  # long expired
    status, headers, retried = _http(intake, "PUT", "/v1/items/sku-9", body, key)
    assert status == 202 and "Idempotent-Replayed" not in headers
    assert retried["items"][0]["job_ids"] == first["items"][0]["job_ids"]
    assert {j.job_id for j in _drain(rabbitmq_url, rabbit_prefix, MAX_IMAGES)} == {
        j.job_id for j in jobs
    }


class SwitchableProxy(TcpProxy):
    """The TCP proxy, plus an outage mode in which new connections are dropped at once."""

    refusing = False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_w.transport.abort()
            return
        await super()._handle(client_r, client_w)


def test_a_broker_outage_gives_503_and_nothing_acknowledged_is_lost(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    acked: dict[str, list[str]] = {}  # item id -> job ids, for every 2xx
    refused: list[int | None] = []
    stop = threading.Event()

    def sender(base_url: str) -> None:
        client = CmsClient(base_url, TOKEN, max_retries=0, timeout_s=10)
        i = 0
        while not stop.is_set():
            item = f"load-{i}"
            i += 1
            try:
                answer = client.upsert(item, [f"http://h/{item}.jpg"], 1)
                acked[item] = answer["items"][0]["job_ids"]
            except CmsRequestError as exc:
                refused.append(exc.status)
                time.sleep(0.2)

    with SwitchableProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        settings = _settings(tmp_path / "store", url, rabbit_prefix)
        with IntakeThread(_intake(settings)) as server:
            server.wait_ready()
            thread = threading.Thread(target=sender, args=(server.base_url,), daemon=True)
            thread.start()
            try:
                wait_for(lambda: len(acked) >= 5, 20, "changes accepted before the outage")
                proxy.refusing = True
                assert proxy.cut_all() >= 1
                status, headers, answer = _http(
                    server,
                    "PUT",
                    "/v1/items/during",
                    {"image_urls": ["http://h/d.jpg"], "version": 1},
                )
                assert (status, answer["error"]) == (503, "broker_unavailable")
                assert headers["Retry-After"] == "2"
                wait_for(lambda: server.get("/readyz")[0] == 503, 10, "readiness to drop")
                wait_for(lambda: 503 in refused, 20, "the sender to be refused")
                # A client with retries rides the outage out.
                patient: dict[str, Any] = {}
                rider = threading.Thread(
                    target=lambda: patient.update(
                        answer=CmsClient(server.base_url, TOKEN, max_retries=20).delete("rider", 4)
                    ),
                    daemon=True,
                )
                rider.start()
                time.sleep(1)
                before = len(acked)
                proxy.refusing = False
                server.wait_ready(30)
                wait_for(lambda: len(acked) >= before + 5, 30, "changes accepted after it")
                rider.join(60)
                assert patient["answer"]["accepted"]["deletes"] == 1
            finally:
                stop.set()
                thread.join(30)
    assert set(refused) == {503}
    expected = {job_id for ids in acked.values() for job_id in ids}
    expected |= set(patient["answer"]["items"][0]["job_ids"])
    # Refused requests may have reached the queue in part (never acknowledged, so the CMS
    # sends them again); every acknowledged job is there.
    depth = sum(
        n for name, n in _depths(rabbitmq_url, rabbit_prefix).items() if name.endswith(".live")
    )
    assert depth >= 1
    got = _drain_all(rabbitmq_url, rabbit_prefix)
    assert expected <= {j.job_id for j in got}


def test_an_intake_started_while_the_broker_is_down_serves_once_it_is_up(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    with SwitchableProxy("127.0.0.1", 5672) as proxy:
        proxy.refusing = True
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        with IntakeThread(_intake(_settings(tmp_path / "store", url, rabbit_prefix))) as server:
            # The listener is up at once; readiness and requests say the broker is not.
            assert server.get("/healthz")[0] == 200
            status, body = server.get("/readyz")
            assert (status, json.loads(body)) == (
                503,
                {"ready": False, "reason": "not connected to the broker yet"},
            )
            status, headers, answer = _http(server, "DELETE", "/v1/items/early?version=1")
            assert (status, answer["error"], headers["Retry-After"]) == (
                503,
                "broker_unavailable",
                "2",
            )
            assert answer["message"] == "not connected to the broker yet; nothing was published"
            proxy.refusing = False
            server.wait_ready(30)
            accepted = _client(server).delete("later", 2)
    jobs = _drain(rabbitmq_url, rabbit_prefix, MAX_IMAGES)
    assert {j.job_id for j in jobs} == set(accepted["items"][0]["job_ids"])


def _drain_all(url: str, prefix: str) -> list[Job]:
    """Consume everything on the queues until nothing more comes for a second."""

    async def take() -> list[Job]:
        broker = RabbitMQBroker(broker_config(url, prefix), prefetch=500)
        await broker.connect()
        stream = broker.consume()
        jobs: list[Job] = []
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        delivery = await anext(stream)
                except TimeoutError:
                    return jobs
                jobs.append(decode_job(delivery.body))
                await broker.ack([delivery])
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await broker.close()

    return asyncio.run(take())


class GatedBroker:
    """The real broker, with publishing held until the test lets it go."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        await self.inner.publish(jobs)

    async def close(self) -> None:
        self.closed = True
        await self.inner.close()


def test_shutdown_finishes_the_in_flight_request_then_closes_the_broker(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    settings = _settings(tmp_path / "store", rabbitmq_url, rabbit_prefix, publish_timeout_s=20)
    broker = GatedBroker(make_broker(settings))
    server = IntakeThread(_intake(settings, broker))
    with server:
        server.wait_ready()
        result: dict[str, Any] = {}
        request = threading.Thread(
            target=lambda: result.update(answer=_client(server, max_retries=0).delete("sku-5", 2)),
            daemon=True,
        )
        request.start()
        assert broker.entered.wait(10)
        server.request_stop()  # what SIGTERM does
        wait_for(lambda: server.intake.draining, 10, "the intake to start draining")
        # The listener closes: new requests are not taken any more...
        wait_for(lambda: _refused(server.base_url), 10, "the listener to close")
        assert not broker.closed and not server.stopped
        # ...while the one in flight completes.
        broker.release.set()
        request.join(20)
        assert result["answer"]["accepted"]["deletes"] == 1
        wait_for(lambda: server.stopped, 20, "the intake to stop")
    assert broker.closed
    assert {j.job_id for j in _drain(rabbitmq_url, rabbit_prefix, MAX_IMAGES)} == set(
        result["answer"]["items"][0]["job_ids"]
    )


def _refused(base_url: str) -> bool:
    try:
        CmsClient(base_url, TOKEN, max_retries=0, timeout_s=2).delete("late", 1)
    except CmsRequestError as exc:
        return exc.status is None
    return False


def test_the_cli_serves_with_a_token_and_stops_on_sigterm(
    tmp_path: Path, rabbitmq_url: str, rabbit_prefix: str
) -> None:
    env = {
        **os.environ,
        "IMGFLEET_BROKER__KIND": "rabbitmq",
        "IMGFLEET_BROKER__URL": rabbitmq_url,
        "IMGFLEET_BROKER__NAME_PREFIX": rabbit_prefix,
        "IMGFLEET_BROKER__RETRY_BASE_S": "0.1",
        "IMGFLEET_BROKER__RETRY_MAX_S": "0.4",
        "IMGFLEET_BROKER__MAX_ATTEMPTS": "4",
        "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store"),
        "IMGFLEET_PRODUCER__MAX_IMAGES_PER_ITEM": str(MAX_IMAGES),
        "IMGFLEET_CMS__TOKENS": json.dumps(["rotated-out-token", TOKEN]),
        "IMGFLEET_LOGGING__FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgfleet", "serve", "cms", "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any('"listening"' in line for line in lines), 30, "the intake to listen")
        port = next(json.loads(line)["port"] for line in lines if '"listening"' in line)
        base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(base_url + "/readyz") == 200, 30, "readiness")
        answer = CmsClient(base_url, TOKEN).upsert("cli-1", ["https://cdn.test/x.jpg"], 8)
        assert answer["accepted"]["jobs"] == MAX_IMAGES
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    events = [json.loads(line).get("event") for line in lines if line.startswith("{")]
    shutdown = ["signal received", "stopping: finishing in-flight requests", "broker closed"]
    assert [events.index(e) for e in shutdown] == sorted(events.index(e) for e in shutdown)
    assert events[-1] == "stopped"
    assert TOKEN not in "".join(lines)
    jobs = _drain(rabbitmq_url, rabbit_prefix, MAX_IMAGES)
    assert {_shape(j) for j in jobs} == _expected_jobs(
        "cli-1", "upsert", 8, ["https://cdn.test/x.jpg"]
    )


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_a_cms_upsert_is_indexed_by_a_worker_and_a_delete_removes_it(
    rabbit_fleet: RabbitFleet,
) -> None:
    fleet = rabbit_fleet
    jpegs = [
        image
        for item in fleet.corpus.items
        for image in item.images
        if image.kind == "jpeg" and image.image_key == "0"
    ]
    shared = fleet.corpus.url_of(jpegs[0], fleet.base_url)
    other = fleet.corpus.url_of(jpegs[1], fleet.base_url)
    settings = _settings(fleet.store_root, fleet.url, fleet.prefix)
    with IntakeThread(_intake(settings)) as server:
        server.wait_ready()
        client = _client(server)
        client.send(
            [
                {"op": "upsert", "item_id": "cms-a", "image_urls": [shared], "version": 1},
                {"op": "upsert", "item_id": "cms-b", "image_urls": [other, shared], "version": 1},
            ]
        )
        fleet.run("work", "--until-idle", "--worker-id", "cms-w1", timeout_s=120)
        storage = LocalStorage(fleet.store_root)
        build_generation(storage, 4)
        searcher = Searcher(storage)
        assert sorted(searcher.images_of_item("cms-b").tolist()) == sorted(
            [image_id_for("cms-b", "0"), image_id_for("cms-b", "1")]
        )
        hits = searcher.search_by_item("cms-a", k=3)
        assert hits is not None and hits[0].item_id == "cms-b" and hits[0].score > 0.99

        client.delete("cms-b", 2)
        fleet.run("work", "--until-idle", "--worker-id", "cms-w2", timeout_s=120)
    build_generation(storage, 4)
    searcher = Searcher(storage)
    assert searcher.images_of_item("cms-b").tolist() == []
    assert [h.item_id for h in searcher.search_by_item("cms-a", k=3) or []] == []
