"""Prometheus metrics of every process, on one registry per process.

Each process serves one group on its own registry through ``common.observability.ops_http``:
``Metrics`` (workers and the index processes), ``ProducerMetrics`` (the catalogue
producer) and ``IntakeMetrics`` (the CMS intake). The code that counts is handed its group;
nothing counts on prometheus_client's global default registry.

Every name below is part of the operations contract (dashboards, alerts and probes are
written against them): add metrics, never rename one. Labels carry small, closed sets
(lane, outcome, reason, stage, format, path, gpu, shard), never a job, item or image id.

The worker's settled-job counters are incremented once per job, at the point its outcome
is durable on the broker: ``acked`` after the segment holding it is flushed and the ack
sent, ``retried`` / ``dead_lettered`` after the broker took the retry or DLQ publish.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Self

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from common.brokers.base import LaneStats, QueueInspector
from common.errors import Reason

# ``*_created`` series double the exposition and nothing here reads them (process-wide).
disable_created_metrics()

LANES = ("live", "bulk")
ACK_OUTCOMES = ("indexed", "unchanged", "recovered", "deleted")
UNKNOWN_LANE = "unknown"  # a message that is not a readable job has no lane

# Per stage: the range that stage's latency lives in. A fetch is network-bound (ms to the
# 30 s total timeout), a batch wait is bounded by max_wait_ms, a decode by image size.
STAGE_BUCKETS_S: dict[str, tuple[float, ...]] = {
    "fetch": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "decode": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    "batch_wait": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    "embed": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    "segment_flush": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    "ack": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
}
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# One CMS request's publish, from the first job sent to the last confirm.
CMS_PUBLISH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FILL_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


def package_version() -> str:
    try:
        return metadata.version("imgfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


class StageHistogram(Collector):
    """``imgfleet_stage_seconds{stage}``: one histogram family, buckets chosen per stage.

    A prometheus_client Histogram has one bucket layout for all its label values; a fetch
    and a batch wait differ by three orders of magnitude, so each stage keeps its own
    (unregistered) histogram and this collector exposes them under one name.
    """

    name = "imgfleet_stage_seconds"
    documentation = (
        "Seconds spent in a pipeline stage: per job (fetch, decode) or per batch "
        "(batch_wait, embed, segment_flush, ack)"
    )

    def __init__(self, buckets_by_stage: Mapping[str, Sequence[float]]) -> None:
        self._stages = {
            stage: Histogram(self.name, self.documentation, buckets=buckets, registry=None)
            for stage, buckets in buckets_by_stage.items()
        }

    def observe(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(max(seconds, 0.0))

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["stage"])
        for stage, histogram in self._stages.items():
            for metric in histogram.collect():
                family.samples.extend(
                    Sample(s.name, {"stage": stage, **s.labels}, s.value, s.timestamp, s.exemplar)
                    for s in metric.samples
                )
        yield family

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=["stage"])


class MetricGroup:
    """Metrics registered on ``registry`` (a fresh one by default), and their exposition:
    what a process's ops listener serves on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

    def with_process_collectors(self) -> Self:
        """Add the process, platform and GC collectors: a served registry has them."""
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        return self

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when the series does not exist); for tests and logs."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else float(found)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an HTTP scrape: (body, content type), by the Accept header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class Metrics(MetricGroup):
    """The worker's and the index processes' metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        # -- worker: jobs --------------------------------------------------------------
        self.jobs_consumed = Counter(
            "imgfleet_jobs_consumed_total",
            "Deliveries taken from the broker (redeliveries count again)",
            ["lane"],
            registry=r,
        )
        self.jobs_acked = Counter(
            "imgfleet_jobs_acked_total",
            "Jobs acked after their outcome was flushed to a segment",
            ["lane", "outcome"],
            registry=r,
        )
        self.jobs_retried = Counter(
            "imgfleet_jobs_retried_total",
            "Jobs handed to the broker for a later attempt",
            ["reason"],
            registry=r,
        )
        self.jobs_dead_lettered = Counter(
            "imgfleet_jobs_dead_lettered_total",
            "Jobs recorded in the dead-letter queue",
            ["reason"],
            registry=r,
        )
        self.in_flight_jobs = Gauge(
            "imgfleet_in_flight_jobs", "Jobs taken from the broker and not settled yet", registry=r
        )
        # -- worker: stages and batches --------------------------------------------------
        self.stage_seconds = StageHistogram(STAGE_BUCKETS_S)
        r.register(self.stage_seconds)
        self.batch_size = Histogram(
            "imgfleet_batch_size",
            "Images per embed batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_fill_ratio = Histogram(
            "imgfleet_batch_fill_ratio",
            "Images per embed batch over worker.max_batch (1: the batch was full)",
            buckets=FILL_RATIO_BUCKETS,
            registry=r,
        )
        self.decode_total = Counter(
            "imgfleet_decode_total",
            "Images decoded, by sniffed format and decode path (gpu, cpu, fallback, recovered)",
            ["format", "path"],
            registry=r,
        )
        self.decode_pool_restarts = Counter(
            "imgfleet_decode_pool_restarts_total",
            "Times a dead decode process forced a new CPU decode pool",
            registry=r,
        )
        # -- worker: devices, queues, readiness --------------------------------------------
        self.gpu_utilization = Gauge(
            "imgfleet_gpu_utilization_ratio",
            "GPU busy fraction over the driver's last sample period (0..1)",
            ["gpu"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "imgfleet_gpu_memory_used_bytes",
            "GPU memory in use (whole device)",
            ["gpu"],
            registry=r,
        )
        self.gpu_memory_total = Gauge(
            "imgfleet_gpu_memory_total_bytes", "GPU memory of the device", ["gpu"], registry=r
        )
        self.queue_depth = Gauge(
            "imgfleet_queue_depth",
            "Jobs (RabbitMQ: messages) waiting in the broker per lane",
            ["lane"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "imgfleet_consumer_lag",
            "Work the consumers have not settled per lane (Kafka: uncommitted records; "
            "elsewhere: waiting + delivered-unsettled)",
            ["lane"],
            registry=r,
        )
        self.worker_ready = Gauge(
            "imgfleet_worker_ready", "1 when the process is ready (see /readyz), else 0", registry=r
        )
        self.broker_connected = Gauge(
            "imgfleet_broker_connected", "1 while the broker connection is up", registry=r
        )
        self.event_loop_lag = Gauge(
            "imgfleet_event_loop_lag_seconds",
            "How late the event loop ran its last heartbeat (a blocked loop shows here first)",
            registry=r,
        )
        self.build_info = Gauge(
            "imgfleet_build_info",
            "Always 1; the labels say which code and which model this process runs",
            ["version", "model_id"],
            registry=r,
        )
        # -- index ----------------------------------------------------------------------
        self.index_generation = Gauge(
            "imgfleet_index_generation",
            "The index generation this process serves / applies to",
            registry=r,
        )
        self.index_shard_vectors = Gauge(
            "imgfleet_index_shard_vectors",
            "Vectors in each shard of that generation",
            ["shard"],
            registry=r,
        )
        self.live_apply_delay = Gauge(
            "imgfleet_live_apply_delay_seconds",
            "Last successful apply cycle: seconds from the oldest applied segment's write to "
            "the manifest publish (0 when nothing was pending)",
            registry=r,
        )
        self.index_apply_cycles = Counter(
            "imgfleet_index_apply_cycles_total",
            "Live apply cycles by outcome (ok, error)",
            ["outcome"],
            registry=r,
        )
        self.index_apply_last_success = Gauge(
            "imgfleet_index_apply_last_success_timestamp_seconds",
            "Unix time of the last successful apply cycle",
            registry=r,
        )
        self.index_applied_records = Counter(
            "imgfleet_index_applied_records_total",
            "Records applied to the serving generation (upsert, delete)",
            ["op"],
            registry=r,
        )
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        # Series that exist from the start read 0 instead of "no data" on dashboards, and
        # rate() sees the first increment.
        for lane in LANES:
            self.jobs_consumed.labels(lane=lane)
            for outcome in ACK_OUTCOMES:
                self.jobs_acked.labels(lane=lane, outcome=outcome)
        for reason in Reason:
            self.jobs_dead_lettered.labels(reason=reason.value)
            self.jobs_retried.labels(reason=reason.value)
        for op in ("upsert", "delete"):
            self.index_applied_records.labels(op=op)
        for outcome in ("ok", "error"):
            self.index_apply_cycles.labels(outcome=outcome)

    # -- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Observe the wall time of the block (success or failure) under ``stage``."""
        started_s = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.observe(stage, time.perf_counter() - started_s)

    def observe_batch(self, size: int, max_batch: int, wait_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_fill_ratio.observe(size / max_batch if max_batch else 0.0)
        self.stage_seconds.observe("batch_wait", wait_s)

    def count_decode(
        self, image_format: str, *, gpu: bool, recovered: bool, fallback: bool = False
    ) -> None:
        # fallback: the format's own decoder failed and another one read the image.
        path = "recovered" if recovered else "gpu" if gpu else "fallback" if fallback else "cpu"
        self.decode_total.labels(format=image_format or "unknown", path=path).inc()

    def set_build_info(self, model_id: str, version: str | None = None) -> None:
        self.build_info.clear()  # one series: a process runs one model
        self.build_info.labels(version=version or package_version(), model_id=model_id).set(1)

    def set_queue_stats(self, stats: Iterable[LaneStats]) -> None:
        for lane in stats:
            self.queue_depth.labels(lane=lane.lane).set(lane.ready)
            if lane.lag is not None:
                self.consumer_lag.labels(lane=lane.lane).set(lane.lag)
            elif lane.lane in LANES:
                self.consumer_lag.labels(lane=lane.lane).set(lane.ready + (lane.in_flight or 0))

    def set_gpu(
        self, gpu: str, *, utilization: float | None, used_bytes: int, total_bytes: int
    ) -> None:
        if utilization is not None:
            self.gpu_utilization.labels(gpu=gpu).set(utilization)
        self.gpu_memory_used.labels(gpu=gpu).set(used_bytes)
        self.gpu_memory_total.labels(gpu=gpu).set(total_bytes)

    def set_index_shards(self, generation: int | None, shard_vectors: Mapping[int, int]) -> None:
        if generation is None:
            return
        self.index_generation.set(generation)
        self.index_shard_vectors.clear()  # a new generation may have fewer shards
        for shard, vectors in shard_vectors.items():
            self.index_shard_vectors.labels(shard=str(shard)).set(vectors)


class ProducerMetrics(MetricGroup):
    """The catalogue producer's metrics (``imgfleet produce catalogue``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.rows = Counter(
            "imgfleet_producer_rows_total",
            "Catalogue rows read, by outcome (item or rejected).",
            ["outcome"],
            registry=r,
        )
        self.jobs_published = Counter(
            "imgfleet_producer_jobs_published_total",
            "Jobs confirmed by the broker, by op (upsert or delete).",
            ["op"],
            registry=r,
        )
        self.jobs_skipped = Counter(
            "imgfleet_producer_jobs_skipped_total",
            "Jobs not published, by reason (duplicate image, already_published before a resume).",
            ["reason"],
            registry=r,
        )
        self.checkpoints = Counter(
            "imgfleet_producer_checkpoints_total",
            "Resume points written by catalogue runs.",
            registry=r,
        )
        self.run_info = Gauge(
            "imgfleet_producer_run_info",
            "1 for the catalogue run this process is publishing.",
            ["run_id", "catalogue", "lane"],
            registry=r,
        )
        self.publish_rate = Gauge(
            "imgfleet_producer_publish_rate_jobs_per_s",
            "Jobs confirmed per second, so far.",
            registry=r,
        )
        self.fraction_done = Gauge(
            "imgfleet_producer_fraction_done",
            "Share of the catalogue read (0-1; -1: unknown).",
            registry=r,
        )
        self.eta = Gauge(
            "imgfleet_producer_eta_seconds", "Estimated seconds left (-1: unknown).", registry=r
        )


class IntakeMetrics(MetricGroup):
    """The CMS intake's metrics (``imgfleet serve cms``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.requests = Counter(
            "imgfleet_cms_requests_total",
            "CMS intake HTTP requests by response status",
            ["status"],
            registry=r,
        )
        self.changes = Counter(
            "imgfleet_cms_changes_total",
            "Item changes accepted (durable on the broker) by op",
            ["op"],
            registry=r,
        )
        self.publish_seconds = Histogram(
            "imgfleet_cms_publish_seconds",
            "Time to publish one request's jobs until the broker confirmed them all",
            buckets=CMS_PUBLISH_BUCKETS_S,
            registry=r,
        )


async def poll_queue_stats(broker: QueueInspector, metrics: Metrics) -> list[LaneStats]:
    """Read the broker's per-lane figures into the queue gauges."""
    stats = await broker.lane_stats()
    metrics.set_queue_stats(stats)
    return stats


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process's metrics: one registry with the process, platform and GC collectors."""
    global _default
    if _default is None:
        _default = Metrics().with_process_collectors()
    return _default
