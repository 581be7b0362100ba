"""Queue figures from passive declares: per-queue counts and per-lane stats.

AMQP gives no unacked count (that needs the management API), so ``in_flight`` is None.
Work queues count messages (one may carry many jobs); delay queues and the DLQ hold one
job per message.
"""

from __future__ import annotations

from aio_pika.abc import AbstractRobustChannel

from common.brokers.base import LaneStats
from common.brokers.rabbitmq.topology import LANES, Topology


async def queue_counts(
    channel: AbstractRobustChannel, topology: Topology
) -> dict[str, tuple[int, int]]:
    """Queue name -> (ready messages, consumers), for every queue of the topology."""
    counts: dict[str, tuple[int, int]] = {}
    for name, _ in topology.all_queues():
        # robust=False: a robust channel answers a repeated passive declare from its
        # cache, with the count of the first one.
        queue = await channel.declare_queue(name, passive=True, robust=False)
        result = queue.declaration_result
        counts[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
    return counts


async def lane_stats(channel: AbstractRobustChannel, topology: Topology) -> list[LaneStats]:
    """Ready messages and consumers per lane; retry sums the delay queues."""
    counts = await queue_counts(channel, topology)
    stats = []
    for lane in LANES:
        ready, consumers = counts[topology.work_queue(lane)]
        stats.append(LaneStats(lane, ready, consumers=consumers, unit="messages"))
    delay = [
        counts[topology.delay_queue(lane, ms)] for lane in LANES for ms in topology.delay_steps_ms
    ]
    stats.append(LaneStats("retry", sum(n for n, _ in delay), consumers=0, unit="jobs"))
    ready, consumers = counts[topology.dead_letter_queue]
    stats.append(LaneStats("dlq", ready, consumers=consumers, unit="jobs"))
    return stats
