"""Liveness and readiness of one process (exit codes: ``common.errors.ExitCode``).

Liveness (``/healthz``) asks "is this process stuck?" and fails, so the orchestrator
restarts it, when

- a heartbeat has not beaten for ``stall_after_s`` (the event loop's heartbeat is beaten
  by a task on the loop, so a loop blocked by synchronous work stops it), or
- a stage watch has had work for ``stall_after_s`` without completing it (the embed stage:
  a batch taken and not embedded and written, e.g. a hung GPU call).

An idle process is live: a watch without work never stalls.

Readiness (``/readyz``) asks "can this process do its work now?": every condition set
with ``set_ready`` is true (for a worker: the model is loaded and the broker connected)
and the process is not draining. It reflects reconnects both ways.

Both are read from the ops HTTP server's own thread, never from the event loop, so a
stuck loop still gets an answer (a failing one).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any


class Heartbeat:
    """A timestamp something beats while it is making progress."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.last_s = clock()

    def beat(self) -> None:
        self.last_s = self._clock()  # a float store: safe to read from another thread

    def age_s(self) -> float:
        return self._clock() - self.last_s


class StallWatch:
    """A stage that has work must complete some of it now and then.

    ``begin()`` when the stage takes work, ``done()`` when that work is finished; the watch
    is stalled once work has been in progress for longer than the limit.
    """

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._busy_since_s: float | None = None
        self.completed = 0

    def begin(self) -> None:
        if self._busy_since_s is None:
            self._busy_since_s = self._clock()

    def done(self) -> None:
        self._busy_since_s = None
        self.completed += 1

    def busy_for_s(self) -> float:
        since = self._busy_since_s
        return 0.0 if since is None else self._clock() - since


class Health:
    """Heartbeats, stall watches and readiness conditions of one process."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._heartbeats: dict[str, Heartbeat] = {}
        self._watches: dict[str, StallWatch] = {}
        self._conditions: dict[str, bool] = {}
        self._draining = False
        self._listeners: list[Callable[[bool], None]] = []

    # -- liveness ---------------------------------------------------------------------

    def heartbeat(self, name: str) -> Heartbeat:
        with self._lock:
            beat = self._heartbeats.get(name)
            if beat is None:
                beat = self._heartbeats[name] = Heartbeat(name, self._clock)
            return beat

    def forget_heartbeat(self, name: str) -> None:
        """Stop checking ``name`` (its owner ended on purpose)."""
        with self._lock:
            self._heartbeats.pop(name, None)

    def watch(self, name: str) -> StallWatch:
        with self._lock:
            watch = self._watches.get(name)
            if watch is None:
                watch = self._watches[name] = StallWatch(name, self._clock)
            return watch

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(live, details): details name each heartbeat's age and each watch's busy time."""
        with self._lock:
            beats = list(self._heartbeats.values())
            watches = list(self._watches.values())
        checks: dict[str, Any] = {}
        live = True
        for beat in beats:
            age_s = beat.age_s()
            ok = age_s <= self.stall_after_s
            live &= ok
            checks[f"heartbeat:{beat.name}"] = {"ok": ok, "age_s": round(age_s, 3)}
        for watch in watches:
            busy_s = watch.busy_for_s()
            ok = busy_s <= self.stall_after_s
            live &= ok
            checks[f"stage:{watch.name}"] = {
                "ok": ok,
                "busy_s": round(busy_s, 3),
                "completed": watch.completed,
            }
        return live, {"live": live, "stall_after_s": self.stall_after_s, "checks": checks}

    # -- readiness --------------------------------------------------------------------

    def set_ready(self, condition: str, ok: bool) -> None:
        with self._lock:
            self._conditions[condition] = ok
        self._notify()

    def set_draining(self) -> None:
        with self._lock:
            self._draining = True
        self._notify()

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready_locked()

    def _ready_locked(self) -> bool:
        return bool(self._conditions) and all(self._conditions.values()) and not self._draining

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            ready = self._ready_locked()
            return ready, {
                "ready": ready,
                "conditions": dict(self._conditions),
                "draining": self._draining,
            }

    def on_readiness_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(ready)`` now and after every change (a gauge follows it)."""
        self._listeners.append(listener)
        listener(self.ready)

    def _notify(self) -> None:
        ready = self.ready
        for listener in self._listeners:
            listener(ready)

    # -- the event loop's heartbeat ------------------------------------------------------

    async def beat_event_loop(
        self,
        interval_s: float | None = None,
        *,
        on_lag: Callable[[float], None] | None = None,
        name: str = "event_loop",
    ) -> None:
        """Beat ``name`` every ``interval_s`` from the running loop, until cancelled.

        A loop blocked by synchronous work cannot run this task, so the heartbeat ages
        and liveness fails; ``on_lag`` gets how late each beat ran. By default it beats
        every second, or four times within ``stall_after_s`` where that is shorter.
        """
        if interval_s is None:
            interval_s = min(1.0, self.stall_after_s / 4)
        beat = self.heartbeat(name)
        try:
            while True:
                expected_s = self._clock() + interval_s
                await asyncio.sleep(interval_s)
                beat.beat()
                if on_lag is not None:
                    on_lag(max(self._clock() - expected_s, 0.0))
        finally:
            self.forget_heartbeat(name)
