"""Which rows a catalogue run publishes: one per item (the newest version), ids as written,
and a rejected row keeps its item instead of deleting it (issue 21, D4-D6).

The last test goes end to end on the local broker: two runs (the second through the CLI),
one record per drained job written to segments as the workers would (the stand-in vector
is a function of the job's URL, so a served vector says which row an image came from), a
generation built from each run, and what search then serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from common.brokers.local.broker import LocalBroker
from common.identity import image_id_for
from common.schema import Job, Op
from common.storage.local import LocalStorage
from index.publish import build_generation
from index.search import Searcher
from producers.nightly.checkpoint import load_checkpoint
from producers.nightly.snapshot import load_snapshot
from producers.nightly.upserts import PublishReport, publish_catalogue
from tests.support.catalogue_factory import Written, write_catalogue
from tests.support.fleet import REPO_ROOT, local_env
from tests.support.segments import write_job_records
from tests.unit.producers.test_publish_run import (
    Crash,
    _assert_exactly_once,
    _drain,
    _dry_run,
    _run,
    crash_after,
)


def _catalogue(path: Path, rows: list[dict[str, Any] | str]) -> Written:
    lines = [r if isinstance(r, str) else orjson.dumps(r).decode() for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return Written(path, rows=len(rows))


def _row(item_id: str, urls: list[str], version: Any = 1) -> dict[str, Any]:
    return {"item_id": item_id, "image_urls": urls, "version": version}


def _by_image(jobs: list[Job]) -> dict[tuple[str, str], tuple[Op, str | None, int]]:
    """(item, key) -> (op, URL, version); one job per image."""
    out = {
        (j.item_id, j.image_key): (j.op, j.url if j.op is Op.UPSERT else None, j.version)
        for j in jobs
    }
    assert len(out) == len(jobs), "two jobs for one image"
    return out


U = Op.UPSERT


def _publish(tmp_path: Path, path: Path, **options: Any) -> PublishReport:
    """The rows of ``path`` published as run-1 to the local queue under ``tmp_path``."""

    async def publish() -> PublishReport:
        broker = LocalBroker(tmp_path / "queue.sqlite3")
        try:
            return await publish_catalogue(broker, path, "run-1", **options)
        finally:
            await broker.close()

    return asyncio.run(publish())


def test_a_repeated_item_publishes_only_its_newest_row(tmp_path: Path) -> None:
    path = _catalogue(
        tmp_path / "cat.jsonl",
        [
            _row("dup-up", ["http://x/up-v1-0.jpg"], 1),
            _row("dup-down", ["http://x/down-v2-0.jpg", "http://x/down-v2-1.jpg"], 2),
            _row("single", ["http://x/single.jpg"], 1),
            _row("dup-up", ["http://x/up-v2-0.jpg", "http://x/up-v2-1.jpg"], 2),
            _row("dup-down", ["http://x/down-v1-0.jpg"], 1),
            _row("same", ["http://x/same.jpg"], 3),
            _row("same", ["http://x/same.jpg"], 3),  # an exact repeat: counted, not rejected
            _row("clash", ["http://x/clash-a.jpg"], 4),
            _row("clash", ["http://x/clash-b.jpg"], 4),  # the same version, other URLs
        ],
    ).path
    rejects = tmp_path / "rejects.jsonl"
    report = _publish(tmp_path, path, batch_size=2, rejects_path=rejects)
    assert _by_image(asyncio.run(_drain(tmp_path))) == {
        ("dup-up", "0"): (U, "http://x/up-v2-0.jpg", 2),
        ("dup-up", "1"): (U, "http://x/up-v2-1.jpg", 2),
        ("dup-down", "0"): (U, "http://x/down-v2-0.jpg", 2),
        ("dup-down", "1"): (U, "http://x/down-v2-1.jpg", 2),
        ("single", "0"): (U, "http://x/single.jpg", 1),
        ("same", "0"): (U, "http://x/same.jpg", 3),
        ("clash", "0"): (U, "http://x/clash-a.jpg", 4),
    }
    assert (report.items, report.jobs, report.superseded_rows) == (5, 7, 2)
    assert (report.duplicate_images, report.rejected) == (1, 1)
    reject = orjson.loads(rejects.read_text())
    assert (reject["line"], reject["item_id"]) == (9, "clash")
    assert reject["reason"] == (
        "item 'clash': version 4 is also at line 8 with other image URLs or etag; line 8 is used"
    )


def test_padded_ids_are_rejected_not_merged_with_the_trimmed_id(tmp_path: Path) -> None:
    path = _catalogue(
        tmp_path / "cat.jsonl",
        [
            _row("  padded  ", ["http://x/padded-spaces.jpg"]),
            _row("padded", ["http://x/padded.jpg"]),
            _row("in side", ["http://x/inside.jpg"]),  # inner whitespace is part of the id
        ],
    ).path
    report = _publish(tmp_path, path)
    assert _by_image(asyncio.run(_drain(tmp_path))) == {
        ("padded", "0"): (U, "http://x/padded.jpg", 1),
        ("in side", "0"): (U, "http://x/inside.jpg", 1),
    }
    assert (report.rejected, report.duplicate_images) == (1, 0)
    [reject] = report.rejects
    assert reject.line == 1 and "starts or ends with whitespace: '  padded  '" in reject.reason


def test_a_rejected_row_keeps_its_item_and_never_trips_the_delete_guard(
    tmp_path: Path,
) -> None:
    """Run 2 rejects 5 of 10 items (a bad version): before the fix each became 2 deletes,
    50% of the images, and the guard stopped the run."""
    storage = LocalStorage(tmp_path / "store")
    urls = {i: [f"http://x/{i}/0.jpg", f"http://x/{i}/1.jpg"] for i in range(10)}
    first = _catalogue(tmp_path / "r1.jsonl", [_row(f"it-{i}", urls[i]) for i in range(10)])
    asyncio.run(_run(tmp_path, "night-1", first))
    asyncio.run(_drain(tmp_path))

    rows: list[dict[str, Any] | str] = [
        _row(f"it-{i}", [u + "?new" for u in urls[i]], 2 if i >= 5 else "2.0") for i in range(9)
    ]
    rows.append("{not json")  # a row naming no item: counted apart
    second = _catalogue(tmp_path / "r2.jsonl", rows)  # it-9 is gone
    estimate, deletes_info = _dry_run(storage, "night-2", second.path)
    assert (deletes_info["would_delete"], deletes_info["guard_trips"]) == (2, False)
    assert (estimate.kept_items, estimate.jobs) == (5, 18)
    report = asyncio.run(_run(tmp_path, "night-2", second))
    jobs = _by_image(asyncio.run(_drain(tmp_path)))
    kept = {(f"it-{i}", str(k)): (U, urls[i][k], 1) for i in range(5) for k in range(2)}
    new = {(f"it-{i}", str(k)): (U, urls[i][k] + "?new", 2) for i in range(5, 9) for k in range(2)}
    gone = {("it-9", str(k)): (Op.DELETE, None, 1) for k in range(2)}
    assert jobs == kept | new | gone
    assert (report.deleted, report.kept_items, report.kept_images) == (2, 5, 10)
    assert (report.rejected, report.rejected_unattributed, report.jobs) == (6, 1, 18)
    # The kept images are in run 2's snapshot: a later run still knows (and can delete) them.
    snapshot = load_snapshot(storage, "night-2")
    assert snapshot is not None and len(snapshot) == 18
    third = _catalogue(tmp_path / "r3.jsonl", [_row(f"it-{i}", urls[i], 3) for i in range(1, 9)])
    asyncio.run(_run(tmp_path, "night-3", third))
    jobs = _by_image(asyncio.run(_drain(tmp_path)))
    deletes = {k: v for k, v in jobs.items() if v[0] is Op.DELETE}
    assert deletes == {("it-0", "0"): (Op.DELETE, None, 1), ("it-0", "1"): (Op.DELETE, None, 1)}


def test_resume_after_a_crash_makes_the_same_choices(tmp_path: Path) -> None:
    """Crashes while the rows go out (items listed at two versions) and while the kept
    items go out; each resumed run publishes exactly the jobs of an uninterrupted one."""
    first = write_catalogue(tmp_path / "first.jsonl", 3000)
    asyncio.run(_run(tmp_path, "night-1", first))
    asyncio.run(_drain(tmp_path))
    bad = set(range(1, 3000, 7))
    second = write_catalogue(tmp_path / "second.jsonl", 3000, version=2, stale_every=5, drop=bad)
    with second.path.open("ab") as fh:  # the items of `bad` come back as rejected rows
        for i in sorted(bad):
            fh.write(orjson.dumps(_row(f"sku-{i:07d}", ["http://x/y.jpg"], "2.0")) + b"\n")
    kept = Written(
        first.path, images={i: v for i, v in first.images.items() if int(v[0][4:]) in bad}
    )
    assert second.stale_rows > 0 and kept.images
    for crash_at in (3000, len(second.images) + len(kept.images) // 2):
        run_id = f"night-2-at-{crash_at}"
        with pytest.raises(Crash):
            asyncio.run(
                _run(
                    tmp_path,
                    run_id,
                    second,
                    on_confirmed=crash_after(crash_at),
                    checkpoint_interval_s=0.0,
                    batch_size=50,
                )
            )
        checkpoint = load_checkpoint(LocalStorage(tmp_path / "store"), run_id)
        assert checkpoint is not None and checkpoint.jobs_confirmed > 0
        if crash_at > len(second.images):
            assert checkpoint.kept_confirmed > 0, "the crash was not in the kept step"
        report = asyncio.run(_run(tmp_path, run_id, second, resume=True, batch_size=50))
        jobs = asyncio.run(_drain(tmp_path))
        _assert_exactly_once(jobs, second.job_ids(run_id) | kept.job_ids(run_id))
        for job in jobs:
            if job.image_id in second.urls:
                assert (job.url, job.version) == (second.urls[job.image_id], 2)
            else:
                assert (job.url, job.version) == (first.urls[job.image_id], 1)
        assert (report.superseded_rows, report.kept_items) == (second.stale_rows, len(bad))
        assert report.deleted == 0 and report.jobs == len(second.images) + len(kept.images)


def _stand_in_vector(url: str) -> np.ndarray:
    """What a worker would embed for the image at ``url``: a function of the URL."""
    seed = int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")
    vector = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _index(store: Path, jobs: list[Job], run_id: str) -> Searcher:
    """One segment record per job, as the workers would write them; build from the run."""
    storage = LocalStorage(store)

    def vector_of(job: Job) -> np.ndarray | None:
        return None if job.op is Op.DELETE or job.url is None else _stand_in_vector(job.url)

    write_job_records(storage, 2, f"w-{run_id}", jobs, vector_of)
    build_generation(storage, 2, run_id=run_id)
    return Searcher(storage)


def _served(searcher: Searcher, item_id: str) -> list[str | None]:
    """Which URL each served image of ``item_id`` was embedded from (by its vector)."""
    candidates = [u for u in _URLS if u is not None]
    out: list[str | None] = []
    for image_id in searcher.images_of_item(item_id).tolist():
        vector = searcher.vector_of(int(image_id))
        assert vector is not None
        match = [u for u in candidates if np.allclose(vector, _stand_in_vector(u), atol=1e-2)]
        out.append(match[0] if len(match) == 1 else None)
    return sorted(out, key=str)


_URLS = [f"http://x/{name}.jpg" for name in ("up1", "up1b", "up2a", "up2b", "v0", "v1", "v2")]
_URLS += [f"http://x/{name}.jpg" for name in ("pad", "padded", "gone", "other")]
# Enough other items that the deletes stay under the guard's 20% before the fix too.
_FILLERS = [_row(f"fill-{n}", [f"http://x/fill-{n}.jpg"]) for n in range(20)]


def test_end_to_end_two_runs_then_the_built_index(tmp_path: Path) -> None:
    x = "http://x/{}.jpg".format
    first = _catalogue(
        tmp_path / "r1.jsonl",
        [
            _row("dup-up", [x("up1")], 1),
            _row("victim", [x("v0"), x("v1")], 1),
            _row("padded", [x("padded")], 1),
            _row("gone", [x("gone")], 1),
            _row("other", [x("other")], 1),
            *_FILLERS,
        ],
    )
    asyncio.run(_run(tmp_path, "night-1", first))
    searcher = _index(tmp_path / "store", asyncio.run(_drain(tmp_path)), "night-1")
    assert _served(searcher, "victim") == [x("v0"), x("v1")]

    second = _catalogue(
        tmp_path / "r2.jsonl",
        [
            _row("dup-up", [x("up1b")], 1),
            _row("victim", [x("v2")], "2.0"),  # rejected: keeps the item as it was
            _row("  padded  ", [x("pad")], 1),  # rejected: not merged into "padded"
            _row("padded", [x("padded")], 1),
            _row("dup-up", [x("up2a"), x("up2b")], 2),
            _row("other", [x("other")], 1),
            *_FILLERS,
        ],
    )
    env = local_env(tmp_path, IMGFLEET_PRODUCER__CATALOGUE_NAME="shop")
    cmd = [sys.executable, "-m", "imgfleet", "produce", "catalogue", str(second.path)]
    out = subprocess.run(
        [*cmd, "--run-id", "night-2", "--json"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    jobs = asyncio.run(_drain(tmp_path))
    assert {(j.item_id, j.image_key) for j in jobs if j.op is Op.DELETE} == {("gone", "0")}

    searcher = _index(tmp_path / "store", jobs, "night-2")
    assert _served(searcher, "dup-up") == [x("up2a"), x("up2b")]  # one row: the newest
    assert _served(searcher, "padded") == [x("padded")]  # its own image, not the padded row's
    assert _served(searcher, "  padded  ") == []
    assert _served(searcher, "victim") == [x("v0"), x("v1")]  # kept as run 1 had it
    assert _served(searcher, "gone") == []
    assert searcher.count() == 6 + len(_FILLERS)
    assert image_id_for("victim", "0") in searcher.images_of_item("victim").tolist()
    summary = json.loads(out.stdout.decode().splitlines()[-1])
    assert (summary["deleted"], summary["kept_items"], summary["kept_images"]) == (1, 1, 2)
    assert (summary["rejected"], summary["superseded_rows"]) == (2, 1)
