"""`imgfleet search --image` as a person runs it: hits on stdout and nothing else; no INFO
lines from loading the model, no PyTorch warning about read-only arrays."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.storage.local import LocalStorage
from index.publish import build_generation
from index.segments import SegmentWriter, VectorRecord
from tests.support.fleet import REPO_ROOT
from tests.unit.imgfleet.test_cli_usage import clean_env
from tests.unit.imgfleet.tiny_model_cli import TINY_DIM

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210)}


def test_search_by_image_prints_hits_and_no_noise(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    writer = SegmentWriter(storage, 2, "w-test")
    for n, (item, rgb) in enumerate(COLOURS.items()):
        vector = np.asarray(rgb, np.float32)
        vector /= np.linalg.norm(vector)
        assert vector.shape == (TINY_DIM,)
        writer.add(VectorRecord(n + 1, item, 1, "h", "mean-colour-1", vector))
    writer.flush()
    build_generation(storage, 2, grace_s=0.0)
    query = tmp_path / "query.jpg"  # Pillow decodes JPEGs into read-only arrays
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (25, 190, 45)).save(buffer, "JPEG")
    query.write_bytes(buffer.getvalue())

    def search() -> subprocess.CompletedProcess[str]:
        argv = ["search", "--image", str(query), "-k", "2"]
        return subprocess.run(
            [sys.executable, "-m", "tests.unit.imgfleet.tiny_model_cli", *argv],
            cwd=REPO_ROOT,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )

    found = search()
    assert found.returncode == 0, found.stderr
    assert found.stdout.split()[2] == "green"  # rank, score, item of the best hit
    # Was: INFO embedding_backend and embedder_ready, and a warning (logged at WARNING,
    # so shown here too): "The given NumPy array is not writable ...".
    assert found.stderr == ""
