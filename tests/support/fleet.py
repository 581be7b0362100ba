"""Worker fleets as subprocesses: the repository root they run in, and their environment.

``Fleet`` holds the paths of one local queue and store shared by ``imgfleet`` processes
started from the repository root; the RabbitMQ and Kafka fleets (``tests.support.rabbitmq``,
``tests.support.kafka``) add their broker's settings to its environment.

``reaped`` and ``kill_when`` make sure a spawned worker never outlives its test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from imgfleet.demo.corpus import Corpus

# tests/support/fleet.py -> tests/support -> tests -> the repository root
REPO_ROOT = Path(__file__).resolve().parents[2]


def broker_env(kind: str, url: str, prefix: str, **keys: str) -> dict[str, str]:
    """``IMGFLEET_BROKER__*`` for a ``kind`` broker at ``url`` with names under ``prefix``,
    plus ``keys`` of the section (``RETRY_MAX_S="0.4"``, ``KAFKA__GROUP_ID=...``)."""
    section = {"KIND": kind, "URL": url, "NAME_PREFIX": prefix, **keys}
    return {f"IMGFLEET_BROKER__{key}": value for key, value in section.items()}


def local_env(root: Path, **settings: str) -> dict[str, str]:
    """The environment of an `imgfleet` process on the local queue and store under
    ``root``, logging warnings only, its metrics on any free port; plus ``settings``."""
    return {
        **os.environ,
        "IMGFLEET_BROKER__LOCAL_PATH": str(root / "queue.sqlite3"),
        "IMGFLEET_STORAGE__ROOT": str(root / "store"),
        "IMGFLEET_LOGGING__LEVEL": "warning",
        "IMGFLEET_METRICS__PORT": "0",
        **settings,
    }


@dataclass
class Fleet:
    """Paths and environment for worker subprocesses sharing one local queue and store."""

    root: Path
    corpus: Corpus
    base_url: str
    catalogue: Path

    @property
    def queue_path(self) -> Path:
        return self.root / "queue.sqlite3"

    @property
    def store_root(self) -> Path:
        return self.root / "store"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "IMGFLEET_BROKER__LOCAL_PATH": str(self.queue_path),
                "IMGFLEET_STORAGE__ROOT": str(self.store_root),
                "IMGFLEET_BROKER__VISIBILITY_TIMEOUT_S": "3",
                "IMGFLEET_BROKER__POLL_INTERVAL_S": "0.05",
                "IMGFLEET_BROKER__RETRY_BASE_S": "0.1",
                "IMGFLEET_WORKER__DECODE_PROCESSES": "1",
                "IMGFLEET_WORKER__MAX_BATCH": "4",
                "IMGFLEET_WORKER__SEGMENT_MAX_RECORDS": "6",
                "IMGFLEET_WORKER__SEGMENT_FLUSH_INTERVAL_S": "0.5",
                "IMGFLEET_WORKER__EMBED_THREADS": "1",
                "IMGFLEET_WORKER__FETCH_ALLOW_NETWORKS": '["127.0.0.1/32"]',  # loopback server
                "IMGFLEET_LOGGING__FORMAT": "json",
                "IMGFLEET_METRICS__PORT": "0",  # workers run side by side: any free port
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def spawn(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "imgfleet", *args],
            cwd=REPO_ROOT,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a test can kill the worker with its decode pool
        )

    def run(self, *args: str, timeout_s: float = 300, **env: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "imgfleet", *args],
            cwd=REPO_ROOT,
            env=self.env(**env),
            capture_output=True,
            timeout=timeout_s,
        )
        out = proc.stdout.decode() + proc.stderr.decode()
        assert proc.returncode == 0, out[-4000:]
        return proc.stdout.decode()


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``proc`` for the block; still running after it, it is killed with its process group
    (its decode pool included: ``Fleet.spawn`` starts each worker in a session of its own)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], object], timeout_s: float, what: str
) -> None:
    """SIGKILL ``proc``'s process group once ``ready()`` holds (waited for as ``what``)."""
    with reaped(proc):
        wait_for(ready, timeout_s, what)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
