"""docker-compose.yml, its Kafka override, and the config and secrets files it mounts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import MetricsConfig, WorkerConfig, load_settings
from tests.deploy.artifacts import (
    COMPOSE_TOML,
    DRAIN_MARGIN_S,
    IMGFLEET_SERVICES,
    KAFKA_OVERRIDE_PATH,
    REPO_ROOT,
    REQUIRED_SERVICES,
    SECRET_SETTINGS,
    SECRETS_ENV,
    SECRETS_EXAMPLE,
    cli_accepts,
    dockerfile_copies,
    is_pinned,
)


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("1m30s", "90s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


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


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            assert is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"
        else:
            # A locally built image still gets a version tag, never latest.
            assert is_pinned(service["image"]), name
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
            cli_accepts(_command(services[name]))
    nightly = services["nightly"]
    assert nightly["entrypoint"] == ["imgfleet-nightly"]
    assert "/usr/local/bin/imgfleet-nightly" in dockerfile_copies("cpu").values()


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
