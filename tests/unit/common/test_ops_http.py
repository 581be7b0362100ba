"""The ops listener: /metrics, /healthz and /readyz over real HTTP on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.errors import ConfigError
from common.observability.health import Health
from common.observability.metrics import Metrics
from common.observability.ops_http import OpsServer
from tests.support.clock import FakeClock


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_endpoints_answer_with_the_current_state(tmp_path: Path) -> None:
    metrics = Metrics()
    clock = FakeClock(0.0)
    health = Health(stall_after_s=30, clock=clock)
    health.on_readiness_change(lambda ready: metrics.worker_ready.set(int(ready)))
    health.set_ready("model", False)
    port_file = tmp_path / "run" / "metrics.port"
    with OpsServer(metrics, health, host="127.0.0.1", port=0, port_file=port_file) as ops:
        assert ops.port > 0 and port_file.read_text().strip() == str(ops.port)
        metrics.jobs_consumed.labels(lane="bulk").inc(3)

        status, content_type, body = get(f"{ops.url}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        assert samples[("imgfleet_jobs_consumed_total", (("lane", "bulk"),))] == 3
        assert samples[("imgfleet_worker_ready", ())] == 0

        status, _, body = get(f"{ops.url}/readyz")
        assert status == 503 and json.loads(body)["conditions"] == {"model": False}
        health.set_ready("model", True)
        assert get(f"{ops.url}/readyz")[0] == 200
        assert "imgfleet_worker_ready 1.0" in get(f"{ops.url}/metrics")[2]

        assert get(f"{ops.url}/healthz")[0] == 200
        health.watch("embed").begin()
        clock.now_s += 31
        status, _, body = get(f"{ops.url}/healthz")
        assert status == 503 and json.loads(body)["checks"]["stage:embed"]["ok"] is False
        assert get(f"{ops.url}/nope")[0] == 404
    assert not port_file.exists()  # a stale port file would point at someone else


def test_a_taken_port_is_a_configuration_error() -> None:
    health = Health(stall_after_s=30)
    with OpsServer(Metrics(), health, host="127.0.0.1", port=0) as first:
        second = OpsServer(Metrics(), health, host="127.0.0.1", port=first.port)
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            second.start()
