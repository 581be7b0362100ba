"""Prometheus scraping, the Grafana provisioning and dashboard, the alert rules, and the
metric names they use against the ones the code defines."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

from common.config import IndexConfig, load_settings
from tests.deploy.artifacts import (
    ALERTS_PATH,
    COMPOSE_TOML,
    DASHBOARD_PATH,
    DEPLOY,
    PROMETHEUS_PATH,
    REPO_ROOT,
)

# The operations contract: every metric the dashboards and alerts may use. When
# common/observability/metrics.py is importable, the names the code defines are checked instead.
CONTRACT_METRICS = (
    "imgfleet_jobs_consumed_total",
    "imgfleet_jobs_acked_total",
    "imgfleet_jobs_retried_total",
    "imgfleet_jobs_dead_lettered_total",
    "imgfleet_stage_seconds",
    "imgfleet_batch_size",
    "imgfleet_batch_fill_ratio",
    "imgfleet_decode_total",
    "imgfleet_gpu_utilization_ratio",
    "imgfleet_gpu_memory_used_bytes",
    "imgfleet_queue_depth",
    "imgfleet_consumer_lag",
    "imgfleet_in_flight_jobs",
    "imgfleet_index_generation",
    "imgfleet_index_shard_vectors",
    "imgfleet_live_apply_delay_seconds",
    "imgfleet_worker_ready",
    "imgfleet_build_info",
    "imgfleet_cms_requests_total",
    "imgfleet_cms_publish_seconds",
    "imgfleet_producer_jobs_published_total",
)
_METRIC_TOKEN = re.compile(r"\bimgfleet_[a-z0-9_]+\b")
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")


def _metric_base(name: str) -> str:
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return panels


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS_PATH.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _defined_metric_names() -> set[str] | None:
    """Metric names the code defines (base names), or None before the metrics module exists.

    The worker and index metrics come from common.observability.metrics.Metrics on a fresh registry;
    processes with their own (the producer, the CMS intake) are found as name literals in
    the packages' sources.
    """
    if importlib.util.find_spec("common.observability.metrics") is None:
        return None
    from common.observability.metrics import Metrics

    names = {_metric_base(family.name) for family in Metrics().registry.collect()}
    for package in ("common", "producers", "workers", "index", "imgfleet"):
        for source in (REPO_ROOT / package).rglob("*.py"):
            names |= {
                _metric_base(n)
                for n in re.findall(r"[\"'](imgfleet_[a-z0-9_]+)[\"']", source.read_text())
            }
    return names


def test_prometheus_scrapes_every_imgfleet_service(services: dict[str, dict[str, Any]]) -> None:
    settings = load_settings(COMPOSE_TOML)
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    targets: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            found |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                found.add((host, int(port)))
    metrics_port = settings.metrics.port
    assert ("worker", metrics_port) in targets["imgfleet-worker"]
    assert ("cms", settings.cms.port) in targets["imgfleet-cms"]
    assert ("search", metrics_port) in targets["imgfleet-search"]
    assert ("index-applier", metrics_port) in targets["imgfleet-index-applier"]
    for job, found in targets.items():
        for host, _port in found:
            assert host in services or host == "127.0.0.1", (job, host)
    mounts = services["prometheus"]["volumes"]
    for rule_file in config["rule_files"]:
        assert f"./deploy/prometheus/{Path(rule_file).name}:{rule_file}:ro" in mounts


def test_grafana_is_provisioned_with_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "imgfleet.yml").read_text())
    (provider,) = providers["providers"]
    dashboard_dir = provider["options"]["path"]
    mounts = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert (
        f"./deploy/grafana/{DASHBOARD_PATH.name}:{dashboard_dir}/{DASHBOARD_PATH.name}:ro" in mounts
    )
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == datasource["uid"]


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "bargauge", "table", "gauge"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert _METRIC_TOKEN.search(target["expr"]), (panel["title"], target["expr"])


def test_promql_is_well_formed(dashboard: dict[str, Any]) -> None:
    for expr in [*_dashboard_exprs(dashboard), *_alert_exprs()]:
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0, expr
        assert expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
        # histogram_quantile needs bucket series aggregated by `le`.
        if "histogram_quantile" in expr:
            assert "_bucket[" in expr and re.search(r"by \((le|[a-z_, ]*\ble\b)", expr), expr


def test_dashboard_and_alerts_use_only_defined_metrics(dashboard: dict[str, Any]) -> None:
    defined = _defined_metric_names()
    allowed = defined if defined is not None else {_metric_base(n) for n in CONTRACT_METRICS}
    used = {
        token
        for expr in [*_dashboard_exprs(dashboard), *_alert_exprs()]
        for token in _METRIC_TOKEN.findall(expr)
    }
    unknown = sorted(name for name in used if _metric_base(name) not in allowed)
    assert not unknown, f"metrics not defined by the code: {unknown}"


def test_contract_metrics_exist_and_are_all_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    defined = _defined_metric_names()
    if defined is not None:
        missing = [n for n in CONTRACT_METRICS if _metric_base(n) not in defined]
        assert not missing, f"contract metrics the code does not define: {missing}"
    used = {
        _metric_base(token)
        for expr in _dashboard_exprs(dashboard)
        for token in _METRIC_TOKEN.findall(expr)
    }
    absent = [n for n in CONTRACT_METRICS if _metric_base(n) not in used]
    assert not absent, f"metrics with no dashboard panel: {absent}"


def test_alert_rules_are_complete_and_the_apply_delay_outlasts_the_grace() -> None:
    groups = yaml.safe_load(ALERTS_PATH.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    (delay_rule,) = [r for r in rules if "imgfleet_live_apply_delay_seconds" in r["expr"]]
    threshold_s = float(delay_rule["expr"].rsplit(">", 1)[1])
    index = IndexConfig()
    # Segments legitimately wait up to grace_s before they are applied.
    assert threshold_s > index.grace_s + index.apply_interval_s
