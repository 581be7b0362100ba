"""The images: Dockerfiles, the pinned constraints they install with, and .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.artifacts import (
    DEPLOY,
    DOCKERFILES,
    REPO_ROOT,
    build_args,
    dockerfile_copies,
    instructions,
    is_pinned,
    last_instruction,
    run_instructions,
)


def _project_torch_version() -> str:
    """The images' torch: the constraints' pin, inside the project's torch range."""
    (pin,) = [
        line
        for line in (DEPLOY / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    version = pin.removeprefix("torch==")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (wanted,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch"]
    assert wanted.specifier.contains(version), (wanted, version)
    return version


def test_pinning_rule_itself() -> None:
    assert is_pinned("apache/kafka:3.9.0")
    assert is_pinned("registry.local:5000/imgfleet@sha256:" + "0" * 64)
    assert not is_pinned("minio/minio")
    assert not is_pinned("minio/minio:latest")
    assert not is_pinned("registry.local:5000/minio")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_basics(name: str) -> None:
    pairs = instructions(DOCKERFILES[name])
    stages: list[str] = []
    for keyword, args in pairs:
        if keyword == "FROM":
            parts = args.split()
            image = parts[0]
            assert image in stages or is_pinned(image), f"{name}: FROM {image} not pinned"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.append(parts[2])
        if keyword == "COPY":
            for option in re.findall(r"--from=(\S+)", args):
                assert option in stages, f"{name}: COPY --from={option} is not an earlier stage"
    assert len(stages) >= 2, f"{name}: build and runtime should be separate stages"
    # A numeric, non-root user: Kubernetes can verify runAsNonRoot only against a UID.
    user = last_instruction(pairs, "USER").split(":")[0]
    assert user.isdigit() and int(user) > 0, name
    assert json.loads(last_instruction(pairs, "ENTRYPOINT")) == ["imgfleet"]
    assert last_instruction(pairs, "STOPSIGNAL") == "SIGTERM"
    healthcheck = last_instruction(pairs, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "imgfleet-healthcheck"
    assert f"/usr/local/bin/{command[0]}" in dockerfile_copies(name).values()
    # A wheel-building stage, then installs that never leave pip's cache in a layer and
    # always go through the pinned constraints.
    assert any(r.startswith("pip wheel ") for r in run_instructions(pairs)), name
    for run in run_instructions(pairs):
        for command_text in re.split(r"&&|;", run):
            words = command_text.split()
            if words[:2] == ["pip", "install"]:
                assert "--no-cache-dir" in words, f"{name}: {command_text}"
                assert "--constraint" in words, f"{name}: {command_text}"


def test_worker_image_is_cuda_python311_with_the_gpu_extra() -> None:
    pairs = instructions(DOCKERFILES["worker"])
    final_base = last_instruction(pairs, "FROM").split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", final_base)
    args = build_args(pairs)
    assert re.fullmatch(r"3\.11\.\d+", args["PYTHON_VERSION"])
    runs = " ".join(run_instructions(pairs))
    assert "[gpu,models]" in runs
    # The CUDA build of torch from the PyTorch index, the same version as the project's.
    assert f"https://download.pytorch.org/whl/${{{'TORCH_CUDA'}}}" in runs
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"])
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in runs
    assert args["TORCH_VERSION"] == _project_torch_version()
    # The CUDA major of the base image and of the torch build agree.
    assert final_base.split(":")[1].split(".")[0] == args["TORCH_CUDA"][2:-1]
    assert json.loads(last_instruction(pairs, "CMD")) == ["work"]


def test_cpu_image_is_slim_python311_with_cpu_torch() -> None:
    pairs = instructions(DOCKERFILES["cpu"])
    final_base = last_instruction(pairs, "FROM").split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final_base)
    runs = " ".join(run_instructions(pairs))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert '"torch==${TORCH_VERSION}+cpu"' in runs
    assert build_args(pairs)["TORCH_VERSION"] == _project_torch_version()
    assert "[gpu]" not in runs


def test_constraints_pin_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(spec)
        for extra in ("gpu", "models")
        for spec in [*project["dependencies"], *project["optional-dependencies"][extra]]
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
        for source in dockerfile_copies(name):
            assert (REPO_ROOT / source).exists(), f"{name}: COPY {source} does not exist"
            assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert ignored("deploy/config/secrets.env")
    assert ignored("tests/deploy/test_images.py")
