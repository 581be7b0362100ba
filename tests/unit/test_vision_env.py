"""tests/vision (timm / open_clip families) run in their own venv, .venv-vision.

timm and open_clip need torchvision, which needs the torch build it was made for, so they
cannot live in the main .venv (CPU torch). This one test runs that folder there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
VISION_PYTHON = ROOT / ".venv-vision" / "bin" / "python"
SETUP = "scripts/setup-vision.sh"
TIMEOUT_S = 600


@pytest.mark.integration  # spawns a process: one long test, kept to one xdist worker
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_vision_families_pass_in_the_vision_venv() -> None:
    if not VISION_PYTHON.exists():
        require_service(".venv-vision (timm and open_clip)", f"create it with {SETUP}")
    command = [
        str(VISION_PYTHON),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",  # one process: this test already holds one of the suite's workers
        "-m",
        "vision",
        "tests/vision",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = [_text(exc.stdout), _text(exc.stderr)]
        pytest.fail(f"tests/vision ran past {TIMEOUT_S} s:\n{''.join(partial)[-20_000:]}")
    output = (result.stdout + result.stderr)[-20_000:]
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output}"
    assert " passed" in result.stdout, output  # it ran tests, not an empty collection
    print(output, file=sys.stderr)


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""
