"""The group consumer: a poll thread that never stops polling, bridged to asyncio.

kafka-python blocks, and a consumer that stops calling ``poll`` for ``max_poll_interval_ms``
is thrown out of its group. So one thread owns the ``KafkaConsumer`` and polls all the
time; back-pressure is ``pause``/``resume`` of partitions, never a pause in polling:

- records go into per-kind buffers (live, retry, bulk) that ``take`` serves in that order;
- a kind's partitions are paused while its window (buffered + handed out and unsettled)
  is full, so a slow pipeline holds at most ``prefetch`` bulk/retry records and
  ``live_prefetch`` live ones, and live records are still fetched behind a full bulk window;
- a retry partition whose head record is not due yet is rewound to it and paused until then.

Commits: every fetched offset is tracked per partition (``PartitionOffsets``); ``settle``
marks it done once the pipeline's outcome is durable, and the poll thread commits the
highest contiguous done offset. A partition is owned in *epochs*: a delivery settled after
its partition was revoked (and given to another consumer) belongs to an old epoch and is
never committed by us.

Rebalance (eager): on revoke, records not yet handed out are dropped, in-flight ones get a
short bounded wait, what is done is committed, and the partition state is parked; if the
next assignment gives the partition back, the parked state continues where it left off
and the partition is sought back to its first record not handed out (kafka-python 3 keeps
a kept partition's fetch position, which is past the dropped records: left there, the next
settled record would commit over them), otherwise it is discarded.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from common.brokers.base import Delivery
from common.brokers.kafka.offsets import PartitionOffsets
from common.brokers.kafka.topics import H_DUE_MS, SERVE_ORDER, KafkaTopics, TopicKind, header_int
from common.observability.logging import get_logger

log = get_logger("kafka.consumer")

_POLL_TIMEOUT_MS = 50
_LIVE_WINDOW = "live"
_MAIN_WINDOW = "main"


def _window_of(kind: TopicKind) -> str:
    return _LIVE_WINDOW if kind is TopicKind.LIVE else _MAIN_WINDOW


@dataclass(frozen=True)
class _Fetched:
    tp: TopicPartition
    offset: int
    epoch: int
    value: bytes


@dataclass(frozen=True)
class _Out:
    """A delivery handed to the pipeline and not settled yet."""

    kind: TopicKind
    tp: TopicPartition
    offset: int
    epoch: int


def delivery_id(tp: TopicPartition, offset: int) -> str:
    return f"{tp.topic}:{tp.partition}:{offset}"


class ConsumerLoop:
    def __init__(
        self,
        make_consumer: Callable[[], KafkaConsumer],
        topics: KafkaTopics,
        *,
        prefetch: int,
        live_prefetch: int,
        revoke_wait_s: float,
        on_records: Callable[[], None],
    ) -> None:
        self._make_consumer = make_consumer
        self._topics = topics
        # Retry and bulk records share the main window; live has its own.
        self._windows = {_LIVE_WINDOW: live_prefetch, _MAIN_WINDOW: prefetch}
        self._revoke_wait_s = revoke_wait_s
        self._on_records = on_records
        self._lock = threading.Lock()
        self._owned: dict[TopicPartition, PartitionOffsets] = {}
        self._parked: dict[TopicPartition, PartitionOffsets] = {}  # revoked, maybe back
        self._buffers: dict[TopicKind, deque[_Fetched]] = {k: deque() for k in SERVE_ORDER}
        self._out: dict[str, _Out] = {}
        self._held: Counter[TopicKind] = Counter()  # buffered + out, per kind
        self._out_count: Counter[str] = Counter()  # out, per window
        self._due_ms: dict[TopicPartition, int] = {}  # retry partitions paused until then
        self._epochs = 0
        self._active = False
        self._stopping = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- lifecycle (any thread) ---------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kafka-poll", daemon=True)
        self._thread.start()
        self._ready.wait(timeout_s)
        if self._failure is not None:
            raise self._failure

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit what is done, leave the group, end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def failure(self) -> BaseException | None:
        """Why the poll thread died (None while it runs or after a clean stop)."""
        return self._failure

    @property
    def assigned_partitions(self) -> int:
        """Partitions this consumer owns now (0 before the first assignment)."""
        with self._lock:
            return len(self._owned)

    def set_active(self, active: bool) -> None:
        """Fetch only while someone consumes; an idle consumer keeps polling, paused."""
        self._active = active

    # -- the asyncio side ---------------------------------------------------------------

    def take(self) -> Delivery | None:
        """The next record to process, live before retry before bulk (None: none buffered)."""
        with self._lock:
            for kind in SERVE_ORDER:
                buffer = self._buffers[kind]
                window = _window_of(kind)
                # A poll may fetch past a window; the surplus waits here, not in flight.
                if buffer and self._out_count[window] < self._windows[window]:
                    rec = buffer.popleft()
                    self._out_count[window] += 1
                    did = delivery_id(rec.tp, rec.offset)
                    self._out[did] = _Out(kind, rec.tp, rec.offset, rec.epoch)
                    return Delivery(body=rec.value, delivery_id=did, token=str(rec.epoch))
        return None

    def is_current(self, delivery: Delivery) -> bool:
        """Whether this consumer still owns the delivery's partition in the same epoch."""
        with self._lock:
            out = self._out.get(delivery.delivery_id)
            return out is not None and self._state(out.tp, out.epoch) is not None

    def settle(self, deliveries: Iterable[Delivery], *, done: bool) -> int:
        """Free the deliveries' window slots; ``done`` marks their offsets committable.

        Returns how many were current (owned in their epoch and not settled before).
        """
        current = 0
        with self._lock:
            for delivery in deliveries:
                out = self._out.pop(delivery.delivery_id, None)
                if out is None:
                    continue  # settled before, or never ours
                self._held[out.kind] -= 1
                self._out_count[_window_of(out.kind)] -= 1
                state = self._state(out.tp, out.epoch)
                if state is None:
                    continue  # revoked meanwhile: the new owner redoes it; never commit it
                current += 1
                if done:
                    state.done(out.offset)
        return current

    def unsettled(self) -> int:
        with self._lock:
            return len(self._out)

    def _state(self, tp: TopicPartition, epoch: int) -> PartitionOffsets | None:
        state = self._owned.get(tp) or self._parked.get(tp)
        return state if state is not None and state.epoch == epoch else None

    # -- the poll thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            consumer = self._make_consumer()
            consumer.subscribe(list(self._topics.consumed), listener=_Listener(self, consumer))
            self._consumer = consumer
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._poll_forever(consumer)
        except BaseException as exc:
            log.error("kafka poll thread failed", error=f"{type(exc).__name__}: {exc}")
            self._failure = exc
            self._on_records()  # wake the consumer side so it sees the failure
        finally:
            self._active = False
            try:
                self._commit_done(consumer)
            except KafkaError as exc:
                log.warning("final commit failed", error=str(exc))
            try:
                consumer.close(autocommit=False)
            except Exception as exc:  # closing must not mask why we stopped
                log.warning("consumer close failed", error=str(exc))

    def _poll_forever(self, consumer: KafkaConsumer) -> None:
        while not self._stopping.is_set():
            try:
                self._commit_done(consumer)
                max_records = self._apply_pauses(consumer)
                _unpark_resumed_fetches(consumer)
                records = consumer.poll(timeout_ms=_POLL_TIMEOUT_MS, max_records=max_records)
                if records:
                    self._accept(consumer, records)
            except KafkaError as exc:
                # A broker hiccup or a failed rebalance step: the client reconnects and
                # rejoins by itself on the next poll; nothing settled is lost meanwhile.
                log.warning("kafka poll failed; retrying", error=str(exc))
                time.sleep(0.5)

    def _commit_done(self, consumer: KafkaConsumer) -> None:
        with self._lock:
            offsets = {
                tp: (state, position)
                for tp, state in self._owned.items()
                if (position := state.to_commit()) is not None
            }
        if not offsets:
            return
        consumer.commit({tp: OffsetAndMetadata(pos, "", -1) for tp, (_, pos) in offsets.items()})
        with self._lock:
            for state, position in offsets.values():
                state.committed(position)

    def _apply_pauses(self, consumer: KafkaConsumer) -> int:
        """Pause what must not be fetched now; return how many records one poll may take."""
        assigned = consumer.assignment()
        now_ms = int(time.time() * 1000)
        for tp in list(self._due_ms):
            if tp not in assigned or self._due_ms[tp] <= now_ms:
                del self._due_ms[tp]
        with self._lock:
            held = {
                _LIVE_WINDOW: self._held[TopicKind.LIVE],
                _MAIN_WINDOW: self._held[TopicKind.RETRY] + self._held[TopicKind.BULK],
            }
        room = {window: size - held[window] for window, size in self._windows.items()}
        fetching = [w for w, free in room.items() if free > 0] if self._active else []
        want_paused = {
            tp
            for tp in assigned
            if tp in self._due_ms or _window_of(self._topics.kind(tp.topic)) not in fetching
        }
        paused = consumer.paused()
        if want_paused - paused:
            consumer.pause(*(want_paused - paused))
        if (paused & assigned) - want_paused:
            consumer.resume(*((paused & assigned) - want_paused))
        # The largest room keeps polls big (each poll is a round trip to kafka-python's IO
        # thread); what overshoots the smaller window stays buffered until it has room.
        return max((room[window] for window in fetching), default=1)

    def _accept(self, consumer: KafkaConsumer, records: dict[TopicPartition, list[Any]]) -> None:
        now_ms = int(time.time() * 1000)
        added = 0
        for tp, recs in records.items():
            kind = self._topics.kind(tp.topic)
            for rec in recs:
                if kind is TopicKind.RETRY:
                    due_ms = header_int(rec.headers, H_DUE_MS) or 0
                    if due_ms > now_ms:
                        # Not due: rewind to it and leave the partition paused until then
                        # (records behind it in this tier are due about as late).
                        consumer.seek(tp, rec.offset)
                        consumer.pause(tp)
                        self._due_ms[tp] = due_ms
                        break
                with self._lock:
                    state = self._owned.get(tp)
                    if state is not None:
                        state.fetched(rec.offset)
                        fetched = _Fetched(tp, rec.offset, state.epoch, rec.value)
                        self._buffers[kind].append(fetched)
                        self._held[kind] += 1
                if state is None:
                    # Not ours in this epoch. kafka-python has moved its position past these
                    # records; put it back, so that should the partition be ours again
                    # without a fresh position, they are fetched again rather than skipped.
                    if tp in consumer.assignment():
                        consumer.seek(tp, rec.offset)
                    break
                added += 1
        if added:
            self._on_records()

    # -- rebalance (called on kafka-python's IO thread) --------------------------------

    def _drop_buffered(self, tps: set[TopicPartition]) -> None:
        """Forget fetched records of ``tps`` not handed out yet (under the lock)."""
        for kind, buffer in self._buffers.items():
            kept: deque[_Fetched] = deque()
            for rec in buffer:
                if rec.tp in tps:
                    # Owned or parked: either way fetching must resume at this record.
                    state = self._state(rec.tp, rec.epoch)
                    if state is not None:
                        state.forget_from(rec.offset)
                    self._held[kind] -= 1
                else:
                    kept.append(rec)
            self._buffers[kind] = kept

    def _out_for(self, tps: set[TopicPartition]) -> int:
        with self._lock:
            return sum(1 for out in self._out.values() if out.tp in tps)

    def _to_commit(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        with self._lock:
            return {
                tp: position
                for tp in tps
                if (state := self._owned.get(tp)) is not None
                and (position := state.to_commit()) is not None
            }

    def _park(self, tps: set[TopicPartition], committed: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp in tps:
                state = self._owned.pop(tp, None)
                if state is None:
                    continue
                if tp in committed:
                    state.committed(committed[tp])
                self._parked[tp] = state

    def _lose(self, tps: set[TopicPartition]) -> None:
        with self._lock:
            self._drop_buffered(tps)
            for tp in tps:
                self._owned.pop(tp, None)
                self._parked.pop(tp, None)

    def _assign(self, consumer: KafkaConsumer, tps: set[TopicPartition]) -> None:
        resumed = []
        with self._lock:
            for tp in tps:
                state = self._parked.pop(tp, None)
                if state is not None:
                    self._owned[tp] = state
                    resumed.append((tp, state.next_fetch_offset))
                elif tp not in self._owned:
                    self._epochs += 1
                    self._owned[tp] = PartitionOffsets(self._epochs)
            # Parked partitions that went elsewhere: their in-flight work is the new
            # owner's now, and settling it later must not commit anything.
            self._parked.clear()
        for tp, offset in resumed:
            if offset is not None:
                # Continue at the first record not handed out: kafka-python kept its own
                # position for this partition, past the records dropped at the revoke.
                consumer.seek(tp, offset)
        log.info("partitions assigned", partitions=len(tps), kept=len(resumed))


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO loop: it must await, never block (heartbeats run there)."""

    def __init__(self, loop: ConsumerLoop, consumer: KafkaConsumer) -> None:
        self._loop = loop
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        loop = self._loop
        tps = set(revoked)
        with loop._lock:
            loop._drop_buffered(tps)
        # Give in-flight work a short, bounded chance to become durable so its offsets go
        # with the partition; what is still running after that is redone by the new owner.
        deadline_s = time.monotonic() + loop._revoke_wait_s
        while (
            not loop._stopping.is_set()
            and loop._out_for(tps)
            and time.monotonic() < deadline_s
            and await _sleep(self._consumer, 0.05)
        ):
            pass
        offsets = loop._to_commit(tps)
        committed: dict[TopicPartition, int] = {}
        if offsets:
            try:
                await self._consumer.commit_async(
                    {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in offsets.items()}
                )
                committed = offsets
            except KafkaError as exc:
                log.warning("commit on revoke failed", error=str(exc))
        loop._park(tps, committed)
        log.info(
            "partitions revoked",
            partitions=len(tps),
            committed=len(committed),
            still_in_flight=loop._out_for(tps),
        )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._loop._assign(self._consumer, set(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        # Thrown out of the group: the partitions may already be someone else's, so
        # nothing is committed and nothing in flight will be.
        log.warning("partitions lost", partitions=len(lost))
        self._loop._lose(set(lost))


async def _sleep(consumer: KafkaConsumer, delay_s: float) -> bool:
    """Sleep on kafka-python's own IO loop (the listener runs there; heartbeats go on).

    kafka-python 3.0 has no public sleep for listeners; without its IO loop's sleep there
    is no wait (False) and what is done is committed at once.
    """
    net = getattr(consumer, "_net", None)
    sleep = getattr(net, "sleep", None)
    if sleep is None:
        return False
    await sleep(delay_s)
    return True


def _unpark_resumed_fetches(consumer: KafkaConsumer) -> None:
    """Work around a kafka-python 3.0.12 fetcher bug that stalls resumed partitions.

    Data fetched for a partition that is then paused gets parked, and it is handed back
    only when the fetcher's in-line slot ``is None``; a drained slot is left falsy but not
    None, so parked data is never restored, and a partition with parked data is never
    fetched again: after enough pause/resume cycles consumption stops. Clearing the drained
    slot lets the fetcher restore the parked data as designed. A no-op if the internals
    differ (another kafka-python version).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current:
        fetcher._next_partition_records = None  # type: ignore[union-attr]
