"""A decode process exits as soon as the worker that spawned it is gone, however it went.

Nothing tells a spawned pool process that its parent was SIGKILLed: it waits on its call
queue, whose pipe it holds both ends of, so it never reads EOF; and multiprocessing's
resource tracker, which unlinks the pool's shared memory and semaphores once every
process holding its pipe has exited, waits on those orphans. After a ``kill -9`` they
were all still alive 8 minutes later (adversarial run, D9).

``ChildWatch.arm`` runs in each decode process (the pool's initializer) and sets two
guards:

- a watcher thread blocked on a pipe whose only write end stays in the parent: the kernel
  closes it when the parent dies, and the read returns EOF. Portable (any POSIX system).
- on Linux, the parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL), which also ends a
  process stuck in native code that holds the GIL (the watcher thread needs the GIL).
  The kernel sends it when the *thread* that spawned the process exits, not the process
  (prctl(2)), so it is armed only in processes spawned from the main thread, whose end
  is the process's end. The worker submits decodes from its event loop there; a pool used
  from another thread relies on the watcher alone.

A parent that died before the signal was armed never sends it: after arming, a parent
pid other than the recorded one means the parent is gone already, and the process exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# 128 + SIGHUP, the shell's "the other end hung up": distinct from a decoder's own failure
# (1), so whoever reads it (a test; nobody else, the parent is gone) can tell why.
ORPHANED_EXIT_CODE = 129


def _exit_orphaned() -> None:
    os._exit(ORPHANED_EXIT_CODE)


def _set_parent_death_signal() -> bool:
    """Ask the kernel for SIGKILL when the spawning thread exits; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _wait_for_eof(reader: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        reader.recv_bytes()  # the parent never writes: this returns only at EOF
    _exit_orphaned()


class ParentWatch:
    """Made in the parent (it keeps the write end); each process it spawns gets a
    ``ChildWatch`` in its place and arms it."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()
        self._reader, self._writer = Pipe(duplex=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled while a process is spawned, in the thread that spawns it: the read end
        # travels as a passed file descriptor (the write end never leaves the parent), and
        # whether the spawning thread is the main one decides the parent-death signal.
        spawned_by_main = threading.current_thread() is threading.main_thread()
        return (ChildWatch, (self._reader, self.parent_pid, spawned_by_main))

    def close(self) -> None:
        """Processes still running read EOF and exit."""
        self._writer.close()
        self._reader.close()


@dataclass(frozen=True)
class ChildWatch:
    reader: Connection
    parent_pid: int
    death_signal: bool  # spawned by the parent's main thread

    def arm(self) -> None:
        """Exit now if the parent is gone, and the moment it goes later."""
        if self.death_signal:
            _set_parent_death_signal()
        if os.getppid() != self.parent_pid:  # it died before the signal was armed
            _exit_orphaned()
        threading.Thread(
            target=_wait_for_eof, args=(self.reader,), name="parent-watch", daemon=True
        ).start()
