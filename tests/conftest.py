"""Fixtures shared by every test package."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Broker fixtures live in tests/support so that every suite (adapters, contract,
# integration) can use them, not only the folder they were written for.
pytest_plugins = ["tests.support.rabbitmq", "tests.support.kafka"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# tests/vision (timm, open_clip) runs in .venv-vision, started by tests/unit/test_vision_env.py;
# where timm does not import it is not collected at all, rather than reported as skipped.
collect_ignore = [] if importlib.util.find_spec("timm") else ["vision"]

# The default model runs on the CPU through its ONNX export, written once per engine cache
# (about 5 s). One cache for the whole run, test processes and the workers they spawn
# alike, instead of one per temporary directory; writes are atomic, so they may race.
os.environ.setdefault(
    "IMGFLEET_MODEL__ENGINE_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"imgfleet-test-engines-{os.getuid()}"),
)


def require_service(what: str, why: str) -> None:
    """The one rule for a missing server or tool: fail under CI, skip elsewhere."""
    message = f"{what} unavailable: {why}"
    if IN_CI:
        pytest.fail(f"{message} (required in CI)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port: a real HTTP endpoint driven through boto3."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - moto[server] is a dev dependency
        require_service("moto[server] (the S3 tests)", "not installed")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the test endpoint (moto accepts any credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture(autouse=True)
def _logging_config_is_per_test() -> Iterator[None]:
    """Restore structlog's configuration after each test.

    A CLI test that runs ``main`` in-process configures logging (one-shot commands log at
    WARNING), and a later test's ``capture_logs`` would then see no INFO events at all.
    """
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
