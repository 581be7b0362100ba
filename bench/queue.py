"""Queue throughput: imgfleet's broker adapters against the naive pattern, same broker, same run.

RabbitMQ (the server on 127.0.0.1:5672, fresh queues per run, deleted afterwards):

- publish: ``RabbitMQBroker.publish`` in calls of 500 jobs (what ``imgfleet produce`` does):
  a window of unconfirmed messages in flight and 100 jobs per message, every message
  confirmed. Also the same window with one job per message, to separate the two effects.
  Naive: ``await exchange.publish(...)`` one job at a time, each confirm awaited before the
  next send.
- consume+ack: the adapter's ``consume`` with ``ack`` per 100 jobs (about one segment
  flush), prefetch sized in jobs. Naive: prefetch 1, one message per job, ack each.

Kafka (``--transport kafka`` or ``all``): ``bench/queue_kafka.py`` against a Tansu broker it
starts itself.

    python bench/queue.py [--quick] [--json] [--transport rabbitmq|kafka|all]

The last line with --json is one JSON object; ``ratio`` is the smaller of the RabbitMQ
publish and consume ratios (project ÷ naive); the Kafka figures carry a ``kafka_`` prefix.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run with bench/ first on sys.path, and bench/queue.py is named like the standard
# library's queue module: swap bench/ for the repository root before anything imports it.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH_DIR.parent)] + [
    p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR
]

import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from typing import Any  # noqa: E402

from bench.support.harness import bench_parser, machine_summary, report  # noqa: E402
from bench.support.rabbitmq import RABBITMQ_URL, fresh_topology, naive_queue  # noqa: E402
from common.brokers.rabbitmq.broker import RabbitMQBroker  # noqa: E402
from common.config import load_settings  # noqa: E402
from common.schema import Job  # noqa: E402

PUBLISH_CALL_JOBS = 500


def _jobs(n: int, tag: str) -> list[Job]:
    return [
        Job(item_id=f"{tag}-{i}", url=f"https://cdn.example/{tag}/{i}.jpg", run_id=tag)
        for i in range(n)
    ]


@asynccontextmanager
async def _project_broker(jobs_per_message: int, prefetch: int = 512) -> AsyncIterator[Any]:
    """The adapter on fresh queues of its own, connected; deleted afterwards."""
    settings = load_settings(
        broker={
            "kind": "rabbitmq",
            "url": RABBITMQ_URL,
            "name_prefix": f"bench-{uuid.uuid4().hex[:8]}",
            "rabbitmq": {"jobs_per_message": jobs_per_message},
        }
    )
    async with fresh_topology(RabbitMQBroker(settings.broker, prefetch=prefetch)) as broker:
        yield broker


async def _publish_all(broker: RabbitMQBroker, jobs: list[Job]) -> None:
    """``jobs`` in calls of PUBLISH_CALL_JOBS, as ``imgfleet produce`` publishes."""
    for i in range(0, len(jobs), PUBLISH_CALL_JOBS):
        await broker.publish(jobs[i : i + PUBLISH_CALL_JOBS])


async def _project_publish(jobs: list[Job], jobs_per_message: int) -> float:
    async with _project_broker(jobs_per_message) as broker:
        start = time.perf_counter()
        await _publish_all(broker, jobs)
        elapsed = time.perf_counter() - start
    return len(jobs) / elapsed


async def _naive_publish(jobs: list[Job]) -> float:
    async with naive_queue() as naive:
        start = time.perf_counter()
        for job in jobs:
            await naive.publish(job.to_bytes())
        elapsed = time.perf_counter() - start
    return len(jobs) / elapsed


async def _project_consume(jobs: list[Job]) -> float:
    async with _project_broker(100, prefetch=512) as broker:
        await _publish_all(broker, jobs)
        stream = broker.consume()
        batch = []
        start = time.perf_counter()
        for _ in range(len(jobs)):
            batch.append(await anext(stream))
            if len(batch) >= 100:
                await broker.ack(batch)
                batch = []
        await broker.ack(batch)
        elapsed = time.perf_counter() - start
        await stream.aclose()  # type: ignore[attr-defined]
        assert await broker.pending() == 0, "acked jobs are still queued"
    return len(jobs) / elapsed


async def _naive_consume(jobs: list[Job]) -> float:
    async with naive_queue() as naive:
        # Filling the queue uses a window of publishes: only the consuming is timed.
        semaphore = asyncio.Semaphore(64)

        async def put(job: Job) -> None:
            async with semaphore:
                await naive.publish(job.to_bytes())

        await asyncio.gather(*(put(job) for job in jobs))
        consume_channel = await naive.connection.channel()
        await consume_channel.set_qos(prefetch_count=1)
        consume_queue = await consume_channel.get_queue(naive.queue.name)
        start = time.perf_counter()
        seen = 0
        async with consume_queue.iterator() as messages:
            async for message in messages:
                Job.model_validate_json(message.body)  # the same parse the pipeline does
                await message.ack()
                seen += 1
                if seen == len(jobs):
                    break
        elapsed = time.perf_counter() - start
    return len(jobs) / elapsed


async def _rabbitmq(quick: bool) -> dict[str, Any]:
    project_n = 100_000 if quick else 1_000_000
    naive_n = 2_000 if quick else 5_000
    consume_n = 50_000 if quick else 200_000
    naive_consume_n = 2_000 if quick else 5_000
    jobs = _jobs(project_n, "pub")
    out: dict[str, Any] = {}
    out["rabbitmq_publish_jobs_per_s"] = await _project_publish(jobs, 100)
    out["rabbitmq_publish_window_only_jobs_per_s"] = await _project_publish(
        jobs[: max(naive_n * 5, 10_000)], 1
    )
    out["rabbitmq_naive_publish_jobs_per_s"] = await _naive_publish(jobs[:naive_n])
    out["rabbitmq_consume_ack_jobs_per_s"] = await _project_consume(_jobs(consume_n, "con"))
    out["rabbitmq_naive_consume_ack_jobs_per_s"] = await _naive_consume(
        _jobs(naive_consume_n, "ncon")
    )
    out["rabbitmq_publish_ratio"] = (
        out["rabbitmq_publish_jobs_per_s"] / out["rabbitmq_naive_publish_jobs_per_s"]
    )
    out["rabbitmq_window_only_ratio"] = (
        out["rabbitmq_publish_window_only_jobs_per_s"] / out["rabbitmq_naive_publish_jobs_per_s"]
    )
    out["rabbitmq_consume_ratio"] = (
        out["rabbitmq_consume_ack_jobs_per_s"] / out["rabbitmq_naive_consume_ack_jobs_per_s"]
    )
    out["rabbitmq_jobs"] = {"publish": project_n, "naive": naive_n, "consume": consume_n}
    return out


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], quick_help="fewer jobs, done in ~1 minute")
    parser.add_argument("--transport", choices=["rabbitmq", "kafka", "all"], default="rabbitmq")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "bench": "queue",
        "quick": args.quick,
        "machine": machine_summary(),
    }
    if args.transport in ("rabbitmq", "all"):
        result.update(asyncio.run(_rabbitmq(args.quick)))
        print(
            f"RabbitMQ publish:  {result['rabbitmq_publish_jobs_per_s']:>10,.0f} jobs/s confirmed "
            f"(100 jobs/message, window)  vs naive "
            f"{result['rabbitmq_naive_publish_jobs_per_s']:>8,.0f} jobs/s  -> "
            f"{result['rabbitmq_publish_ratio']:.1f}x"
        )
        print(
            f"          window only (1 job/message): "
            f"{result['rabbitmq_publish_window_only_jobs_per_s']:>10,.0f} jobs/s  -> "
            f"{result['rabbitmq_window_only_ratio']:.1f}x"
        )
        print(
            f"RabbitMQ consume:  {result['rabbitmq_consume_ack_jobs_per_s']:>10,.0f} jobs/s acked "
            f"vs naive {result['rabbitmq_naive_consume_ack_jobs_per_s']:>8,.0f} jobs/s  -> "
            f"{result['rabbitmq_consume_ratio']:.1f}x"
        )
        result["ratio"] = min(result["rabbitmq_publish_ratio"], result["rabbitmq_consume_ratio"])
    if args.transport in ("kafka", "all"):
        from bench.queue_kafka import run_kafka_bench

        kafka = run_kafka_bench(args.quick)
        result.update({k if k.startswith("kafka") else f"kafka_{k}": v for k, v in kafka.items()})
        print("Kafka:", ", ".join(f"{k}={v:,.1f}" for k, v in kafka.items()))
        if "ratio" not in result:
            result["ratio"] = kafka.get("ratio", 0.0)
    return report(result, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
