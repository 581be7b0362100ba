"""The demo corpus: deterministic, every kind present, broken files really broken."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from imgfleet.demo.corpus import ALL_KINDS, Corpus, make_corpus

N_ITEMS = 40
BASE_URL = "http://127.0.0.1:9999"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("corpus"), N_ITEMS, seed=3)


def _file_bytes(corpus: Corpus) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(corpus.images_dir.iterdir())}


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = make_corpus(tmp_path / "a", 24, seed=11)
    second = make_corpus(tmp_path / "b", 24, seed=11)
    other = make_corpus(tmp_path / "c", 24, seed=12)
    assert first.items == second.items
    assert first.near_duplicates == second.near_duplicates
    assert _file_bytes(first) == _file_bytes(second)
    assert _file_bytes(first) != _file_bytes(other)


def test_every_kind_present(corpus: Corpus) -> None:
    counts = corpus.kind_counts()
    assert set(counts) == set(ALL_KINDS), counts
    primaries = [i for i in corpus.items if i.item_id not in corpus.near_duplicates]
    assert len(primaries) == N_ITEMS
    assert any(len(item.images) == 2 for item in primaries)
    assert all([im.image_key for im in item.images] in (["0"], ["0", "1"]) for item in primaries)


def test_every_kind_present_at_minimum_size(tmp_path: Path) -> None:
    assert set(make_corpus(tmp_path, 20, seed=0).kind_counts()) == set(ALL_KINDS)


def test_item_ids_are_unique(corpus: Corpus) -> None:
    ids = [item.item_id for item in corpus.items]
    assert len(ids) == len(set(ids))


def test_good_images_decode_with_expected_formats(corpus: Corpus) -> None:
    want = {"jpeg": "JPEG", "progressive": "JPEG", "png": "PNG", "webp": "WEBP"}
    for item in corpus.items:
        for image in item.images:
            if image.kind not in want:
                continue
            with Image.open(corpus.path_of(image)) as img:
                img.load()
                assert img.format == want[image.kind], image
                if item.item_id not in corpus.near_duplicates:
                    assert min(img.size) >= 640 and max(img.size) <= 1600, (image, img.size)
                if image.kind == "progressive":
                    assert img.info.get("progressive") or img.info.get("progression")
                if image.kind == "png":
                    assert img.mode == "RGBA"
                    assert img.getextrema()[3][0] == 0  # a transparent background


def test_broken_files_are_really_broken(corpus: Corpus) -> None:
    by_kind = {im.kind: im for item in corpus.items for im in item.images}
    assert corpus.path_of(by_kind["empty"]).stat().st_size == 0
    assert (
        corpus.path_of(by_kind["html"]).read_bytes().lstrip().lower().startswith(b"<!doctype html")
    )
    assert not corpus.path_of(by_kind["missing"]).exists()
    truncated = corpus.path_of(by_kind["truncated"]).read_bytes()
    assert truncated[:3] == b"\xff\xd8\xff"  # still looks like a JPEG
    assert not truncated.endswith(b"\xff\xd9")
    with pytest.raises(OSError, match="truncated"), Image.open(io.BytesIO(truncated)) as img:
        img.load()


def test_expected_failures_cover_broken_images_only(corpus: Corpus) -> None:
    expected = corpus.expected_failures()
    broken = {
        f"{item.item_id}/{im.image_key}": im.kind
        for item in corpus.items
        for im in item.images
        if im.kind in ("truncated", "empty", "html", "missing")
    }
    assert set(expected) == set(broken)
    reason_by_kind = {
        "truncated": "truncated",
        "empty": "empty",
        "html": "not_an_image",
        "missing": "http_404",
    }
    assert all(expected[key] == reason_by_kind[kind] for key, kind in broken.items())


def test_near_duplicates_point_at_real_good_items(corpus: Corpus) -> None:
    items = {item.item_id: item for item in corpus.items}
    assert corpus.near_duplicates
    for dup_id, original_id in corpus.near_duplicates.items():
        assert dup_id == f"dup-{original_id}"
        original = items[original_id]
        assert original.images[0].kind in ("jpeg", "progressive", "png", "webp")
        dup_image = items[dup_id].images[0]
        assert dup_image.kind == "jpeg"
        with (
            Image.open(corpus.path_of(original.images[0])) as orig,
            Image.open(corpus.path_of(dup_image)) as dup,
        ):
            ratio = dup.width / orig.width
            assert 0.49 <= ratio <= 0.81, ratio
            assert dup.format == "JPEG"


def test_jsonl_rows_parse_back(corpus: Corpus, tmp_path: Path) -> None:
    path = corpus.write_catalogue_jsonl(tmp_path / "cat.jsonl", BASE_URL + "/")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["item_id"] for r in rows] == [i.item_id for i in corpus.items]
    for row, item in zip(rows, corpus.items, strict=True):
        assert row["version"] == 1
        assert row["image_urls"] == [f"{BASE_URL}/images/{im.filename}" for im in item.images]


def test_csv_rows_parse_back(corpus: Corpus, tmp_path: Path) -> None:
    path = corpus.write_catalogue_csv(tmp_path / "cat.csv", BASE_URL)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["item_id", "image_urls", "version"]
    assert len(rows) == len(corpus.items)
    for row, item in zip(rows, corpus.items, strict=True):
        assert row["item_id"] == item.item_id
        assert row["version"] == "1"
        assert row["image_urls"].split("|") == [
            f"{BASE_URL}/images/{im.filename}" for im in item.images
        ]
