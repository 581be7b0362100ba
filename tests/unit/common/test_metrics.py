"""The metrics helpers: names, labels, per-stage buckets, queue and index gauges."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from common.brokers.base import LaneStats
from common.errors import Reason
from common.observability.metrics import (
    STAGE_BUCKETS_S,
    Metrics,
    poll_queue_stats,
)


def families(metrics: Metrics) -> dict[str, object]:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_contract_names_are_exposed_from_the_start() -> None:
    metrics = Metrics()
    names = set(families(metrics))
    for name in (
        "imgfleet_jobs_consumed",
        "imgfleet_jobs_acked",
        "imgfleet_jobs_retried",
        "imgfleet_jobs_dead_lettered",
        "imgfleet_stage_seconds",
        "imgfleet_batch_size",
        "imgfleet_batch_fill_ratio",
        "imgfleet_decode",
        "imgfleet_in_flight_jobs",
        "imgfleet_index_generation",
        "imgfleet_live_apply_delay_seconds",
        "imgfleet_worker_ready",
    ):
        assert name in names, name
    # Known label values read 0 before anything happened (dashboards show 0, not gaps).
    assert (
        metrics.registry.get_sample_value(
            "imgfleet_jobs_acked_total", {"lane": "live", "outcome": "recovered"}
        )
        == 0
    )
    for reason in Reason:
        assert (
            metrics.registry.get_sample_value(
                "imgfleet_jobs_dead_lettered_total", {"reason": reason.value}
            )
            == 0
        )


def test_each_stage_has_its_own_buckets_under_one_name() -> None:
    metrics = Metrics()
    metrics.stage_seconds.observe("batch_wait", 0.0004)
    metrics.stage_seconds.observe("fetch", 45.0)
    with metrics.time_stage("decode"):
        pass
    stage = families(metrics)["imgfleet_stage_seconds"]
    buckets: dict[str, list[tuple[float, float]]] = {}
    for sample in stage.samples:  # type: ignore[attr-defined]
        if sample.name.endswith("_bucket"):
            le = float(sample.labels["le"])
            buckets.setdefault(sample.labels["stage"], []).append((le, sample.value))
    assert set(buckets) == set(STAGE_BUCKETS_S)
    assert buckets["batch_wait"][0][0] == 0.0005
    assert [le for le, _ in buckets["fetch"]][-2] == 60.0  # the last finite bound
    assert dict(buckets["batch_wait"])[0.0005] == 1  # 0.4 ms landed in the first bucket
    assert dict(buckets["fetch"])[30.0] == 0 and dict(buckets["fetch"])[60.0] == 1
    assert metrics.value("imgfleet_stage_seconds_count", stage="decode") == 1
    assert metrics.value("imgfleet_stage_seconds_count", stage="embed") == 0


def test_batch_decode_and_build_info_helpers() -> None:
    metrics = Metrics()
    metrics.observe_batch(8, 32, 0.01)
    metrics.observe_batch(32, 32, 0.002)
    assert metrics.value("imgfleet_batch_size_count") == 2
    assert metrics.value("imgfleet_batch_size_sum") == 40
    assert metrics.value("imgfleet_batch_fill_ratio_bucket", le="0.3") == 1  # 8/32
    assert metrics.value("imgfleet_batch_fill_ratio_bucket", le="0.99") == 1
    assert metrics.value("imgfleet_stage_seconds_count", stage="batch_wait") == 2

    metrics.count_decode("jpeg", gpu=True, recovered=False)
    metrics.count_decode("jpeg", gpu=False, recovered=True)
    metrics.count_decode("", gpu=False, recovered=False)
    metrics.count_decode("png", gpu=False, recovered=False, fallback=True)
    assert metrics.value("imgfleet_decode_total", format="png", path="fallback") == 1
    assert metrics.value("imgfleet_decode_total", format="jpeg", path="gpu") == 1
    assert metrics.value("imgfleet_decode_total", format="jpeg", path="recovered") == 1
    assert metrics.value("imgfleet_decode_total", format="unknown", path="cpu") == 1

    metrics.set_build_info("model-a", version="1.2.3")
    metrics.set_build_info("model-b", version="1.2.3")
    info = [s for s in families(metrics)["imgfleet_build_info"].samples]  # type: ignore[attr-defined]
    assert [(s.labels["model_id"], s.value) for s in info] == [("model-b", 1.0)]


def test_queue_gauges_from_lane_stats_and_from_depths() -> None:
    metrics = Metrics()
    metrics.set_queue_stats(
        [
            LaneStats("live", 3, in_flight=2),
            LaneStats("bulk", 100, in_flight=10, lag=150),
            LaneStats("dlq", 7),
        ]
    )
    assert metrics.value("imgfleet_queue_depth", lane="bulk") == 100
    assert metrics.value("imgfleet_consumer_lag", lane="bulk") == 150  # the broker's own lag
    assert metrics.value("imgfleet_consumer_lag", lane="live") == 5  # waiting + unsettled
    assert metrics.value("imgfleet_queue_depth", lane="dlq") == 7


class _LaneStats:
    async def lane_stats(self) -> list[LaneStats]:
        return [LaneStats("bulk", 99)]


def test_poll_sets_the_queue_gauges_from_lane_stats() -> None:
    metrics = Metrics()
    asyncio.run(poll_queue_stats(_LaneStats(), metrics))  # type: ignore[arg-type]
    assert metrics.value("imgfleet_queue_depth", lane="bulk") == 99


def test_index_shard_gauges_follow_the_generation() -> None:
    metrics = Metrics()
    metrics.set_index_shards(3, {0: 10, 1: 12, 2: 9, 3: 11})
    metrics.set_index_shards(4, {0: 30, 1: 31})  # resharded to two
    assert metrics.value("imgfleet_index_generation") == 4
    assert metrics.value("imgfleet_index_shard_vectors", shard="1") == 31
    assert metrics.registry.get_sample_value("imgfleet_index_shard_vectors", {"shard": "3"}) is None


def test_openmetrics_when_the_scraper_asks() -> None:
    metrics = Metrics()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
