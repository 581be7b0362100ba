"""Static checks of the compose file and Dockerfiles.

No Docker engine runs on the development machines or in CI, so these files are checked
by parsing them: the mistakes caught here (a floating tag, a missing GPU reservation, a
misspelt setting, a root container) are the ones that otherwise surface only in a deploy.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = {
    "worker": REPO_ROOT / "deploy" / "Dockerfile.worker",
    "cpu": REPO_ROOT / "deploy" / "Dockerfile.cpu",
}
IMGFLEET_SERVICES = ("producer", "worker", "index-builder")
REQUIRED_SERVICES = ("rabbitmq", "kafka", "minio", "minio-init", *IMGFLEET_SERVICES)
REQUIRED_ENV = (
    "IMGFLEET_BROKER__KIND",
    "IMGFLEET_BROKER__URL",
    "IMGFLEET_STORAGE__KIND",
    "IMGFLEET_STORAGE__S3_BUCKET",
    "IMGFLEET_STORAGE__S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


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


def _interpolate_defaults(value: str) -> str:
    """What compose makes of a value when none of its variables is set."""
    return _INTERPOLATION.sub(lambda m: m.group("default") or "", value)


def _is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    # A ":" inside a registry host (host:port/name) is not a tag.
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_compose_has_no_version_key_and_every_service(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert set(REQUIRED_SERVICES) <= set(compose["services"])


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            assert _is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"


def test_pinning_rule_itself() -> None:
    assert _is_pinned("apache/kafka:3.9.0")
    assert _is_pinned("registry.local:5000/imgfleet@sha256:" + "0" * 64)
    assert not _is_pinned("minio/minio")
    assert not _is_pinned("minio/minio:latest")
    assert not _is_pinned("registry.local:5000/minio")


def test_brokers_and_storage(services: dict[str, dict[str, Any]]) -> None:
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    kafka_env = _env(services["kafka"])
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka_env
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert services["minio"]["command"].split()[:2] == ["server", "/data"]
    for name in ("rabbitmq", "kafka", "minio"):
        assert services[name]["healthcheck"]["test"], name
    init = " ".join(services["minio-init"]["entrypoint"])
    assert "mc mb" in init and "--ignore-existing" in init


def test_worker_reserves_a_gpu_and_runs_two_replicas(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    deploy = worker["deploy"]
    assert deploy["replicas"] == 2
    devices = deploy["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_imgfleet_services_use_the_cli(services: dict[str, dict[str, Any]]) -> None:
    def command(name: str) -> list[str]:
        cmd = services[name]["command"]
        return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]

    assert command("worker") == ["work"]
    assert command("producer") == ["produce", "catalogue", "/data/catalogue.jsonl"]
    assert command("index-builder") == ["index", "build"]
    for name in IMGFLEET_SERVICES:
        dockerfile = REPO_ROOT / services[name]["build"]["dockerfile"]
        assert dockerfile.is_file(), name  # whose ENTRYPOINT is imgfleet, checked below


def test_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    allowed = {"service_healthy", "service_completed_successfully"}
    for name in (*IMGFLEET_SERVICES, "minio-init"):
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dependency, spec in depends.items():
            assert dependency in services, (name, dependency)
            assert spec["condition"] in allowed, (name, dependency)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    for name in IMGFLEET_SERVICES:
        assert {"rabbitmq", "kafka", "minio"} <= set(services[name]["depends_on"]), name


def test_imgfleet_services_get_the_wiring_env(services: dict[str, dict[str, Any]]) -> None:
    for name in IMGFLEET_SERVICES:
        env = _env(services[name])
        missing = [var for var in REQUIRED_ENV if var not in env]
        assert not missing, f"{name}: {missing}"
        defaults = {k: _interpolate_defaults(v) for k, v in env.items()}
        assert defaults["IMGFLEET_STORAGE__KIND"] == "s3"
        assert defaults["IMGFLEET_BROKER__URL"].startswith("amqp://")
        assert defaults["IMGFLEET_STORAGE__S3_ENDPOINT_URL"] == "http://minio:9000"
        # Secrets come from the environment, with a local-only fallback.
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[secret].startswith("${" + secret), (name, secret)


def test_env_names_are_real_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.config import Settings

    env = {k: _interpolate_defaults(v) for k, v in _env(services["worker"]).items()}
    for var in env:
        if var.startswith("IMGFLEET_"):
            section, _, key = var.removeprefix("IMGFLEET_").lower().partition("__")
            assert section in Settings.model_fields, var
            section_model = Settings.model_fields[section].annotation
            assert key in section_model.model_fields, var  # type: ignore[union-attr]
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    assert settings.broker.kind == "rabbitmq"
    assert settings.storage.kind == "s3"
    assert settings.storage.s3_bucket == "imgfleet"


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


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_basics(name: str) -> None:
    pairs = _instructions(DOCKERFILES[name])
    stages = set()
    for keyword, args in pairs:
        if keyword == "FROM":
            parts = args.split()
            image = parts[0]
            assert image in stages or _is_pinned(image), f"{name}: FROM {image} not pinned"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    user = _last(pairs, "USER").split(":")[0]
    assert user not in ("root", "0"), name
    assert json.loads(_last(pairs, "ENTRYPOINT")) == ["imgfleet"]
    assert _last(pairs, "STOPSIGNAL") == "SIGTERM"


def test_worker_image_is_cuda_python311_with_gpu_extra() -> None:
    pairs = _instructions(DOCKERFILES["worker"])
    final_base = _last(pairs, "FROM").split()[0]
    assert final_base.startswith("nvidia/cuda:12.") and "runtime" in final_base
    runs = " ".join(args for kw, args in pairs if kw == "RUN")
    assert "python3.11" in runs
    assert ".[gpu]" in runs
    assert json.loads(_last(pairs, "CMD")) == ["work"]


def test_cpu_image_pins_the_same_torch_as_the_project() -> None:
    pairs = _instructions(DOCKERFILES["cpu"])
    assert _last(pairs, "FROM").split()[0].startswith("python:3.11")
    arg = _last(pairs, "ARG")
    assert arg.startswith("TORCH_VERSION=")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_pins = [d for d in project["dependencies"] if d.replace(" ", "").startswith("torch==")]
    assert torch_pins == [f"torch=={arg.partition('=')[2]}"]
    assert "download.pytorch.org/whl/cpu" in " ".join(a for k, a in pairs if k == "RUN")


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "tests", ".pytest_cache"} <= patterns
    # The images copy these; ignoring them would break the build.
    assert not {"pyproject.toml", "README.md", "common", "workers", "imgfleet"} & patterns
