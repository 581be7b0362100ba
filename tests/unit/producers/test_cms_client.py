"""The CMS client's retries, against a loopback HTTP server that fails first."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from producers.cms.client import CmsClient, CmsRequestError

pytestmark = pytest.mark.integration  # loopback HTTP

ACCEPTED = {"accepted": {"changes": 1}}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedServer:
    """Answers each request with the next scripted step: (status, body, headers) or "drop"."""

    script: list[Any] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        step = self.script.pop(0) if self.script else (202, ACCEPTED, {})
        if step == "drop":
            assert request.transport is not None
            request.transport.abort()  # the connection resets before any answer
            return web.Response()
        if step == "slow":
            await asyncio.sleep(2)
            step = (202, ACCEPTED, {})
        status, payload, headers = step
        return web.json_response(payload, status=status, headers=headers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", scripted.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        scripted.port = runner.addresses[0][1]
        runner_box.append(runner)
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield scripted
    asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class Sleeps(list[float]):
    """Records the client's waits instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _client(server: ScriptedServer, sleeps: Sleeps, **kw: Any) -> CmsClient:
    return CmsClient(server.url, "tok-1", sleep=sleeps, **kw)


def test_upsert_delete_and_batch_send_the_documented_requests(server: ScriptedServer) -> None:
    client = _client(server, Sleeps())
    assert client.upsert("sku/1 é", ["http://cdn/a.jpg"], 3) == ACCEPTED
    client.delete("sku-2", 9)
    client.send([{"op": "delete", "item_id": "x", "version": 1}])
    put, delete, post = server.seen
    assert (put.method, put.path) == ("PUT", "/v1/items/sku%2F1%20%C3%A9")
    assert json.loads(put.body) == {"image_urls": ["http://cdn/a.jpg"], "version": 3}
    assert put.headers["Content-Type"] == "application/json"
    assert put.headers["Authorization"] == "Bearer tok-1"
    assert (delete.method, delete.path, delete.body) == ("DELETE", "/v1/items/sku-2?version=9", b"")
    assert (post.method, post.path) == ("POST", "/v1/items")
    assert json.loads(post.body) == {"items": [{"op": "delete", "item_id": "x", "version": 1}]}
    keys = {s.headers["Idempotency-Key"] for s in server.seen}
    assert len(keys) == 3, "each logical call has its own idempotency key"


def test_503_with_retry_after_is_retried_with_the_same_key(server: ScriptedServer) -> None:
    server.script = [
        (503, {"error": "broker_unavailable"}, {"Retry-After": "3"}),
        (502, {}, {}),
        (504, {}, {}),
        (429, {}, {"Retry-After": "1"}),
        (202, ACCEPTED, {}),
    ]
    sleeps = Sleeps()
    assert _client(server, sleeps, backoff_base_s=0.01).upsert("a", ["http://h/x"], 1) == ACCEPTED
    assert len(server.seen) == 5
    assert len({s.headers["Idempotency-Key"] for s in server.seen}) == 1
    assert len({s.body for s in server.seen}) == 1
    assert len(sleeps) == 4
    # Retry-After is a floor (plus up to 20% spread); without it, jittered backoff.
    assert 3.0 <= sleeps[0] <= 3.6
    assert 0.0 <= sleeps[1] <= 0.02 and 0.0 <= sleeps[2] <= 0.04
    assert 1.0 <= sleeps[3] <= 1.2


def test_an_http_date_retry_after_is_understood(server: ScriptedServer) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.script = [(503, {}, {"Retry-After": when}), (202, ACCEPTED, {})]
    sleeps = Sleeps()
    _client(server, sleeps).delete("a", 1)
    assert 27 <= sleeps[0] <= 36


def test_409_in_progress_is_retried(server: ScriptedServer) -> None:
    server.script = [
        (409, {"error": "idempotency_key_in_progress"}, {"Retry-After": "1"}),
        (202, ACCEPTED, {}),
    ]
    assert _client(server, Sleeps()).delete("a", 1) == ACCEPTED
    assert len(server.seen) == 2


def test_a_dropped_connection_is_retried(server: ScriptedServer) -> None:
    server.script = ["drop", "drop", (202, ACCEPTED, {})]
    sleeps = Sleeps()
    assert _client(server, sleeps).send([{"op": "delete", "item_id": "a", "version": 1}])
    assert len(server.seen) == 3 and len(sleeps) == 2
    assert len({s.headers["Idempotency-Key"] for s in server.seen}) == 1


def test_a_timeout_is_retried(server: ScriptedServer) -> None:
    server.script = ["slow", (202, ACCEPTED, {})]
    assert _client(server, Sleeps(), timeout_s=0.5).delete("a", 1) == ACCEPTED
    assert len(server.seen) == 2


def test_a_4xx_raises_at_once_with_the_servers_problems(server: ScriptedServer) -> None:
    problems = [{"index": 1, "field": "version", "message": "must be an integer"}]
    server.script = [
        (
            422,
            {"error": "validation_failed", "message": "items[1].version: bad", "errors": problems},
            {"X-Request-Id": "req-7"},
        )
    ]
    sleeps = Sleeps()
    with pytest.raises(CmsRequestError) as caught:
        _client(server, sleeps).send([{}, {}])
    error = caught.value
    assert (error.status, error.error, error.errors) == (422, "validation_failed", problems)
    assert (error.request_id, error.attempts) == ("req-7", 1)
    assert "items[1].version: must be an integer" in str(error)
    assert len(server.seen) == 1 and sleeps == []


def test_401_is_not_retried(server: ScriptedServer) -> None:
    server.script = [(401, {"error": "unauthorized", "message": "the token is not accepted"}, {})]
    with pytest.raises(CmsRequestError) as caught:
        _client(server, Sleeps()).delete("a", 1)
    assert caught.value.status == 401
    assert str(caught.value) == "HTTP 401 unauthorized: the token is not accepted"
    assert len(server.seen) == 1


def test_retries_run_out_with_the_last_failure(server: ScriptedServer) -> None:
    server.script = [(503, {"error": "broker_unavailable", "message": "down"}, {})] * 3
    sleeps = Sleeps()
    with pytest.raises(CmsRequestError) as caught:
        _client(server, sleeps, max_retries=2).delete("a", 1)
    assert (caught.value.status, caught.value.error, caught.value.attempts) == (
        503,
        "broker_unavailable",
        3,
    )
    assert len(server.seen) == 3 and len(sleeps) == 2


def test_an_unreachable_intake_raises_after_the_retries() -> None:
    sleeps = Sleeps()
    client = CmsClient("http://127.0.0.1:1", "t", max_retries=2, sleep=sleeps)
    with pytest.raises(CmsRequestError) as caught:
        client.delete("a", 1)
    assert caught.value.status is None and caught.value.attempts == 3
    assert "could not reach http://127.0.0.1:1" in str(caught.value)
    assert len(sleeps) == 2
