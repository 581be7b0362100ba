"""The rejects file: one JSON line per rejected row (line, reason, raw; item_id when the
row names a usable one)."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from producers.catalogue.reader import RejectedRow


class RejectsFile:
    """Rejected rows as JSONL (line, reason, raw); cut back to a checkpoint on resume."""

    def __init__(self, path: str | Path, *, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        self._fh = self.path.open("ab")
        if (
            truncate_to is not None and truncate_to <= self._fh.tell()
        ):  # Rows after the checkpoint are read again; their rejects must not repeat.
            self._fh.truncate(truncate_to)

    def write(self, row: RejectedRow) -> None:
        entry: dict[str, object] = {"line": row.line, "reason": row.reason, "raw": row.raw}
        if row.item_id is not None:
            entry["item_id"] = row.item_id
        self._fh.write(orjson.dumps(entry))
        self._fh.write(b"\n")

    def sync(self) -> int:
        """Flush to disk; return the file's length (what a checkpoint records)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()
