"""The scripts the images carry: the container healthcheck and nightly-run.sh."""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import MetricsConfig
from tests.deploy.artifacts import DEPLOY, cli_accepts
from tests.support.http import serving


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("imgfleet_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)) as url:
        yield url


_FAKE_IMGFLEET = """#!/bin/sh
# Records its arguments; `index finalize` fails with $FINALIZE_CODE until the
# $FINALIZE_OK_AFTER-th call, then succeeds.
echo "$*" >> "$CALLS"
case "$1 $2" in
  "produce catalogue") exit "${PRODUCE_CODE:-0}" ;;
  "index finalize")
    n=$(grep -c "^index finalize" "$CALLS")
    if [ "$n" -ge "${FINALIZE_OK_AFTER:-1}" ]; then exit 0; fi
    exit "${FINALIZE_CODE:-1}" ;;
esac
exit 64
"""


def _nightly(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "imgfleet"
    fake.write_text(_FAKE_IMGFLEET)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    result = subprocess.run(
        ["sh", str(DEPLOY / "nightly-run.sh"), *args],
        env={
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "CALLS": str(calls),
            "FINALIZE_POLL_S": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, calls.read_text().splitlines(), result.stdout + result.stderr


def test_healthcheck_default_url_follows_the_metrics_config() -> None:
    module = _load_healthcheck()
    assert str(MetricsConfig().port) == module.DEFAULT_METRICS_PORT
    assert module.default_url({}) == f"http://127.0.0.1:{MetricsConfig().port}/healthz"
    assert module.default_url({"IMGFLEET_METRICS__PORT": "9555"}) == (
        "http://127.0.0.1:9555/healthz"
    )
    explicit = "http://127.0.0.1:8090/healthz"
    assert module.default_url({"IMGFLEET_HEALTHCHECK_URL": explicit}) == explicit


@pytest.mark.integration
def test_healthcheck_reports_the_endpoint_status(health_server: str) -> None:
    module = _load_healthcheck()
    assert module.main(["imgfleet-healthcheck", f"{health_server}/healthz"]) == 0
    assert module.main(["imgfleet-healthcheck", f"{health_server}/readyz"]) == 1
    assert module.main(["imgfleet-healthcheck", f"{health_server}/nothing"]) == 1
    # Nothing listening: unhealthy, not a traceback.
    port = health_server.rsplit(":", 1)[1]
    closed = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "IMGFLEET_METRICS__PORT": "1", "IMGFLEET_HEALTHCHECK_URL": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert closed.returncode == 1 and "127.0.0.1:1/healthz" in closed.stdout
    ok = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "IMGFLEET_METRICS__PORT": port, "IMGFLEET_HEALTHCHECK_URL": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.integration
def test_nightly_publishes_then_waits_until_the_run_is_accounted_for(tmp_path: Path) -> None:
    code, calls, output = _nightly(
        tmp_path, "s3://exports/catalogue.jsonl", "nightly-test", FINALIZE_OK_AFTER="3"
    )
    assert code == 0, output
    assert calls == [
        "produce catalogue s3://exports/catalogue.jsonl --run-id nightly-test",
        "index finalize --run nightly-test",
        "index finalize --run nightly-test",
        "index finalize --run nightly-test",
    ]
    for argv in calls:
        cli_accepts(shlex.split(argv))


@pytest.mark.integration
def test_nightly_run_id_defaults_to_the_utc_date(tmp_path: Path) -> None:
    code, calls, output = _nightly(tmp_path, "/data/catalogue.jsonl")
    assert code == 0, output
    run_id = calls[0].rsplit(" ", 1)[1]
    assert re.fullmatch(r"nightly-\d{8}", run_id)
    assert calls[1] == f"index finalize --run {run_id}"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("run_id", "finalize", "exit_code", "says"),
    [
        ("r1", {"FINALIZE_CODE": "2"}, 2, ""),  # other failures: stop at once
        ("r3", {"FINALIZE_TIMEOUT_S": "0"}, 1, "not published"),  # it gives up in time
        ("r4", {"FINALIZE_CODE": "5"}, 0, "superseded"),  # a superseded run is done
        ("r5", {"FINALIZE_CODE": "6"}, 6, "another catalogue"),  # another catalogue stops
    ],
    ids=["other-failure", "timeout", "superseded", "another-catalogue"],
)
def test_nightly_finalizes_once_where_waiting_cannot_help(
    tmp_path: Path, run_id: str, finalize: dict[str, str], exit_code: int, says: str
) -> None:
    code, calls, output = _nightly(
        tmp_path, "cat.jsonl", run_id, FINALIZE_OK_AFTER="99", **finalize
    )
    assert code == exit_code, output
    assert calls == [
        f"produce catalogue cat.jsonl --run-id {run_id}",
        f"index finalize --run {run_id}",
    ]
    assert says in output


@pytest.mark.integration
def test_nightly_finalizes_nothing_when_the_produce_fails(tmp_path: Path) -> None:
    code, calls, _ = _nightly(tmp_path, "cat.jsonl", "r2", PRODUCE_CODE="1")
    assert code == 1
    assert calls == ["produce catalogue cat.jsonl --run-id r2"]  # nothing to finalise
