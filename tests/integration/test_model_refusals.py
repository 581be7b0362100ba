"""A worker whose pinned decode settings contradict its model refuses to start.

`imgfleet work` with ``worker.decode_size = 384`` (or another interpolation) in front of the
default model (224 px, bicubic) exits 2 with one line naming both values, before it takes
a job: the queued job is still pending afterwards, nothing dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.brokers.local.broker import LocalBroker
from common.schema import Job
from tests.support.fleet import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("key", "value", "wanted"),
    [("DECODE_SIZE", "384", "224"), ("DECODE_INTERPOLATION", "bilinear", "'bicubic'")],
)
def test_a_decode_pin_the_model_contradicts_refuses_to_start(
    tmp_path: Path, key: str, value: str, wanted: str
) -> None:
    queue = tmp_path / "queue.sqlite3"

    async def publish() -> None:
        broker = LocalBroker(queue)
        await broker.publish([Job(item_id="sku-1", url="http://127.0.0.1:9/a.jpg")])
        await broker.close()

    asyncio.run(publish())
    env = {
        **os.environ,
        "IMGFLEET_BROKER__LOCAL_PATH": str(queue),
        "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store"),
        "IMGFLEET_WORKER__DECODE_PROCESSES": "1",
        "IMGFLEET_METRICS__ENABLED": "false",
        f"IMGFLEET_WORKER__{key}": value,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "imgfleet", "work", "--until-idle", "--log-level", "error"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("imgfleet:")]
    setting = f"worker.{key.lower()}"
    assert setting in line and value in line and wanted in line, line
    assert "efficientnet-lite0-imagenet" in line

    async def outcome() -> tuple[int, int]:
        broker = LocalBroker(queue)
        pending, dead = await broker.pending(), len(await broker.dead_letters(100))
        await broker.close()
        return pending, dead

    assert asyncio.run(outcome()) == (1, 0)  # the job waits for a worker that fits
