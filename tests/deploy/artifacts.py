"""The deployment artifacts the checks in tests/deploy read, and the parsers they share.

No Docker engine or Kubernetes cluster runs on the development machines or in CI, so the
files are checked by parsing them, against the code they deploy: queue and topic names
come from common/brokers/rabbitmq/topology.py and common/brokers/kafka/topics.py, ports,
paths and the drain deadline from common/config.py, metric names from
common/observability/metrics.py, CLI arguments from the imgfleet argument parser, and
every configuration example is loaded with load_settings.
The mistakes caught there (a floating tag, a root container, a renamed queue, a probe on
the wrong port, a metric that does not exist) otherwise surface only in a deploy.

One module per artifact kind: test_compose.py, test_images.py (Dockerfiles, .dockerignore,
constraints), test_k8s.py, test_keda.py, test_observability.py (Prometheus, Grafana,
alerts, metric names) and test_scripts.py (what the images carry: the healthcheck and
nightly-run.sh). The loaded files themselves are fixtures in conftest.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import Settings, load_settings
from tests.support.fleet import REPO_ROOT

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


# -- parsers ---------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    # A ":" inside a registry host (host:port/name) is not a tag.
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def cli_accepts(argv: list[str]) -> None:
    """Parse argv with the real imgfleet parser: a misspelt command or option fails here."""
    from imgfleet.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports and exits on an unknown argument
        pytest.fail(f"imgfleet rejects {argv}: exit {exc.code}")


# -- Dockerfiles -----------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
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


def last_instruction(pairs: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in pairs if kw == keyword]
    assert values, f"no {keyword}"
    return values[-1]


def build_args(pairs: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, args in pairs:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            found[name] = value
    return found


def run_instructions(pairs: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in pairs if keyword == "RUN"]


def dockerfile_copies(name: str) -> dict[str, str]:
    """Build-context COPY sources -> destinations (stage copies left out)."""
    copies = {}
    for keyword, args in instructions(DOCKERFILES[name]):
        if keyword != "COPY":
            continue
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        for source in paths[:-1]:
            copies[source] = paths[-1]
    return copies


# -- Kubernetes manifests --------------------------------------------------------------


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest["kind"] == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return manifest["spec"]["template"]["spec"]


def workloads(manifests: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for (kind, _), m in manifests.items() if kind in ("Deployment", "CronJob")]


def container_of(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(manifest)["containers"]
    return container


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def probe(container: dict[str, Any], kind: str) -> tuple[str, int]:
    get = container[kind]["httpGet"]
    return get["path"], port_number(container, get["port"])


def configmap_settings(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> Settings:
    toml_text = manifests[("ConfigMap", "imgfleet-config")]["data"]["imgfleet.toml"]
    path = tmp_path / "imgfleet.toml"
    path.write_text(toml_text)
    return load_settings(path)
