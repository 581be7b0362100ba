"""The CMS intake over loopback HTTP on the embedded broker (SQLite queue, local store):
authentication, body handling, health, metrics, logs and start-up refusals.

The same behaviour on RabbitMQ, queue contents and broker outages included, is in
tests/integration/test_cms_intake_rabbitmq.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from common.brokers.local.broker import LocalBroker
from common.config import CmsConfig, ProducerConfig, load_settings
from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import configure_logging
from common.storage.local import LocalStorage
from imgfleet.factories import intake_settings
from producers.cms.app import Intake
from producers.cms.client import CmsClient, CmsRequestError
from producers.cms.runtime import BrokerLink, IntakeSettings
from tests.support.aio import ask
from tests.support.cms_server import IntakeThread
from tests.support.fleet import REPO_ROOT

pytestmark = pytest.mark.integration  # loopback HTTP

TOKENS = ("old-token-0123456789", "new-token-9876543210")


def _settings(**cms: Any) -> IntakeSettings:
    config = CmsConfig(tokens=[SecretStr(t) for t in TOKENS], **cms)
    return intake_settings(config, ProducerConfig(max_images_per_item=3))


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[IntakeThread]:
    broker = LocalBroker(tmp_path / "queue.sqlite3", prefetch=10)
    intake = Intake(broker, LocalStorage(tmp_path / "store"), _settings(max_body_bytes=4096))
    with IntakeThread(intake) as server:
        server.wait_ready()
        yield server


def _queued(tmp_path: Path) -> int:
    return ask(LocalBroker(tmp_path / "queue.sqlite3", prefetch=10), lambda b: b.pending())


def _send(
    server: IntakeThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(server.base_url + path, data=body, method=method)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    return status, head, json.loads(raw) if raw.startswith(b"{") else raw


AUTH = {"Authorization": f"Bearer {TOKENS[0]}", "Content-Type": "application/json"}
UPSERT = json.dumps({"image_urls": ["http://cdn.test/a.jpg"], "version": 1}).encode()


def test_requests_without_a_valid_token_are_refused(intake: IntakeThread, tmp_path: Path) -> None:
    status, headers, body = _send(intake, "PUT", "/v1/items/a", UPSERT)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="imgfleet-cms"'
    assert body["error"] == "unauthorized"
    for bad in ("Bearer nope", "Basic b2xkLXRva2Vu", "Bearer ", f"Token {TOKENS[0]}"):
        status, headers, _ = _send(intake, "PUT", "/v1/items/a", UPSERT, {"Authorization": bad})
        assert status == 401, bad
    status, headers, _ = _send(intake, "PUT", "/v1/items/a", UPSERT, {"Authorization": "Bearer x"})
    assert headers["WWW-Authenticate"] == 'Bearer realm="imgfleet-cms", error="invalid_token"'
    assert _queued(tmp_path) == 0
    # Both tokens of a rotation are accepted.
    for token in TOKENS:
        status, _, body = _send(
            intake, "PUT", "/v1/items/a", UPSERT, {**AUTH, "Authorization": f"Bearer {token}"}
        )
        assert status == 202, body
    assert _queued(tmp_path) == 2 * 3


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("PUT", "/v1/items/a", b"{not json", {}, 400, "invalid_json"),
        ("PUT", "/v1/items/a", b"\xff\xfe", {}, 400, "invalid_json"),
        ("POST", "/v1/items", b"", {}, 400, "invalid_json"),
        (
            "PUT",
            "/v1/items/a",
            UPSERT,
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        (
            "PUT",
            "/v1/items/a",
            UPSERT,
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        ("PUT", "/v1/items/a", b'{"image_urls": []}', {}, 422, "validation_failed"),
        ("POST", "/v1/items", b'{"items": [' + b"1," * 3000 + b"1]}", {}, 413, "body_too_large"),
        ("POST", "/v1/items", b'{"items": [' + b"1," * 1000 + b"1]}", {}, 413, "too_many_items"),
        (
            "PUT",
            "/v1/items/a",
            UPSERT,
            {"Idempotency-Key": "x" * 300},
            400,
            "invalid_idempotency_key",
        ),
        ("GET", "/v1/items/a", None, {}, 405, "method_not_allowed"),
        ("POST", "/v1/other", b"{}", {}, 404, "not_found"),
    ],
)
def test_bad_requests_get_precise_errors_and_publish_nothing(
    intake: IntakeThread,
    tmp_path: Path,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got, head, answer = _send(intake, method, path, body, {**AUTH, **headers})
    assert (got, answer["error"]) == (status, code), answer
    assert answer["request_id"] == head["X-Request-Id"]
    assert head["Content-Type"].startswith("application/json")
    assert _queued(tmp_path) == 0


def test_a_chunked_body_over_the_limit_is_413(intake: IntakeThread, tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: urllib sends it chunked
        yield b'{"items": ['
        for _ in range(100):
            yield b'{"op": "delete", "item_id": "abcdefghijklmnopqrstuvwxyz", "version": 1},'
        yield b"1]}"

    status, _, body = _send(intake, "POST", "/v1/items", chunks(), AUTH)  # type: ignore[arg-type]
    assert (status, body["error"]) == (413, "body_too_large")
    assert "cms.max_body_bytes" in body["message"]
    assert _queued(tmp_path) == 0


def test_health_readiness_and_metrics_need_no_token(intake: IntakeThread) -> None:
    sample = intake.intake.metrics.value

    before = {
        "202": sample("imgfleet_cms_requests_total", status="202"),
        "401": sample("imgfleet_cms_requests_total", status="401"),
        "upsert": sample("imgfleet_cms_changes_total", op="upsert"),
        "delete": sample("imgfleet_cms_changes_total", op="delete"),
        "publishes": sample("imgfleet_cms_publish_seconds_count"),
    }
    assert intake.get("/healthz") == (200, b'{"status":"ok"}')
    assert intake.get("/readyz") == (200, b'{"ready":true}')
    client = CmsClient(intake.base_url, TOKENS[1])
    client.send(
        [
            {"op": "upsert", "item_id": "a", "image_urls": ["http://h/1.jpg"], "version": 1},
            {"op": "delete", "item_id": "b", "version": 1},
            {"op": "delete", "item_id": "c", "version": 1},
        ]
    )
    with pytest.raises(CmsRequestError):
        CmsClient(intake.base_url, "wrong").delete("a", 2)
    status, text = intake.get("/metrics")
    assert status == 200
    assert b"imgfleet_cms_requests_total" in text and b"imgfleet_cms_publish_seconds" in text
    assert sample("imgfleet_cms_requests_total", status="202") == before["202"] + 1
    assert sample("imgfleet_cms_requests_total", status="401") == before["401"] + 1
    assert sample("imgfleet_cms_changes_total", op="upsert") == before["upsert"] + 1
    assert sample("imgfleet_cms_changes_total", op="delete") == before["delete"] + 2
    assert sample("imgfleet_cms_publish_seconds_count") == before["publishes"] + 1


def test_access_logs_carry_the_request_but_never_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    broker = LocalBroker(tmp_path / "queue.sqlite3", prefetch=10)
    intake = Intake(broker, LocalStorage(tmp_path / "store"), _settings())
    with IntakeThread(intake) as server:
        server.wait_ready()
        CmsClient(server.base_url, TOKENS[0]).delete("sku-1", 4)
        _send(server, "PUT", "/v1/items/x", UPSERT, {"Authorization": "Bearer guess-123456"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "{" in line]
    requests = [line for line in lines if line.get("event") == "request"]
    accepted = next(line for line in requests if line["status"] == 202)
    assert accepted["method"] == "DELETE" and accepted["path"] == "/v1/items/sku-1"
    assert accepted["items"] == 1 and accepted["jobs"] == 3
    assert len(accepted["request_id"]) == 32 and accepted["latency_ms"] >= 0
    assert any(line["status"] == 401 for line in requests)
    everything = "\n".join(json.dumps(line) for line in lines)
    for secret in (*TOKENS, "guess-123456"):
        assert secret not in everything


def test_an_intake_without_tokens_is_refused_unless_insecure_on_loopback() -> None:
    with pytest.raises(ConfigError, match=r"cms.tokens is empty.*--insecure-no-auth"):
        intake_settings(CmsConfig(), ProducerConfig())
    with pytest.raises(ConfigError, match="only binds a loopback address"):
        intake_settings(CmsConfig(host="0.0.0.0"), ProducerConfig(), insecure_no_auth=True)
    with pytest.raises(ConfigError, match="empty token"):
        intake_settings(CmsConfig(tokens=[SecretStr(" ")]), ProducerConfig())
    for host in ("127.0.0.1", "::1", "localhost"):
        open_ = intake_settings(
            CmsConfig(host=host, tokens=[SecretStr("t")]), ProducerConfig(), insecure_no_auth=True
        )
        assert open_.tokens == ()


def test_the_cli_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "IMGFLEET_BROKER__LOCAL_PATH": str(tmp_path / "q.sqlite3"),
        "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store"),
    }

    def serve_cms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imgfleet", "serve", "cms", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    run = serve_cms("--port", "0")
    assert run.returncode == 2
    assert "cms.tokens is empty" in run.stderr
    run = serve_cms("--host", "0.0.0.0", "--insecure-no-auth")
    assert run.returncode == 2
    assert "--insecure-no-auth only binds a loopback address" in run.stderr
    assert not (tmp_path / "q.sqlite3").exists(), "nothing was opened before the refusal"


def test_settings_come_from_the_cms_and_producer_sections() -> None:
    settings = load_settings(
        cms={"tokens": ["abc"], "max_items_per_request": 7, "publish_timeout_s": 3},
        producer={"max_images_per_item": 5},
    )
    intake = intake_settings(settings.cms, settings.producer)
    assert (intake.tokens, intake.max_items_per_request, intake.max_images_per_item) == (
        ("abc",),
        7,
        5,
    )
    assert intake.publish_timeout_s == 3


class GatedBroker:
    """The embedded broker, with publishing held until the test lets it go."""

    def __init__(self, inner: LocalBroker) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, jobs: Any, ledger: str | None = None) -> None:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        await self.inner.publish(jobs)


def test_a_key_still_in_progress_gets_409_then_replays(tmp_path: Path) -> None:
    broker = GatedBroker(LocalBroker(tmp_path / "queue.sqlite3", prefetch=10))
    intake = Intake(broker, LocalStorage(tmp_path / "store"), _settings())  # type: ignore[arg-type]
    key = {**AUTH, "Idempotency-Key": "change-42"}
    with IntakeThread(intake) as server:
        server.wait_ready()
        first: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: first.update(answer=_send(server, "PUT", "/v1/items/a", UPSERT, key))
        )
        thread.start()
        assert broker.entered.wait(10)
        status, headers, body = _send(server, "PUT", "/v1/items/a", UPSERT, key)
        assert (status, body["error"], headers["Retry-After"]) == (
            409,
            "idempotency_key_in_progress",
            "1",
        )
        broker.release.set()
        thread.join(20)
        assert first["answer"][0] == 202
        status, headers, body = _send(server, "PUT", "/v1/items/a", UPSERT, key)
        assert (status, headers["Idempotent-Replayed"], body) == (202, "true", first["answer"][2])
    assert _queued(tmp_path) == 3


class FailingStorage(LocalStorage):
    """Local storage whose reads fail, as an unreachable object store's do."""

    def get(self, key: str) -> bytes:
        raise TransientError("storage unreachable", Reason.STORAGE)


def test_an_unavailable_idempotency_store_gives_503_and_publishes_nothing(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "queue.sqlite3", prefetch=10)
    intake = Intake(broker, FailingStorage(tmp_path / "store"), _settings())
    with IntakeThread(intake) as server:
        server.wait_ready()
        status, headers, body = _send(
            server, "PUT", "/v1/items/a", UPSERT, {**AUTH, "Idempotency-Key": "k-1"}
        )
        assert (status, body["error"], headers["Retry-After"]) == (503, "storage_unavailable", "2")
        # Without a key the store is not needed.
        assert _send(server, "PUT", "/v1/items/a", UPSERT, AUTH)[0] == 202
    assert _queued(tmp_path) == 3


class _FlakyBroker:
    """Fails its first connects with the given errors, then connects."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures

    async def connect(self) -> None:
        if self.failures:
            raise self.failures.pop(0)


def test_the_first_connect_is_retried_doubling_until_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", no_wait)
    link = BrokerLink(_FlakyBroker([OSError("down")] * 7))  # type: ignore[arg-type]
    asyncio.run(link.keep_connecting())
    assert link.connected and waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    refused_broker = _FlakyBroker([OSError("down"), ConfigError("bad credentials")])
    refused = BrokerLink(refused_broker)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bad credentials"):
        asyncio.run(refused.keep_connecting())
    assert not refused.connected
