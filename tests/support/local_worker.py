"""The real worker on a test's local queue and store: its settings, and a run of it in a
fresh interpreter that reports how large its child processes grew.

``sections`` is the configuration the pipeline tests share (one decode process, short
retries, small batches, the loopback image server allowed), as the ``load_settings``
sections it takes; ``settings`` loads it.

``run_measured`` runs ``python -m tests.support.local_worker``: a worker until the queue is
idle, in a new interpreter, which then prints one JSON line, the run's stats and
``children_max_rss_kb``, the ru_maxrss of RUSAGE_CHILDREN. That figure is the largest peak
of any child the process waited for, and a spawned child's peak starts at its parent's
resident size (the kernel records the image that exec replaced). Read in the process that
runs pytest it is also whatever earlier tests spawned, from a process they grew (under
xdist, other test files'); read in the fresh interpreter it is only this run's decode
processes, spawned from a worker that has done nothing else.

Heavy imports stay inside the functions: the decode processes are spawned, and a spawned
child imports the parent's ``__main__`` module, this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.fleet import REPO_ROOT

if TYPE_CHECKING:
    from common.config import Settings


def queue_path(tmp_path: Path) -> Path:
    """The local queue of ``sections(tmp_path, ...)``."""
    return tmp_path / "q.sqlite3"


def sections(
    tmp_path: Path, *, broker: dict[str, Any], worker: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The pipeline tests' settings over ``tmp_path``; ``broker`` and ``worker`` add to them."""
    return {
        "broker": {
            "local_path": str(queue_path(tmp_path)),
            "retry_base_s": 0.05,
            "poll_interval_s": 0.02,
            **broker,
        },
        "storage": {"root": str(tmp_path / "store")},
        "worker": {
            "decode_processes": 1,
            "segment_flush_interval_s": 0.3,
            "max_batch": 8,
            "fetch_allow_networks": ["127.0.0.1/32"],  # the loopback image server
            **(worker or {}),
        },
        "index": {"n_shards": 2},
    }


def settings(
    tmp_path: Path, *, broker: dict[str, Any], worker: dict[str, Any] | None = None
) -> Settings:
    from common.config import load_settings

    return load_settings(**sections(tmp_path, broker=broker, worker=worker))


def run_measured(
    config: dict[str, dict[str, Any]], *, worker_id: str, timeout_s: float
) -> dict[str, Any]:
    """A worker until idle in a fresh interpreter: {"stats": ..., "children_max_rss_kb": n}."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.local_worker", json.dumps(config), worker_id],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _main(config_json: str, worker_id: str) -> None:
    import asyncio
    import resource

    from common.config import load_settings
    from imgfleet.factories import run_worker

    config = load_settings(**json.loads(config_json))
    stats = asyncio.run(run_worker(config, worker_id=worker_id, until_idle=True))
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    print(json.dumps({"stats": stats.as_dict(), "children_max_rss_kb": children_kb}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
