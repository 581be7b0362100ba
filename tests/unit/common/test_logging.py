"""Structured logs: process context on every line, secrets masked, library logs and
decode child processes in the same format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from common.config import load_settings
from common.observability.logging import (
    bind_process,
    configure_logging,
    get_logger,
    settings_secrets,
    unbind_process,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    unbind_process("worker_id", "role")
    configure_logging("console", "info")


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_process_and_call_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    bind_process(worker_id="w-7", role="worker")
    get_logger("worker").info("dead-lettered", item_id="sku-1", image_id=42, shard=3)
    logging.getLogger("aio_pika.robust_connection").warning("Connection lost %s", "x")
    logging.getLogger("aio_pika.robust_connection").info("chatter at info is dropped")
    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["dead-lettered", "Connection lost x"]
    assert lines[0] | {"timestamp": None} == {
        "event": "dead-lettered",
        "item_id": "sku-1",
        "image_id": 42,
        "shard": 3,
        "worker_id": "w-7",
        "role": "worker",
        "level": "info",
        "timestamp": None,
    }
    assert lines[1]["worker_id"] == "w-7" and lines[1]["level"] == "warning"
    assert lines[1]["logger"] == "aio_pika.robust_connection"


def test_every_secret_of_the_settings_is_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__URL", "amqp://fleet:url-pass-123@mq:5672/v")
    monkeypatch.setenv("IMGFLEET_BROKER__PASSWORD", "env-pass-456")
    monkeypatch.setenv("IMGFLEET_STORAGE__S3_SECRET_ACCESS_KEY", "s3-secret-789")
    settings = load_settings()
    secrets = settings_secrets(settings)
    assert {"url-pass-123", "env-pass-456", "s3-secret-789"} <= set(secrets)
    configure_logging("json", "info", secrets=secrets)
    log = get_logger("t")
    log.info("connecting", url="amqp://fleet:url-pass-123@mq:5672/v")
    log.error("boom", error="auth failed for env-pass-456; key s3-secret-789")
    logging.getLogger("botocore").warning("signing with s3-secret-789")
    err = capsys.readouterr().err
    assert "url-pass-123" not in err and "env-pass-456" not in err and "s3-secret-789" not in err
    assert err.count("***") >= 4
    assert len(json_lines(err)) == 3  # still one JSON object per line


def _log_in_child(message: str) -> int:
    import os

    get_logger("decode").warning(message, secret_here="child-pass-000")
    return os.getpid()


def test_decode_children_log_like_their_parent(capfd: pytest.CaptureFixture[str]) -> None:
    from tests.support.decode_pool_hooks import HookedDecodePool

    configure_logging("json", "info", secrets=["child-pass-000"])
    bind_process(worker_id="w-9")
    with HookedDecodePool(1) as pool:
        child_pid = pool.run_in_worker(_log_in_child, "hello from a decode process").result(60)
    lines = [
        line
        for line in json_lines(capfd.readouterr().err)
        if line.get("event") == "hello from a decode process"
    ]
    assert len(lines) == 1
    assert lines[0]["worker_id"] == "w-9" and lines[0]["process"] == "decode"
    assert lines[0]["pid"] == child_pid and lines[0]["secret_here"] == "***"


def test_python_warnings_become_structured_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    configure_logging("json", "info")
    bind_process(worker_id="w-3")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("image is a decompression bomb candidate", UserWarning, stacklevel=1)
    lines = json_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "decompression bomb" in str(lines[0]["event"])
    assert lines[0]["worker_id"] == "w-3" and lines[0]["logger"] == "py.warnings"
