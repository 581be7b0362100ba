"""``kill -9`` of a worker takes its decode processes with it and leaves no shared memory.

The worker alone is SIGKILLed, as the OOM killer or ``kill -9 <pid>`` does (not its
process group): its spawned decode processes and multiprocessing's resource tracker must
follow within seconds, and the pool's shared-memory block and semaphores must be unlinked,
so a host that restarts crashed workers does not pile up orphans and /dev/shm files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)"),
]

_DECODE_PROCESSES = 2
# Loose on purpose: the decode processes die on the parent-death signal at once; the
# tracker then sees EOF and unlinks. A loaded CI machine may still take a few seconds.
_GONE_WITHIN_S = 10.0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of ``pid``, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself hold spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time (pids are reused)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            started[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = started[pid]
        todo.extend(children.get(pid, []))
    return found


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    # A zombie has exited; only its reaper (init here) has not collected it yet.
    return stat is not None and stat[2] == started and stat[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _shm_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm files ``pid`` maps: the pool's slot block, and the queues'
    semaphores (which the maps name by a temporary name, hence inodes, not names)."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
            inodes.add(int(fields[4]))
    return inodes


def _shm_files(inodes: set[int]) -> dict[Path, int]:
    """The /dev/shm entries that are one of ``inodes``: path -> inode."""
    found = {}
    for path in Path("/dev/shm").iterdir():
        with contextlib.suppress(FileNotFoundError):  # unlinked while we looked
            inode = path.stat().st_ino
            if inode in inodes:
                found[path] = inode
    return found


def _left(files: dict[Path, int]) -> list[Path]:
    """Those of ``files`` still in /dev/shm (the same file: tmpfs may reuse a name)."""
    left = []
    for path, inode in files.items():
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                left.append(path)
    return left


def _collect_log(proc: subprocess.Popen[bytes]) -> list[str]:
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_kill9_of_a_worker_leaves_no_process_and_no_shared_memory(fleet: Fleet) -> None:
    worker = fleet.spawn(
        "work",
        "--worker-id",
        "orphan-check",
        IMGFLEET_WORKER__DECODE_PROCESSES=str(_DECODE_PROCESSES),
    )
    log = _collect_log(worker)
    family: dict[int, int] = {}
    files: dict[Path, int] = {}
    try:
        # "worker started" comes after the pool's warm-up: every decode process is up.
        wait_for(
            lambda: worker.poll() is not None or any("worker started" in ln for ln in log),
            120,
            "the worker to start",
        )
        assert worker.poll() is None, "".join(log)[-3000:]
        family = _descendants(worker.pid)
        decoders = [pid for pid in family if "spawn_main" in _cmdline(pid)]
        trackers = [pid for pid in family if "resource_tracker" in _cmdline(pid)]
        assert len(decoders) == _DECODE_PROCESSES, {p: _cmdline(p) for p in family}
        assert len(trackers) == 1, {p: _cmdline(p) for p in family}
        files = _shm_files(set().union(*(_shm_inodes(pid) for pid in [worker.pid, *decoders])))
        assert any(path.name.startswith("psm_") for path in files), files  # the slot block

        os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as `kill -9 <pid>` does
        worker.wait(10)
        try:
            wait_for(
                lambda: not any(_alive(pid, t) for pid, t in family.items()),
                _GONE_WITHIN_S,
                "the worker's decode processes and resource tracker to exit",
            )
        except AssertionError:
            survivors = [_cmdline(pid) for pid, t in family.items() if _alive(pid, t)]
            raise AssertionError(f"still alive after the worker's SIGKILL: {survivors}") from None
        # The tracker unlinks what it tracked as it exits; a restarted worker finds nothing.
        wait_for(
            lambda: not _left(files),
            _GONE_WITHIN_S,
            f"{sorted(path.name for path in files)} to be unlinked from /dev/shm",
        )
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        # Orphans of a failing run must not outlive the test (by pid and start time), nor
        # what they would leak.
        for pid, started in family.items():
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for path in _left(files):
            path.unlink(missing_ok=True)
