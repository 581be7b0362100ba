"""Atomic file writes: a reader sees the old file or the new one, never part of one.

The bytes go to a temp file in the target's own directory (same filesystem, so the rename
is atomic), the temp file is fsync'd, ``os.replace``d over the target, and then the
directory is fsync'd: the rename is only durable once the directory entry is on disk.
Without the fsyncs a power cut (not a process crash) can leave the *new name* pointing at
a file whose data never reached the disk, i.e. an empty or short file that every later
reader trusts.

What the fsyncs cost, measured on the dev VM's ext4 (median of 5): a 16-byte file 0.6 to
8 ms instead of 0.03 ms, a 1 MiB file 1.4 to 8 ms instead of 0.5 ms, a 256 MiB file
1.07 to 1.09 s instead of 0.87 to 0.99 s. Callers for whom a file is worthless after a
crash anyway (a port file) pass ``fsync=False``.

Temp files are named ``.tmp-*`` with ``mkstemp``'s mode 0600; a crash between the write
and the rename leaves one behind, which ``common.storage.local`` hides from listings.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def write_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Replace the file at ``path`` (creating its directory) with ``data``, all or nothing."""
    # The file is closed before ``replacing`` fsyncs and renames it.
    with replacing(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """A temp path beside ``path`` to fill; on a clean exit it atomically becomes ``path``.

    For writers that produce the file themselves (a streamed download). If the block
    raises, the temp file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(target.parent)


def _fsync(path: Path) -> None:
    # A read-only descriptor is enough: fsync flushes the file (or directory), not the fd.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
