"""Which offset of one partition may be committed: the highest *contiguous* processed one.

Records of a partition are handed to the pipeline in offset order but finish in any order
(a slow image, a retry, a batch that flushes later). Committing the highest finished offset
would skip the unfinished ones below it after a crash, so the commit position only moves
past a record once it and every record before it are done.

Pure bookkeeping with no Kafka client in it, so it is unit-tested on its own; callers
serialise access (the adapter holds one lock around all partitions).
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets of one partition fetched by this consumer during one ownership (``epoch``)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self._order: deque[int] = deque()  # fetched, not yet passed by the commit position
        self._undone: set[int] = set()  # fetched and not processed yet
        self._done: set[int] = set()  # processed, but some offset below is not
        self._position: int | None = None  # next offset to commit (Kafka's convention)
        self._committed: int | None = None
        self._last_fetched: int | None = None

    def __repr__(self) -> str:
        return (
            f"PartitionOffsets(epoch={self.epoch}, open={len(self._order)}, "
            f"position={self._position}, committed={self._committed})"
        )

    def fetched(self, offset: int) -> None:
        """Record that ``offset`` was taken from the log (offsets only grow, gaps allowed)."""
        if self._last_fetched is not None and offset <= self._last_fetched:
            raise ValueError(f"offset {offset} fetched after {self._last_fetched}")
        self._order.append(offset)
        self._undone.add(offset)
        self._last_fetched = offset

    def done(self, offset: int) -> bool:
        """Mark ``offset`` processed; False if it is not open here (settled twice, or older)."""
        if offset not in self._undone:
            return False
        self._undone.remove(offset)
        self._done.add(offset)
        while self._order and self._order[0] in self._done:
            first = self._order.popleft()
            self._done.discard(first)
            self._position = first + 1
        return True

    def forget_from(self, offset: int) -> None:
        """Drop fetched offsets >= ``offset`` never handed out (revoke, purge); fetching
        must resume at ``offset``, so ``next_fetch_offset`` says so from now on.

        The resume point is kept even when nothing else is open: kafka-python 3 keeps a
        partition's fetch position across a rebalance that leaves it with us, and that
        position is past the dropped records, so without a seek back to them the next
        settled record would move the commit over them.
        """
        while self._order and self._order[-1] >= offset:
            dropped = self._order.pop()
            self._undone.discard(dropped)
            self._done.discard(dropped)
        if self._last_fetched is not None and self._last_fetched >= offset:
            self._last_fetched = offset - 1

    @property
    def open_count(self) -> int:
        """Fetched offsets the commit position has not passed yet."""
        return len(self._order)

    @property
    def next_fetch_offset(self) -> int | None:
        """Where fetching resumes if this ownership continues (None: nothing fetched)."""
        return None if self._last_fetched is None else self._last_fetched + 1

    def to_commit(self) -> int | None:
        """The position to commit now, or None when the last commit already covers it."""
        if self._position is None or self._position == self._committed:
            return None
        return self._position

    def committed(self, position: int) -> None:
        """Record a successful commit of ``position``."""
        if self._committed is None or position > self._committed:
            self._committed = position
