"""The first pass of a run (the winning row of each repeated item), the kept batches, and
the snapshot's URLs, against plain-Python references."""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import producers.nightly.winners as winners_module
from common.identity import image_id_for
from common.storage.local import LocalStorage
from producers.nightly.kept import kept_batches, kept_images
from producers.nightly.snapshot import ImageSnapshot, SnapshotBuilder, load_snapshot
from producers.nightly.winners import ItemVersions, content_key, item_key


def test_winners_match_a_reference_across_spills_and_merges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(winners_module, "_BUFFER_ROWS", 37)  # many runs, many merges
    rng = np.random.default_rng(5)
    versions = ItemVersions()
    reference: dict[int, tuple[int, int, int]] = {}  # key -> (version, line, content)
    counts: dict[int, int] = {}
    for line in range(1, 3001):
        key = int(rng.integers(0, 800)) - 400  # negative keys too
        version = int(rng.integers(0, 4))
        content = int(rng.integers(0, 3))
        versions.add(key, version, line, content)
        counts[key] = counts.get(key, 0) + 1
        best = reference.get(key)
        if best is None or version > best[0]:  # newest version; the first of equals
            reference[key] = (version, line, content)
    winners = versions.finish()
    repeated = sorted(k for k, n in counts.items() if n > 1)
    assert winners.keys.tolist() == repeated
    got = zip(
        winners.versions.tolist(), winners.lines.tolist(), winners.contents.tolist(), strict=True
    )
    assert list(got) == [reference[k] for k in repeated]
    singles = [k for k, n in counts.items() if n == 1]
    assert (winners.find(np.array(singles)) == -1).all()
    assert winners.find(np.array(repeated)).tolist() == list(range(len(repeated)))


def test_first_pass_memory_per_item() -> None:
    """About 33 bytes per distinct item held; the merge at the end is the peak."""
    n = 300_000
    versions = ItemVersions()
    started_s = time.perf_counter()
    for i in range(n):
        versions.add(i * 7919 - n, 1, i + 1, 0)
    held = versions.nbytes
    tracemalloc.start()
    versions.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    elapsed_s = time.perf_counter() - started_s
    assert 32 * n <= held <= 34 * n
    assert peak < 120 * n, f"the last merge peaked at {peak / n:.0f} bytes per item"
    print(f"first pass: {held / n:.1f} B/item held, +{peak / n:.1f} B/item peak, {elapsed_s:.2f} s")


def test_keys_are_stable_and_tell_contents_apart() -> None:
    # item_key is stored in snapshots: the same on every host and in every version.
    assert item_key("sku-1") == item_key("sku-1") != item_key("sku-1 ")
    assert item_key("sku-1") == -8275479930499383687
    assert content_key(("a", "b"), None) != content_key(("ab",), None)
    assert content_key(("a",), None) != content_key(("a",), "etag")


def _snapshot(items: dict[str, int]) -> ImageSnapshot:
    builder = SnapshotBuilder()
    for item_id, images in items.items():
        builder.add(
            [item_id],
            [0] * images,
            [image_id_for(item_id, str(k)) for k in range(images)],
            list(range(images)),
            [3] * images,
            [f"http://x/{item_id}/{k}.jpg" for k in range(images)],
        )
    return builder.finish()


def test_kept_batches_hold_whole_items_and_every_url() -> None:
    previous = _snapshot({f"i{n}": 1 + n % 4 for n in range(40)})
    wanted = np.array([item_key(f"i{n}") for n in range(0, 40, 3)], np.int64)
    published = np.array([item_key("i0")], np.int64)  # published again by a row: not kept
    kept = kept_images(previous, wanted, published)
    expected = {(f"i{n}", k) for n in range(3, 40, 3) for k in range(1 + n % 4)}
    assert {(previous.item_id(i), int(previous.image_keys[i])) for i in kept} == expected
    builder = SnapshotBuilder()
    batches = list(kept_batches(previous, kept, builder, run_id="r", batch_size=5))
    seen: set[str] = set()
    for _, jobs in batches:
        items = {j.item_id for j in jobs}
        assert not items & seen, "an item split over two batches"
        seen |= items
        assert len(jobs) <= 5 or len(items) == 1
    jobs = [j for _, batch in batches for j in batch]
    assert {(j.item_id, int(j.image_key)) for j in jobs} == expected
    assert all(j.url == f"http://x/{j.item_id}/{j.image_key}.jpg" and j.version == 3 for j in jobs)
    assert [end for end, _ in batches][-1] == len(kept)
    again = builder.finish()  # one item-table row per item
    assert len(again) == len(kept) and len(again.item_offsets) - 1 == len(seen)


def test_a_format_1_snapshot_still_reads_without_urls(tmp_path: Path) -> None:
    """Snapshots of older versions: item keys come from the ids; kept images get no job."""
    new = _snapshot({"a": 2, "b": 1})
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array([1], np.int64),
        image_ids=new.image_ids,
        image_keys=new.image_keys,
        versions=new.versions,
        item_rows=new.item_rows,
        item_offsets=new.item_offsets,
        item_blob=new.item_blob,
    )
    storage = LocalStorage(tmp_path)
    storage.put("runs/old/images.npz", buffer.getvalue())
    old = load_snapshot(storage, "old")
    assert old is not None and old.item_keys is None
    assert old.item_keys_of_images().tolist() == new.item_keys_of_images().tolist()
    assert old.urls_at(np.arange(len(old))) == [None] * 3
    kept = kept_images(old, np.array([item_key("a")]), np.zeros(0, np.int64))
    builder = SnapshotBuilder()
    assert [jobs for _, jobs in kept_batches(old, kept, builder, run_id="r")] == [[]]
    assert len(builder.finish()) == 2  # still in the new snapshot: not deleted
