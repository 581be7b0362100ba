"""bench/quality.py's data set and scoring: every edit does what it says, the queries are
deterministic, and top-1 / recall@k are right where the ranks are known. No model loads."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.support.near_duplicates import (
    CANDIDATES,
    CENTRE_CROP_AREA,
    CORNER_CROP_AREA,
    EDITS,
    PAD_MARGIN_RANGE,
    Edit,
    Original,
    build_queries,
    corner_window,
    encode_jpeg,
    figures_by_group,
    load_originals,
    query_rng,
    retrieval_figures,
    target_ranks,
)

EDITS_BY_NAME = {edit.name: edit for edit in EDITS}


def _photo(width: int = 200, height: int = 150) -> Image.Image:
    """Colourful, asymmetric, no white or black: a fill or a mirror cannot go unnoticed."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [40 + 170 * xx / width, 40 + 170 * yy / height, 120 + 60 * np.sin(xx / 9.0)], axis=-1
    )
    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 30, 90, 80), fill=(200, 60, 50))
    draw.rectangle((130, 90, 180, 140), fill=(50, 70, 190))
    return image


def _apply(name: str, image: Image.Image, seed: int = 0) -> Image.Image:
    return EDITS_BY_NAME[name].apply(image, query_rng(seed, "photo", name))


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_at_least_fifteen_edits_with_unique_names() -> None:
    names = [edit.name for edit in EDITS]
    assert len(names) >= 15
    assert len(set(names)) == len(names)
    assert sum(len(edit.steps) > 1 for edit in EDITS) >= 3  # combinations of two or three


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.name)
def test_every_edit_gives_a_valid_image_that_differs(edit: Edit) -> None:
    photo = _photo()
    out = edit.apply(photo, query_rng(0, "photo", edit.name))
    assert out.mode == "RGB" and out.width > 0 and out.height > 0
    if out.size == photo.size:
        assert np.any(_arr(out) != _arr(photo))
    # It survives the JPEG round trip a query goes through.
    data = encode_jpeg(out)
    assert data[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(data)).size == out.size


def test_edits_leave_the_input_untouched() -> None:
    photo = _photo()
    before = _arr(photo).copy()
    for edit in EDITS:
        edit.apply(photo, query_rng(0, "photo", edit.name))
    assert np.array_equal(_arr(photo), before)


def test_flip_is_a_mirror() -> None:
    photo = _photo()
    assert np.array_equal(_arr(_apply("flip", photo)), np.fliplr(_arr(photo)))


@pytest.mark.parametrize("seed", range(4))
def test_pad_square_is_square_with_white_margins(seed: int) -> None:
    photo = _photo()
    out = _apply("pad_square", photo, seed)
    assert out.width == out.height
    long_side = max(photo.size)
    margin = (out.width - long_side) // 2
    low, high = PAD_MARGIN_RANGE
    assert math.floor(low * long_side) <= margin <= math.ceil(high * long_side)
    pixels = _arr(out)
    left = (out.width - photo.width) // 2
    top = (out.height - photo.height) // 2
    assert np.array_equal(pixels[top : top + photo.height, left : left + photo.width], _arr(photo))
    mask = np.ones(pixels.shape[:2], bool)
    mask[top : top + photo.height, left : left + photo.width] = False
    assert np.all(pixels[mask] == 255)


def test_centre_crop_keeps_the_stated_area_in_the_middle() -> None:
    photo = _photo()
    out = _apply("crop_centre_70", photo)
    assert out.width * out.height / (photo.width * photo.height) == pytest.approx(
        CENTRE_CROP_AREA, abs=0.01
    )
    assert out.width / out.height == pytest.approx(photo.width / photo.height, rel=0.02)
    left, top = (photo.width - out.width) // 2, (photo.height - out.height) // 2
    expected = _arr(photo)[top : top + out.height, left : left + out.width]
    assert np.array_equal(_arr(out), expected)


def test_corner_crop_keeps_half_the_area_near_a_corner() -> None:
    photo = _photo()
    corners = set()
    for seed in range(24):
        out = _apply("crop_corner_50", photo, seed)
        box = corner_window(photo.size, query_rng(seed, "photo", "crop_corner_50"))
        left, top, right, bottom = box
        assert (right - left, bottom - top) == out.size
        assert out.width * out.height / (photo.width * photo.height) == pytest.approx(
            CORNER_CROP_AREA, abs=0.01
        )
        assert np.array_equal(_arr(out), _arr(photo)[top:bottom, left:right])
        free_x, free_y = photo.width - out.width, photo.height - out.height
        # Within a quarter of the free room from one corner, never centred.
        near_left, near_top = left <= free_x * 0.25 + 1, top <= free_y * 0.25 + 1
        assert near_left or left >= free_x * 0.75 - 1
        assert near_top or top >= free_y * 0.75 - 1
        corners.add((near_left, near_top))
    assert len(corners) == 4


def test_grayscale_has_equal_channels() -> None:
    pixels = _arr(_apply("grayscale", _photo())).astype(int)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 1], pixels[..., 2])


def test_rotations_fill_white_or_crop_the_fill_away() -> None:
    photo = _photo()
    filled = _apply("rotate_fill", photo)
    assert filled.width > photo.width and filled.height > photo.height
    assert _arr(filled)[0, 0].tolist() == [255, 255, 255]
    cropped = _apply("rotate_crop", photo)
    assert cropped.width < photo.width and cropped.height < photo.height
    assert cropped.width / cropped.height == pytest.approx(photo.width / photo.height, rel=0.03)
    corners = _arr(cropped)[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
    # The photo has no black; the rotation's fill is black: none of it may remain.
    assert np.all(corners.sum(axis=1) > 90)


def test_caption_adds_a_strip_and_jitter_keeps_the_size() -> None:
    photo = _photo()
    captioned = _apply("caption", photo)
    assert captioned.width == photo.width
    assert 0.12 * photo.height - 1 <= captioned.height - photo.height <= 0.20 * photo.height + 1
    jittered = _apply("jitter", photo)
    assert jittered.size == photo.size
    # At least 15% on brightness and contrast: a visible change on average.
    assert np.abs(_arr(jittered).astype(int) - _arr(photo).astype(int)).mean() > 5


def test_recompress_halves_the_size() -> None:
    photo = _photo()
    out = _apply("recompress_half_q70", photo)
    assert out.size == (photo.width // 2, photo.height // 2)


def _originals() -> list[Original]:
    return [Original("a", "test", _photo()), Original("b", "test", _photo(160, 220))]


def test_queries_are_deterministic_for_a_seed() -> None:
    originals = _originals()
    first = build_queries(originals, EDITS, seeds=(3,))
    again = build_queries(originals, EDITS, seeds=(3,), workers=2)
    assert first == again
    assert [(q.original, q.edit) for q in first] == [
        (i, e.name) for e in EDITS for i in range(len(originals))
    ]
    other = build_queries(originals, EDITS, seeds=(4,))
    assert [q.data for q in other] != [q.data for q in first]
    # An edit's queries do not depend on which other edits are in the run.
    some = [EDITS_BY_NAME["watermark"], EDITS_BY_NAME["pad_square"]]
    subset = build_queries(originals, some, seeds=(3,))
    by_key = {(q.original, q.edit): q.data for q in first}
    assert all(by_key[(q.original, q.edit)] == q.data for q in subset)


def test_target_ranks_on_known_matrix() -> None:
    similarity = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.0, 0.5],  # target 0 first: rank 0
            [0.8, 0.7, 0.9, 0.1, 0.0, 0.2],  # target 1: 0.8 and 0.9 above: rank 2
            [0.1, 0.2, 0.6, 0.6, 0.3, 0.0],  # target 2 ties with 3: counts against, rank 1
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # target 5 last: rank 5
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied, target 4: rank 5
        ]
    )
    targets = [0, 1, 2, 5, 4]
    ranks = target_ranks(similarity, targets)
    assert ranks.tolist() == [0, 2, 1, 5, 5]
    figures = retrieval_figures(ranks, ks=(1, 2, 3, 5, 6))
    # rank < k: k=1 {0}, k=2 {0, 1}, k=3 {0, 1, 2}, k=5 the same, k=6 all five.
    assert figures == {"top1": 0.2, "recall2": 0.4, "recall3": 0.6, "recall5": 0.6, "recall6": 1.0}
    # Hamming-style similarities (minus distances) rank the same way.
    assert target_ranks(-np.array([[3, 0, 3]]), [0]).tolist() == [2]
    with pytest.raises(ValueError):
        target_ranks(similarity, [0, 1])


def test_figures_by_group() -> None:
    ranks = np.array([0, 3, 0, 0, 7, 1])
    groups = ["flip", "crop", "flip", "crop", "crop", "flip"]
    by = figures_by_group(ranks, groups)
    assert list(by) == ["flip", "crop"]
    assert by["flip"] == pytest.approx({"top1": 2 / 3, "recall5": 1.0})
    assert by["crop"] == pytest.approx({"top1": 1 / 3, "recall5": 2 / 3})


def test_candidate_table_and_offline_originals() -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    names = [c.name for c in CANDIDATES]
    assert len(set(names)) == len(names)
    used = [c for c in CANDIDATES if not c.dropped]
    assert 15 <= len(used) <= 25
    originals, skipped = load_originals()
    assert len(originals) + len(skipped) == len(used)
    assert len(originals) >= 12
    for original in originals:
        assert original.image.mode == "RGB"
        assert min(original.image.size) >= 128
