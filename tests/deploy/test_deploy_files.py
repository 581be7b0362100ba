"""Static checks of the deployment files: compose, Dockerfiles, Kubernetes, KEDA, Prometheus,
Grafana and the configuration examples.

No Docker engine or Kubernetes cluster runs on the development machines or in CI, so these
files are checked by parsing them, against the code they deploy: queue and topic names
come from common/brokers/rabbitmq/topology.py and common/brokers/kafka/topics.py, ports,
paths and the drain deadline from common/config.py, metric names from
common/observability/metrics.py, CLI arguments from the imgfleet argument parser, and
every configuration example is loaded with load_settings.
The mistakes caught here (a floating tag, a root container, a renamed queue, a probe on the
wrong port, a metric that does not exist) otherwise surface only in a deploy.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from common.brokers.kafka.topics import KafkaTopics
from common.brokers.rabbitmq.topology import LANES, Topology
from common.config import (
    BrokerConfig,
    CmsConfig,
    IndexConfig,
    KafkaConfig,
    MetricsConfig,
    Settings,
    WorkerConfig,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
KAFKA_OVERRIDE_PATH = DEPLOY / "compose.kafka.yml"
COMPOSE_TOML = DEPLOY / "config" / "compose.toml"
SECRETS_EXAMPLE = DEPLOY / "config" / "secrets.env.example"
SECRETS_ENV = "deploy/config/secrets.env"
DASHBOARD_PATH = DEPLOY / "grafana" / "imgfleet-dashboard.json"
PROMETHEUS_PATH = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_PATH = DEPLOY / "prometheus" / "alerts.yml"
DOCKERFILES = {
    "worker": DEPLOY / "Dockerfile.worker",
    "cpu": DEPLOY / "Dockerfile.cpu",
}

# Long-running imgfleet services of the compose file and their one-shot companions.
IMGFLEET_SERVERS = ("cms", "worker", "index-applier", "search")
IMGFLEET_ONE_SHOTS = ("nightly", "index-builder")
IMGFLEET_SERVICES = (*IMGFLEET_SERVERS, *IMGFLEET_ONE_SHOTS)
REQUIRED_SERVICES = (
    "rabbitmq",
    "kafka",
    "minio",
    "minio-init",
    "prometheus",
    "grafana",
    *IMGFLEET_SERVICES,
)
# Settings that are secrets: never in a compose `environment`, a ConfigMap or an image.
SECRET_SETTINGS = (
    "IMGFLEET_BROKER__URL",
    "IMGFLEET_BROKER__USERNAME",
    "IMGFLEET_BROKER__PASSWORD",
    "IMGFLEET_STORAGE__S3_ACCESS_KEY_ID",
    "IMGFLEET_STORAGE__S3_SECRET_ACCESS_KEY",
    "IMGFLEET_CMS__TOKENS",
)
# The drain deadline plus this is the least time a stop may leave before SIGKILL.
DRAIN_MARGIN_S = 10.0

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


# -- shared helpers ------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    # A ":" inside a registry host (host:port/name) is not a tag.
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("1m30s", "90s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _metric_base(name: str) -> str:
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cli_accepts(argv: list[str]) -> None:
    """Parse argv with the real imgfleet parser: a misspelt command or option fails here."""
    from imgfleet.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports and exits on an unknown argument
        pytest.fail(f"imgfleet rejects {argv}: exit {exc.code}")


# -- compose -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "imgfleet-healthcheck"], test
    return str(test[2])


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            values[key] = value
    return values


def test_compose_has_no_version_key_and_every_service(compose: dict[str, Any]) -> None:
    assert "version" not in compose  # obsolete in the Compose Specification
    assert set(REQUIRED_SERVICES) <= set(compose["services"])


def test_pinning_rule_itself() -> None:
    assert _is_pinned("apache/kafka:3.9.0")
    assert _is_pinned("registry.local:5000/imgfleet@sha256:" + "0" * 64)
    assert not _is_pinned("minio/minio")
    assert not _is_pinned("minio/minio:latest")
    assert not _is_pinned("registry.local:5000/minio")


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            assert _is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"
        else:
            # A locally built image still gets a version tag, never latest.
            assert _is_pinned(service["image"]), name
            assert (REPO_ROOT / service["build"]["dockerfile"]).is_file(), name


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        if one_shot:
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name


def test_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on")
        if depends is None:
            continue
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dependency, spec in depends.items():
            assert dependency in services, (name, dependency)
            condition = spec["condition"]
            if condition == "service_healthy":
                check = services[dependency].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (name, dependency)
            else:
                assert condition == "service_completed_successfully", (name, dependency)
                assert services[dependency].get("restart") == "no", (name, dependency)
    for name in IMGFLEET_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        assert depends["minio"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name


def test_worker_reserves_a_gpu_and_runs_replicas(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    deploy = worker["deploy"]
    assert deploy["replicas"] >= 2
    devices = deploy["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert services["index-applier"]["deploy"]["replicas"] == 1  # one index writer


def test_stop_grace_period_covers_the_drain_deadline(services: dict[str, dict[str, Any]]) -> None:
    grace_s = _duration_s(services["worker"]["stop_grace_period"])
    configured = load_settings(COMPOSE_TOML).worker.shutdown_deadline_s
    for deadline_s in (WorkerConfig().shutdown_deadline_s, configured):
        assert grace_s >= deadline_s + DRAIN_MARGIN_S, (grace_s, deadline_s)


def test_imgfleet_services_run_real_cli_commands(services: dict[str, dict[str, Any]]) -> None:
    assert _command(services["worker"]) == ["work"]
    assert _command(services["cms"]) == ["serve", "cms"]
    assert _command(services["search"]) == ["serve", "search"]
    assert _command(services["index-applier"]) == ["index", "apply", "--watch"]
    assert _command(services["index-builder"]) == ["index", "build"]
    for name in IMGFLEET_SERVICES:
        if "entrypoint" not in services[name]:
            _cli_accepts(_command(services[name]))
    nightly = services["nightly"]
    assert nightly["entrypoint"] == ["imgfleet-nightly"]
    assert "/usr/local/bin/imgfleet-nightly" in _dockerfile_copies("cpu").values()


def test_imgfleet_services_get_config_and_secrets(services: dict[str, dict[str, Any]]) -> None:
    config_mount = "/etc/imgfleet/imgfleet.toml"
    for name in IMGFLEET_SERVICES:
        service = services[name]
        env = _env(service)
        assert env["IMGFLEET_CONFIG"] == config_mount, name
        mounts = [v for v in service["volumes"] if isinstance(v, dict)]
        assert {
            "type": "bind",
            "source": "./deploy/config/compose.toml",
            "target": config_mount,
            "read_only": True,
        } in mounts, name
        env_files = service["env_file"]
        assert SECRETS_ENV in (env_files if isinstance(env_files, list) else [env_files]), name
        # Secrets arrive through the env file only, never written into the compose file.
        assert not set(SECRET_SETTINGS) & set(env), name


def test_no_service_carries_a_secret_in_its_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    secretive = re.compile(r"PASS|SECRET|TOKEN|ACCESS_KEY|ROOT_USER", re.IGNORECASE)
    for name, service in services.items():
        for key in _env(service):
            assert not secretive.search(key), f"{name}: {key} belongs in {SECRETS_ENV}"


def test_healthcheck_urls_use_the_configured_ports(services: dict[str, dict[str, Any]]) -> None:
    settings = load_settings(COMPOSE_TOML)
    metrics_port = settings.metrics.port
    assert metrics_port == MetricsConfig().port
    expected = {
        "worker": f"http://127.0.0.1:{metrics_port}/healthz",
        "index-applier": f"http://127.0.0.1:{metrics_port}/healthz",
        "search": f"http://127.0.0.1:{metrics_port}/healthz",
        "cms": f"http://127.0.0.1:{settings.cms.port}/healthz",
    }
    for name, url in expected.items():
        assert _healthcheck_url(services[name]) == url, name
    published = {str(p) for p in services["cms"]["ports"]}
    assert f"{settings.cms.port}:{settings.cms.port}" in published
    assert f"{settings.index.serve_port}:{settings.index.serve_port}" in {
        str(p) for p in services["search"]["ports"]
    }


def test_compose_config_file_is_valid_and_listens_beyond_loopback() -> None:
    settings = load_settings(COMPOSE_TOML)
    assert settings.broker.kind == "rabbitmq"
    assert settings.broker.url.get_secret_value() == "amqp://rabbitmq:5672/"
    assert settings.storage.kind == "s3"
    assert settings.storage.s3_endpoint_url == "http://minio:9000"
    # Other containers reach these: a loopback bind would make them unreachable.
    assert settings.cms.host == settings.index.serve_host == settings.metrics.host == "0.0.0.0"
    assert settings.worker.allow_file_urls is False
    # No secrets in the file itself.
    assert not settings.broker.password.get_secret_value()
    assert not settings.storage.s3_secret_access_key.get_secret_value()
    assert not settings.cms.tokens


def test_secrets_example_matches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _env_file(SECRETS_EXAMPLE)
    # Server side and client side of each credential must agree.
    assert values["RABBITMQ_DEFAULT_USER"] == values["IMGFLEET_BROKER__USERNAME"]
    assert values["RABBITMQ_DEFAULT_PASS"] == values["IMGFLEET_BROKER__PASSWORD"]
    assert values["MINIO_ROOT_USER"] == values["IMGFLEET_STORAGE__S3_ACCESS_KEY_ID"]
    assert values["MINIO_ROOT_PASSWORD"] == values["IMGFLEET_STORAGE__S3_SECRET_ACCESS_KEY"]
    for key, value in values.items():
        if key.startswith("IMGFLEET_"):
            assert key in SECRET_SETTINGS, key
            monkeypatch.setenv(key, value)
        if any(word in key for word in ("PASS", "SECRET", "TOKEN")):
            assert "CHANGE-ME" in value, f"{key}: the example must hold a placeholder"
    settings = load_settings(COMPOSE_TOML)
    assert settings.broker.username == values["IMGFLEET_BROKER__USERNAME"]
    assert [t.get_secret_value() for t in settings.cms.tokens] == json.loads(
        values["IMGFLEET_CMS__TOKENS"]
    )
    assert settings.storage.s3_access_key_id.get_secret_value() == values["MINIO_ROOT_USER"]


def test_minio_init_creates_the_configured_bucket(services: dict[str, dict[str, Any]]) -> None:
    bucket = load_settings(COMPOSE_TOML).storage.s3_bucket
    script = " ".join(services["minio-init"]["entrypoint"])
    assert f"mc mb --ignore-existing local/{bucket}" in script


def test_kafka_override_switches_every_imgfleet_service(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    override = yaml.safe_load(KAFKA_OVERRIDE_PATH.read_text())["services"]
    kafka = services["kafka"]
    assert kafka["profiles"] == ["kafka"]
    assert _env(kafka)["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in _env(kafka)
    for name in IMGFLEET_SERVICES:
        assert name in override, name
        env = _env(override[name])
        assert env["IMGFLEET_BROKER__KIND"] == "kafka", name
        assert override[name]["depends_on"]["kafka"]["condition"] == "service_healthy", name
    env = _env(override["worker"])
    assert env["IMGFLEET_BROKER__URL"] == _env(kafka)["KAFKA_ADVERTISED_LISTENERS"].split("//")[1]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(COMPOSE_TOML)
    assert settings.broker.kind == "kafka"
    assert settings.broker.kafka.replication_factor == 1  # a single node


# -- Prometheus and Grafana ----------------------------------------------------------------


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


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_PATH.read_text())
    assert isinstance(data, dict)
    return data


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


# -- Dockerfiles ---------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    pairs = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def _last(pairs: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in pairs if kw == keyword]
    assert values, f"no {keyword}"
    return values[-1]


def _args(pairs: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, args in pairs:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            found[name] = value
    return found


def _runs(pairs: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in pairs if keyword == "RUN"]


def _dockerfile_copies(name: str) -> dict[str, str]:
    """Build-context COPY sources -> destinations (stage copies left out)."""
    copies = {}
    for keyword, args in _instructions(DOCKERFILES[name]):
        if keyword != "COPY":
            continue
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        for source in paths[:-1]:
            copies[source] = paths[-1]
    return copies


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_basics(name: str) -> None:
    pairs = _instructions(DOCKERFILES[name])
    stages: list[str] = []
    for keyword, args in pairs:
        if keyword == "FROM":
            parts = args.split()
            image = parts[0]
            assert image in stages or _is_pinned(image), f"{name}: FROM {image} not pinned"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.append(parts[2])
        if keyword == "COPY":
            for option in re.findall(r"--from=(\S+)", args):
                assert option in stages, f"{name}: COPY --from={option} is not an earlier stage"
    assert len(stages) >= 2, f"{name}: build and runtime should be separate stages"
    # A numeric, non-root user: Kubernetes can verify runAsNonRoot only against a UID.
    user = _last(pairs, "USER").split(":")[0]
    assert user.isdigit() and int(user) > 0, name
    assert json.loads(_last(pairs, "ENTRYPOINT")) == ["imgfleet"]
    assert _last(pairs, "STOPSIGNAL") == "SIGTERM"
    healthcheck = _last(pairs, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "imgfleet-healthcheck"
    assert f"/usr/local/bin/{command[0]}" in _dockerfile_copies(name).values()
    # A wheel-building stage, then installs that never leave pip's cache in a layer and
    # always go through the pinned constraints.
    assert any(r.startswith("pip wheel ") for r in _runs(pairs)), name
    for run in _runs(pairs):
        for command_text in re.split(r"&&|;", run):
            words = command_text.split()
            if words[:2] == ["pip", "install"]:
                assert "--no-cache-dir" in words, f"{name}: {command_text}"
                assert "--constraint" in words, f"{name}: {command_text}"


def test_worker_image_is_cuda_python311_with_the_gpu_extra() -> None:
    pairs = _instructions(DOCKERFILES["worker"])
    final_base = _last(pairs, "FROM").split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", final_base)
    args = _args(pairs)
    assert re.fullmatch(r"3\.11\.\d+", args["PYTHON_VERSION"])
    runs = " ".join(_runs(pairs))
    assert "[gpu]" in runs
    # The CUDA build of torch from the PyTorch index, the same version as the project's.
    assert f"https://download.pytorch.org/whl/${{{'TORCH_CUDA'}}}" in runs
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"])
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in runs
    assert args["TORCH_VERSION"] == _project_torch_version()
    # The CUDA major of the base image and of the torch build agree.
    assert final_base.split(":")[1].split(".")[0] == args["TORCH_CUDA"][2:-1]
    assert json.loads(_last(pairs, "CMD")) == ["work"]


def test_cpu_image_is_slim_python311_with_cpu_torch() -> None:
    pairs = _instructions(DOCKERFILES["cpu"])
    final_base = _last(pairs, "FROM").split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final_base)
    runs = " ".join(_runs(pairs))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert '"torch==${TORCH_VERSION}+cpu"' in runs
    assert _args(pairs)["TORCH_VERSION"] == _project_torch_version()
    assert "[gpu]" not in runs


def _project_torch_version() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if d.replace(" ", "").startswith("torch==")]
    return pin.replace(" ", "").removeprefix("torch==")


def test_constraints_pin_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(spec)
        for spec in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    ]
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            key = canonicalize_name(name)
            assert key not in pins, f"{name} pinned twice"
            pins[key] = version
    for requirement in wanted:
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned"
        assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)
    assert pins["torch"] == _project_torch_version()


def test_dockerignore_keeps_local_state_out_and_build_inputs_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".venv", ".git", "tests", "data", ".pytest_cache", "deploy/config"} <= set(patterns)
    assert any(p in patterns for p in ("*.env", ".env"))

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p.removeprefix("**/"))
            or fnmatch.fnmatch(path, p)
            or path.startswith(p.rstrip("/") + "/")
            for p in patterns
        )

    for name in DOCKERFILES:
        for source in _dockerfile_copies(name):
            assert (REPO_ROOT / source).exists(), f"{name}: COPY {source} does not exist"
            assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert ignored("deploy/config/secrets.env")
    assert ignored("tests/deploy/test_deploy_files.py")


# -- Kubernetes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every file in deploy/k8s (the component's too)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            if path.parent.name == "kafka" and key in found:
                continue  # a patch of a base object
            found[key] = doc
    return found


def _pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest["kind"] == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return manifest["spec"]["template"]["spec"]


def _workloads(manifests: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for (kind, _), m in manifests.items() if kind in ("Deployment", "CronJob")]


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod_spec(manifest)["containers"]
    return container


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def _probe(container: dict[str, Any], kind: str) -> tuple[str, int]:
    get = container[kind]["httpGet"]
    return get["path"], _port(container, get["port"])


def _configmap_settings(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> Settings:
    toml_text = manifests[("ConfigMap", "imgfleet-config")]["data"]["imgfleet.toml"]
    path = tmp_path / "imgfleet.toml"
    path.write_text(toml_text)
    return load_settings(path)


def test_every_manifest_names_itself(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert manifests
    for (kind, name), manifest in manifests.items():
        assert manifest["apiVersion"] and kind and name
        if kind != "Namespace":
            assert manifest["metadata"].get("namespace") == "imgfleet", (kind, name)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    component = yaml.safe_load((K8S / "kafka" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for resource in component["resources"]:
        assert (K8S / "kafka" / resource).is_file()
    images = {i["name"]: i for i in kustomization["images"]}
    for manifest in _yaml_docs(K8S / "worker.yaml") + _yaml_docs(K8S / "cms.yaml"):
        if manifest["kind"] == "Deployment":
            image = _container(manifest)["image"]
            assert image.rpartition(":")[0] in images, image


def test_every_image_is_pinned(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for manifest in _workloads(manifests):
        for container in _pod_spec(manifest)["containers"]:
            assert _is_pinned(container["image"]), container["image"]


def test_pods_meet_the_restricted_security_standard(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert (
        manifests[("Namespace", "imgfleet")]["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )
    for manifest in _workloads(manifests):
        name = manifest["metadata"]["name"]
        spec = _pod_spec(manifest)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            assert {"configMap", "emptyDir", "secret"} & set(volume), (name, volume["name"])
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            # With a read-only root, the data directory (the user's home) and /tmp must be
            # writable volumes, and the config comes read-only from the ConfigMap.
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            for writable in ("/var/lib/imgfleet", "/tmp"):
                assert "emptyDir" in volumes[mounts[writable]["name"]], (name, writable)
            assert mounts["/etc/imgfleet"]["readOnly"] is True, name
            assert volumes[mounts["/etc/imgfleet"]["name"]]["configMap"]["name"] == (
                "imgfleet-config"
            )
            env_from = {next(iter(e.values()))["name"] for e in container["envFrom"]}
            assert env_from == {"imgfleet-env", "imgfleet-secrets"}, name


def test_pod_user_matches_the_images(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    uids = {_last(_instructions(p), "USER").split(":")[0] for p in DOCKERFILES.values()}
    for manifest in _workloads(manifests):
        assert {str(_pod_spec(manifest)["securityContext"]["runAsUser"])} == uids


def test_worker_deployment(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    worker = manifests[("Deployment", "imgfleet-worker")]
    assert "replicas" not in worker["spec"]  # KEDA owns the count
    spec = _pod_spec(worker)
    container = _container(worker)
    assert container["image"].rpartition(":")[0].endswith("imgfleet-worker")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    configured = _configmap_settings(manifests, tmp_path)
    for deadline_s in (WorkerConfig().shutdown_deadline_s, configured.worker.shutdown_deadline_s):
        assert spec["terminationGracePeriodSeconds"] >= deadline_s + DRAIN_MARGIN_S
    _cli_accepts(container["args"])
    assert container["args"][0] == "work"
    port = MetricsConfig().port
    assert configured.metrics.port == port
    assert _probe(container, "livenessProbe") == ("/healthz", port)
    assert _probe(container, "startupProbe") == ("/healthz", port)
    assert _probe(container, "readinessProbe") == ("/readyz", port)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts  # the decode pool's shared memory


def test_cms_and_search_are_served_and_probed(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    settings = _configmap_settings(manifests, tmp_path)
    assert settings.cms.host == settings.index.serve_host == "0.0.0.0"
    metrics_port = MetricsConfig().port
    cms = _container(manifests[("Deployment", "imgfleet-cms")])
    _cli_accepts(cms["args"])
    assert _port(cms, "http") == settings.cms.port == CmsConfig().port
    assert _probe(cms, "livenessProbe") == ("/healthz", settings.cms.port)
    assert _probe(cms, "readinessProbe") == ("/readyz", settings.cms.port)
    search = _container(manifests[("Deployment", "imgfleet-search")])
    _cli_accepts(search["args"])
    assert _port(search, "http") == settings.index.serve_port == IndexConfig().serve_port
    assert _probe(search, "livenessProbe") == ("/healthz", metrics_port)
    assert _probe(search, "readinessProbe") == ("/readyz", metrics_port)
    scrape_ports = {
        "imgfleet-cms": settings.cms.port,
        "imgfleet-search": metrics_port,
        "imgfleet-index-applier": metrics_port,
    }
    for name, port in scrape_ports.items():
        annotations = manifests[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
    for name in ("imgfleet-cms", "imgfleet-search"):
        deployment = manifests[("Deployment", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        service = manifests[("Service", name)]
        assert service["spec"]["selector"].items() <= labels.items(), name
        container = _container(deployment)
        for port in service["spec"]["ports"]:
            _port(container, port["targetPort"])  # a named port the container declares
        budget = manifests[("PodDisruptionBudget", name)]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], name


def test_index_applier_is_a_single_writer(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    applier = manifests[("Deployment", "imgfleet-index-applier")]
    assert applier["spec"]["replicas"] == 1
    assert applier["spec"]["strategy"] == {"type": "Recreate"}
    container = _container(applier)
    assert container["args"] == ["index", "apply", "--watch"]
    _cli_accepts(container["args"])
    assert _probe(container, "livenessProbe") == ("/healthz", MetricsConfig().port)


def test_nightly_cronjob(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    cron = manifests[("CronJob", "imgfleet-nightly")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]["spec"]
    container = _container(cron)
    assert container["command"] == ["imgfleet-nightly"]
    assert "/usr/local/bin/imgfleet-nightly" in _dockerfile_copies("cpu").values()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["args"] == ["$(CATALOGUE_SOURCE)"] and env["CATALOGUE_SOURCE"]
    assert job["activeDeadlineSeconds"] > int(env["FINALIZE_TIMEOUT_S"])
    assert _pod_spec(cron)["restartPolicy"] == "Never"


def test_configmap_toml_loads_with_the_secret_and_env(
    manifests: dict[tuple[str, str], dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _configmap_settings(manifests, tmp_path)
    assert settings.broker.kind == "rabbitmq"
    assert settings.storage.kind == "s3"
    assert settings.worker.allow_file_urls is False
    assert settings.worker.decode_processes > 0  # os.cpu_count() is the node's, not the pod's
    env = manifests[("ConfigMap", "imgfleet-env")]["data"]
    assert env["IMGFLEET_CONFIG"] == "/etc/imgfleet/imgfleet.toml"
    secret = manifests[("Secret", "imgfleet-secrets")]["stringData"]
    for key, value in {**env, **secret}.items():
        if key.startswith("IMGFLEET_") and key != "IMGFLEET_CONFIG":
            monkeypatch.setenv(key, value)
    resolved = load_settings(tmp_path / "imgfleet.toml")
    assert resolved.broker.kind == env["IMGFLEET_BROKER__KIND"]
    assert resolved.broker.username == secret["IMGFLEET_BROKER__USERNAME"]
    assert len(resolved.cms.tokens) == 1


def test_secret_example_holds_placeholders_for_real_settings(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = manifests[("Secret", "imgfleet-secrets")]
    data = secret["stringData"]
    imgfleet_keys = {k for k in data if k.startswith("IMGFLEET_")}
    assert imgfleet_keys == set(SECRET_SETTINGS)
    for key in imgfleet_keys:
        section, _, field = key.removeprefix("IMGFLEET_").lower().partition("__")
        section_model = Settings.model_fields[section].annotation
        assert field in section_model.model_fields, key  # type: ignore[union-attr]
        if key != "IMGFLEET_BROKER__URL":
            assert "PLACEHOLDER" in data[key], key
    for (kind, _), manifest in manifests.items():
        if kind == "ConfigMap":
            text = json.dumps(manifest["data"])
            assert not any(key in text for key in SECRET_SETTINGS if key != "IMGFLEET_CONFIG")


def _scaled_object(manifests: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    scaled = manifests[("ScaledObject", name)]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "imgfleet-worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    return scaled


def _trigger_auth_keys(
    manifests: dict[tuple[str, str], dict[str, Any]], trigger: dict[str, Any]
) -> set[str]:
    auth = manifests[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    refs = auth["spec"]["secretTargetRef"]
    assert {ref["name"] for ref in refs} == {"imgfleet-secrets"}
    return {ref["key"] for ref in refs}


def test_keda_rabbitmq_scales_on_the_real_work_queues(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    scaled = _scaled_object(manifests, "imgfleet-worker-rabbitmq")
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"rabbitmq"}
    prefix = BrokerConfig().name_prefix
    assert _configmap_settings(manifests, tmp_path).broker.name_prefix == prefix
    topology = Topology(prefix, "quorum", ())
    assert {t["metadata"]["queueName"] for t in triggers} == {
        topology.work_queue(lane) for lane in LANES
    }
    secret_keys = set(manifests[("Secret", "imgfleet-secrets")]["stringData"])
    for trigger in triggers:
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert float(trigger["metadata"]["value"]) > 0
        keys = _trigger_auth_keys(manifests, trigger)
        assert keys <= secret_keys
        assert "IMGFLEET_BROKER__URL" in keys


def test_keda_kafka_scales_on_the_real_topics_and_group(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    scaled = _scaled_object(manifests, "imgfleet-worker-kafka")
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"kafka"}
    settings = _configmap_settings(manifests, tmp_path)
    topics = KafkaTopics.build(BrokerConfig().name_prefix, KafkaConfig().retry_delays_s)
    configured = KafkaTopics.build(
        settings.broker.name_prefix, settings.broker.kafka.retry_delays_s
    )
    assert topics == configured
    assert {t["metadata"]["topic"] for t in triggers} == {topics.for_lane(lane) for lane in LANES}
    secret_keys = set(manifests[("Secret", "imgfleet-secrets")]["stringData"])
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == KafkaConfig().group_id == settings.broker.kafka.group_id
        assert meta["topic"] in topics.consumed
        assert meta["bootstrapServersFromEnv"] in secret_keys  # the worker's env, via envFrom
        assert meta["allowIdleConsumers"] == "false"
        assert _trigger_auth_keys(manifests, trigger) <= secret_keys
    patch = _yaml_docs(K8S / "kafka" / "broker-kind.yaml")[0]
    assert patch["data"] == {"IMGFLEET_BROKER__KIND": "kafka"}


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_the_rabbitmq_and_the_kafka_fleet(tmp_path: Path) -> None:
    def build(directory: Path) -> list[dict[str, Any]]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def scaled_objects(docs: list[dict[str, Any]]) -> list[str]:
        return [d["metadata"]["name"] for d in docs if d["kind"] == "ScaledObject"]

    def broker_kind(docs: list[dict[str, Any]]) -> str:
        (env,) = [d for d in docs if d["metadata"]["name"] == "imgfleet-env"]
        return str(env["data"]["IMGFLEET_BROKER__KIND"])

    base = build(K8S)
    assert not [d for d in base if d["kind"] == "Secret"]
    assert scaled_objects(base) == ["imgfleet-worker-rabbitmq"]
    assert broker_kind(base) == "rabbitmq"
    for doc in base:
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "imgfleet"

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    relative = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [str(relative)], "components": [str(relative / "kafka")]})
    )
    kafka = build(overlay)
    assert scaled_objects(kafka) == ["imgfleet-worker-kafka"]
    assert [d["metadata"]["name"] for d in kafka if d["kind"] == "TriggerAuthentication"] == [
        "imgfleet-kafka"
    ]
    assert broker_kind(kafka) == "kafka"


# -- the scripts the images carry ----------------------------------------------------------


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("imgfleet_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_default_url_follows_the_metrics_config() -> None:
    module = _load_healthcheck()
    assert str(MetricsConfig().port) == module.DEFAULT_METRICS_PORT
    assert module.default_url({}) == f"http://127.0.0.1:{MetricsConfig().port}/healthz"
    assert module.default_url({"IMGFLEET_METRICS__PORT": "9555"}) == (
        "http://127.0.0.1:9555/healthz"
    )
    explicit = "http://127.0.0.1:8090/healthz"
    assert module.default_url({"IMGFLEET_HEALTHCHECK_URL": explicit}) == explicit


@pytest.mark.integration
def test_healthcheck_reports_the_endpoint_status(health_server: str) -> None:
    module = _load_healthcheck()
    assert module.main(["imgfleet-healthcheck", f"{health_server}/healthz"]) == 0
    assert module.main(["imgfleet-healthcheck", f"{health_server}/readyz"]) == 1
    assert module.main(["imgfleet-healthcheck", f"{health_server}/nothing"]) == 1
    # Nothing listening: unhealthy, not a traceback.
    port = health_server.rsplit(":", 1)[1]
    closed = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "IMGFLEET_METRICS__PORT": "1", "IMGFLEET_HEALTHCHECK_URL": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert closed.returncode == 1 and "127.0.0.1:1/healthz" in closed.stdout
    ok = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "IMGFLEET_METRICS__PORT": port, "IMGFLEET_HEALTHCHECK_URL": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


_FAKE_IMGFLEET = """#!/bin/sh
# Records its arguments; `index finalize` fails with $FINALIZE_CODE until the
# $FINALIZE_OK_AFTER-th call, then succeeds.
echo "$*" >> "$CALLS"
case "$1 $2" in
  "produce catalogue") exit "${PRODUCE_CODE:-0}" ;;
  "index finalize")
    n=$(grep -c "^index finalize" "$CALLS")
    if [ "$n" -ge "${FINALIZE_OK_AFTER:-1}" ]; then exit 0; fi
    exit "${FINALIZE_CODE:-1}" ;;
esac
exit 64
"""


def _nightly(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "imgfleet"
    fake.write_text(_FAKE_IMGFLEET)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    result = subprocess.run(
        ["sh", str(DEPLOY / "nightly-run.sh"), *args],
        env={
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "CALLS": str(calls),
            "FINALIZE_POLL_S": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, calls.read_text().splitlines(), result.stdout + result.stderr


@pytest.mark.integration
def test_nightly_publishes_then_waits_until_the_run_is_accounted_for(tmp_path: Path) -> None:
    code, calls, output = _nightly(
        tmp_path, "s3://exports/catalogue.jsonl", "nightly-test", FINALIZE_OK_AFTER="3"
    )
    assert code == 0, output
    assert calls == [
        "produce catalogue s3://exports/catalogue.jsonl --run-id nightly-test",
        "index finalize --run nightly-test",
        "index finalize --run nightly-test",
        "index finalize --run nightly-test",
    ]
    for argv in calls:
        _cli_accepts(shlex.split(argv))


@pytest.mark.integration
def test_nightly_run_id_defaults_to_the_utc_date(tmp_path: Path) -> None:
    code, calls, output = _nightly(tmp_path, "/data/catalogue.jsonl")
    assert code == 0, output
    run_id = calls[0].rsplit(" ", 1)[1]
    assert re.fullmatch(r"nightly-\d{8}", run_id)
    assert calls[1] == f"index finalize --run {run_id}"


@pytest.mark.integration
def test_nightly_stops_at_once_on_other_failures(tmp_path: Path) -> None:
    code, calls, _ = _nightly(
        tmp_path, "cat.jsonl", "r1", FINALIZE_CODE="2", FINALIZE_OK_AFTER="99"
    )
    assert code == 2
    assert calls == ["produce catalogue cat.jsonl --run-id r1", "index finalize --run r1"]
    code, calls, _ = _nightly(tmp_path, "cat.jsonl", "r2", PRODUCE_CODE="1")
    assert code == 1
    assert calls == ["produce catalogue cat.jsonl --run-id r2"]  # nothing to finalise


@pytest.mark.integration
def test_nightly_gives_up_after_its_timeout(tmp_path: Path) -> None:
    code, calls, output = _nightly(
        tmp_path, "cat.jsonl", "r3", FINALIZE_OK_AFTER="99", FINALIZE_TIMEOUT_S="0"
    )
    assert code == 1
    assert calls == ["produce catalogue cat.jsonl --run-id r3", "index finalize --run r3"]
    assert "not published" in output
