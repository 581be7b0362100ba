"""Fixtures that run the real pipeline: a generated corpus behind a loopback HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgfleet.demo.corpus import Corpus, make_corpus
from imgfleet.demo.image_server import ImageServer

REPO_ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    corpus = make_corpus(tmp_path / "corpus", 48, seed=7)
    with ImageServer(corpus.root) as server:
        catalogue = corpus.write_catalogue_jsonl(tmp_path / "catalogue.jsonl", server.base_url)
        yield Fleet(tmp_path, corpus, server.base_url, catalogue)
