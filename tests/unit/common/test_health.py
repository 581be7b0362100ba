"""Liveness (heartbeats, stall watches) and readiness (conditions, draining)."""

from __future__ import annotations

import asyncio
import threading
import time

from common.observability.health import Health
from tests.support.clock import FakeClock


def test_a_heartbeat_older_than_the_limit_fails_liveness() -> None:
    clock = FakeClock()
    health = Health(stall_after_s=10, clock=clock)
    beat = health.heartbeat("event_loop")
    clock.now_s += 9
    assert health.liveness()[0] is True
    clock.now_s += 2
    live, details = health.liveness()
    assert live is False
    assert details["checks"]["heartbeat:event_loop"] == {"ok": False, "age_s": 11.0}
    beat.beat()
    assert health.liveness()[0] is True
    health.forget_heartbeat("event_loop")  # its owner ended on purpose
    clock.now_s += 100
    assert health.liveness()[0] is True


def test_a_stage_stalls_only_while_it_has_work() -> None:
    clock = FakeClock()
    health = Health(stall_after_s=10, clock=clock)
    embed = health.watch("embed")
    clock.now_s += 500  # idle for long: not a stall
    assert health.liveness()[0] is True
    embed.begin()
    clock.now_s += 5
    embed.begin()  # more work arriving does not restart the clock
    clock.now_s += 6
    live, details = health.liveness()
    assert live is False and details["checks"]["stage:embed"]["busy_s"] == 11.0
    embed.done()
    assert health.liveness()[0] is True
    assert health.watch("embed").completed == 1  # the same watch by name


def test_readiness_needs_every_condition_and_no_drain() -> None:
    health = Health(stall_after_s=10)
    seen: list[bool] = []
    health.on_readiness_change(seen.append)
    assert health.ready is False  # no conditions yet: not ready
    health.set_ready("model", True)
    health.set_ready("broker", False)
    assert health.readiness() == (
        False,
        {"ready": False, "conditions": {"model": True, "broker": False}, "draining": False},
    )
    health.set_ready("broker", True)
    assert health.ready is True
    health.set_ready("broker", False)  # a lost connection
    health.set_ready("broker", True)  # ...and the reconnect
    health.set_draining()
    assert health.ready is False
    assert seen == [False, True, False, True, False, True, False]


def test_a_blocked_event_loop_fails_liveness_seen_from_another_thread() -> None:
    health = Health(stall_after_s=0.5)
    started = threading.Event()
    verdicts: list[bool] = []

    async def main() -> None:
        beating = asyncio.create_task(health.beat_event_loop(0.05))
        await asyncio.sleep(0.2)
        started.set()
        time.sleep(2.0)  # noqa: ASYNC251 - synchronous work: the loop cannot beat
        await asyncio.sleep(0.2)
        verdicts.append(health.liveness()[0])  # beating again
        beating.cancel()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    started.wait(5)
    assert health.liveness()[0] is True
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline and health.liveness()[0]:
        time.sleep(0.05)
    verdicts.append(health.liveness()[0])  # while the loop is still blocked
    thread.join(10)
    assert verdicts == [False, True]
    assert health.liveness()[1]["checks"] == {}  # the heartbeat is dropped with its task
