"""Structured logs: process context on every line, secrets masked, library logs and
decode child processes in the same format."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

import common.observability.logging as app_logging
from common.config import load_settings
from common.observability.logging import (
    bind_process,
    configure_logging,
    get_logger,
    settings_secrets,
)

# The standard-library loggers these tests write through, and their parents: another test
# in this process may have set their levels (the ops commands mute the client libraries).
_LIBRARY_LOGGERS = ("aio_pika", "aio_pika.robust_connection", "botocore", "py.warnings")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from logging as a fresh process has it and leaves it as it was.

    The logging set-up is process-wide, and under xdist whatever ran before in this
    process shows: an in-process CLI command mutes aio_pika at CRITICAL, registers the
    settings' secrets (masked from then on) and leaves the root logger's handler and
    level; a worker binds its context. The module's own state (format, context, secrets)
    is swapped for empty copies; the standard library's is saved and put back by hand.
    """
    monkeypatch.setattr(app_logging, "_config", {"format": "console", "level": "info"})
    monkeypatch.setattr(app_logging, "_process_context", {})
    monkeypatch.setattr(app_logging, "_secrets", set())
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    context = structlog.contextvars.get_contextvars()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    disabled_below = logging.root.manager.disable
    libraries = {name: logging.getLogger(name) for name in _LIBRARY_LOGGERS}
    levels = {name: (lg.level, lg.disabled) for name, lg in libraries.items()}
    logging.disable(logging.NOTSET)
    for lg in libraries.values():
        lg.setLevel(logging.NOTSET)
        lg.disabled = False
    try:
        yield
    finally:
        for name, lg in libraries.items():
            lg.setLevel(levels[name][0])
            lg.disabled = levels[name][1]
        logging.disable(disabled_below)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**context)


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
