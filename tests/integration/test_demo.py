"""The README's first command, end to end, on a small catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fleet import REPO_ROOT

pytestmark = pytest.mark.integration


def test_demo_accounts_for_every_job_and_finds_near_duplicates(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgfleet",
            "demo",
            "--items",
            "40",
            "--json",
            "--workdir",
            str(tmp_path / "demo"),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=300,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out + proc.stderr.decode())[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["jobs"] > 40
    assert summary["indexed"] + sum(summary["dead_lettered"].values()) == summary["jobs"]
    # Each broken kind the corpus plants is dead-lettered with its own reason.
    for reason in ("empty", "not_an_image", "http_404"):
        assert summary["dead_lettered"].get(reason, 0) >= 1, summary
    assert summary["unexpected_outcomes"] == []
    assert summary["near_duplicate_pairs"] >= 3
    assert summary["near_duplicate_top1"] >= 0.9
    assert summary["images_per_s"] > 0
    assert "imgfleet demo summary" in out


def test_inspect_reports_each_input(tmp_path: Path) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGBA", (300, 200), (10, 200, 30, 128)).save(good)
    html = tmp_path / "page.jpg"
    html.write_text("<!DOCTYPE html><html></html>")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgfleet",
            "inspect",
            "--json",
            str(good),
            str(html),
            str(tmp_path / "missing.jpg"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1  # not every input decodes
    reports = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [(r["status"], r["reason"], r["format"]) for r in reports] == [
        ("ok", None, "png"),
        ("failed", "not_an_image", None),
        ("failed", "http_404", None),
    ]
    assert (reports[0]["width"], reports[0]["height"]) == (300, 200)
