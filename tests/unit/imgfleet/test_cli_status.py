"""`imgfleet status` during a broker outage: the run figures (from storage) still show, the
queue part is one "unreachable" line, and the answer comes in seconds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.storage.local import LocalStorage
from index.runs import RunInfo, write_run
from index.segments import SegmentWriter, VectorRecord
from tests.support.fleet import REPO_ROOT
from tests.unit.imgfleet.test_cli_usage import clean_env


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_status_during_an_outage_shows_the_runs_and_one_unreachable_line(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "store")
    write_run(storage, RunInfo("night-1", "c.jsonl", 3, time.time() - 60))
    writer = SegmentWriter(storage, 2, "w-test")
    for n in range(2):
        vector = np.ones(4, dtype=np.float32)
        writer.add(VectorRecord(n + 1, f"sku-{n}", 1, "h", "m", vector, run_id="night-1"))
    writer.flush()
    env = {
        **clean_env(tmp_path),
        "IMGFLEET_BROKER__KIND": "rabbitmq",
        "IMGFLEET_BROKER__URL": f"amqp://ops:s3cret-pw@127.0.0.1:{_closed_port()}/",
        # A worker's patience; a read-only command gives up long before it.
        "IMGFLEET_BROKER__RABBITMQ__CONNECT_TIMEOUT_S": "30",
    }

    def status(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "imgfleet", "status", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc, time.monotonic() - started

    proc, took_s = status("--json")
    assert proc.returncode == 1, proc.stderr
    assert took_s < 20  # was the full connect timeout (30 s here, 10.6 s by default)
    snapshot = json.loads(proc.stdout.strip().splitlines()[-1])
    assert snapshot["broker"]["reachable"] is False and snapshot["dead_letters"] is None
    (run,) = snapshot["runs"]
    assert (run["run_id"], run["expected"], run["indexed"]) == ("night-1", 3, 2)
    assert run["failed"] is None and run["remaining"] is None  # unknown, not a wrong 0

    proc, _ = status()
    assert proc.returncode == 1
    assert "night-1" in proc.stdout and "broker is unreachable" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgfleet: broker unreachable"), proc.stderr
    assert "127.0.0.1" in lines[0] and "s3cret-pw" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_run_still_publishing_is_never_done_and_says_how_to_continue(tmp_path: Path) -> None:
    # A truncated .jsonl.gz stops the producer with the run in state publishing; every job
    # it did publish is indexed, and status used to call that run "done".
    storage = LocalStorage(tmp_path / "store")
    write_run(storage, RunInfo("night-2", "c.jsonl.gz", 2, time.time() - 60, state="publishing"))
    writer = SegmentWriter(storage, 2, "w-test")
    for n in range(2):
        vector = np.ones(4, dtype=np.float32)
        writer.add(VectorRecord(n + 1, f"sku-{n}", 1, "h", "m", vector, run_id="night-2"))
    writer.flush()
    proc = subprocess.run(
        [sys.executable, "-m", "imgfleet", "status"],
        cwd=REPO_ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    (row,) = [line for line in proc.stdout.splitlines() if "night-2" in line]
    assert "publishing" in row and "2+" in row, proc.stdout + proc.stderr
    assert not row.rstrip().endswith("done"), row
    assert "--resume RUN" in proc.stdout
