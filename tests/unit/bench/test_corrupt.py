"""bench/robustness.py's corpus and scoring: the builder is deterministic, every damage
does what its record says (checked against the bytes, not against the builder's own
parsers where a format is simple enough to read here), and the union / ratio arithmetic
is right on a table made by hand. No decoder runs: only Pillow reads headers."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import PurePath

import pytest
from PIL import Image

from bench.support.corrupt import (
    BASES,
    CONTENDERS,
    CRASH,
    DAMAGE_KINDS,
    DECODED,
    ERROR,
    HANG,
    NOT_ATTEMPTED,
    PIXEL_CAP,
    REFUSED,
    SUFFIXES,
    CorpusSpec,
    CorruptFile,
    build_corpus,
    family,
    jpeg_layout,
    regions,
    score,
)

# One source image of at most 300 px: every code path of the builder, in well under a
# second (the --quick corpus takes ~3 s).
SMALL = CorpusSpec(
    sources=1, truncations=4, header_flips=2, data_flips=3, bomb_dims=((30000, 30000),),
    max_side=300,
)  # fmt: skip
KNOWN_PNG_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"gAMA", b"pHYs", b"tEXt", b"tRNS"}


@pytest.fixture(scope="module")
def corpus() -> list[CorruptFile]:
    return build_corpus(3, SMALL)


@pytest.fixture(scope="module")
def by_name(corpus: list[CorruptFile]) -> dict[str, CorruptFile]:
    return {f.name: f for f in corpus}


def _of(corpus: list[CorruptFile], damage: str) -> list[CorruptFile]:
    files = [f for f in corpus if f.damage == damage]
    assert files, damage
    return files


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, stored CRC) of every complete chunk, read here byte by byte."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        out.append((data[pos + 4 : pos + 8], body, crc))
        pos += 12 + length
    assert pos == len(data)
    return out


def _crc_mismatches(data: bytes) -> list[bytes]:
    return [t for t, body, crc in _chunks(data) if zlib.crc32(t + body) != crc]


def _markers(data: bytes, marker: int) -> int:
    segments, _ = jpeg_layout(data)
    return sum(1 for s in segments if s.marker == marker)


def test_same_seed_same_corpus_other_seed_other_bytes(corpus: list[CorruptFile]) -> None:
    again = build_corpus(3, SMALL)
    assert [f.record() for f in again] == [f.record() for f in corpus]
    assert [f.data for f in again] == [f.data for f in corpus]
    other = build_corpus(4, SMALL)
    assert [f.data for f in other if f.damage == "truncate"] != [
        f.data for f in corpus if f.damage == "truncate"
    ]


def test_every_damage_kind_and_base_appears(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    assert {f.damage for f in corpus} == set(DAMAGE_KINDS)
    assert {f.base for f in corpus if f.damage == "clean"} == set(BASES)
    assert len(by_name) == len(corpus)
    for f in corpus:
        assert f.is_bomb == (f.damage == "bomb")
        if f.parent is not None:
            assert by_name[f.parent].damage == "clean" and by_name[f.parent].base == f.base


def test_clean_files_open_as_their_base(corpus: list[CorruptFile]) -> None:
    modes = {"png-rgba": "RGBA", "png-palette": "P", "png-grey16": "I;16", "webp-alpha": "RGBA"}
    for f in _of(corpus, "clean"):
        with Image.open(io.BytesIO(f.data)) as img:
            assert img.format.lower() == family(f.base)
            assert min(img.size) >= 200 and max(img.size) <= 300
            if f.base in modes:
                assert img.mode.startswith(modes[f.base]), (f.base, img.mode)
            if f.base == "jpeg-progressive":
                assert img.info.get("progressive")


def test_truncations_are_prefixes_spread_over_the_file(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    fractions = []
    for f in _of(corpus, "truncate"):
        assert f.parent is not None
        clean = by_name[f.parent].data
        assert 0 < len(f.data) < len(clean)
        assert clean.startswith(f.data)
        fractions.append(len(f.data) / len(clean))
    assert min(fractions) >= 0.009 and max(fractions) <= 0.991
    # one cut per quarter of every file (SMALL has four)
    for quarter in range(4):
        assert any(quarter / 4 <= x < (quarter + 1) / 4 for x in fractions)


def test_bit_flips_stay_in_their_region(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    for damage, most in (("bitflip-header", 2), ("bitflip-data", 4)):
        for f in _of(corpus, damage):
            assert f.parent is not None
            clean = by_name[f.parent].data
            assert len(f.data) == len(clean)
            header, data = regions(f.base, clean)
            where = header if damage == "bitflip-header" else data
            diff = [i for i, (a, b) in enumerate(zip(clean, f.data, strict=True)) if a != b]
            if "CRCs recomputed" in f.detail:  # the CRC fields change too
                stored = {int(part.split()[-1]) for part in f.detail.split(", ")[:-1]}
                assert stored <= set(diff)
                diff = sorted(stored)
                assert _crc_mismatches(f.data) == []
            assert 1 <= len(diff) <= most
            for i in diff:
                assert bin(clean[i] ^ f.data[i]).count("1") == 1
                assert any(start <= i < end for start, end in where), (f.name, i)
                assert i >= 2  # never the magic number


def test_png_chunk_damages_have_the_stated_defect(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    for f in corpus:
        if f.damage in ("clean", "wrong-extension") and family(f.base) == "png":
            assert _crc_mismatches(f.data) == []
            assert sum(t == b"IDAT" for t, _, _ in _chunks(f.data)) >= 2
    for f in _of(corpus, "png-bad-crc-ancillary"):
        (bad,) = _crc_mismatches(f.data)
        assert bad[:1].islower() and bad.decode() in f.detail
    for f in _of(corpus, "png-bad-crc-critical"):
        (bad,) = _crc_mismatches(f.data)
        assert bad[:1].isupper() and bad != b"IEND" and bad.decode() in f.detail
    for f in _of(corpus, "png-unknown-critical"):
        assert _crc_mismatches(f.data) == []
        unknown = [t for t, _, _ in _chunks(f.data) if t not in KNOWN_PNG_CHUNKS]
        assert len(unknown) == 1 and unknown[0][:1].isupper() and unknown[0][2:3].isupper()
    for f in _of(corpus, "png-missing-iend"):
        assert f.parent is not None
        assert [t for t, _, _ in _chunks(by_name[f.parent].data)][-1] == b"IEND"
        assert b"IEND" not in [t for t, _, _ in _chunks(f.data)]
    for f in _of(corpus, "png-duplicate-ihdr"):
        types = [t for t, _, _ in _chunks(f.data)]
        assert types[:2] == [b"IHDR", b"IHDR"] and types.count(b"IHDR") == 2
        assert _crc_mismatches(f.data) == []
    for f in _of(corpus, "png-reordered-chunks"):
        assert f.parent is not None
        clean = _chunks(by_name[f.parent].data)
        damaged = _chunks(f.data)
        assert damaged != clean and sorted(damaged) == sorted(clean)


def test_jpeg_damages_have_the_stated_defect(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    for f in corpus:
        if f.parent is None or family(f.base) != "jpeg":
            continue
        clean = by_name[f.parent].data
        if f.damage == "jpeg-missing-dht":
            assert _markers(f.data, 0xC4) < _markers(clean, 0xC4)
        elif f.damage == "jpeg-duplicate-dht":
            assert _markers(f.data, 0xC4) == _markers(clean, 0xC4) + 1
        elif f.damage == "jpeg-missing-dqt":
            assert _markers(f.data, 0xDB) == _markers(clean, 0xDB) - 1
        elif f.damage == "jpeg-duplicate-dqt":
            assert _markers(f.data, 0xDB) == _markers(clean, 0xDB) + 1
        elif f.damage == "jpeg-bogus-marker":
            _, scans = jpeg_layout(clean)
            inserts = [(int(at.split(" at ")[1]), int(at[2:4], 16)) for at in f.detail.split(", ")]
            rebuilt = bytearray(clean)
            for offset, marker in reversed(inserts):
                assert any(start <= offset < end for start, end in scans)
                rebuilt[offset:offset] = bytes((0xFF, marker))
            assert bytes(rebuilt) == f.data


def test_wrong_extensions_and_bodies(
    corpus: list[CorruptFile], by_name: dict[str, CorruptFile]
) -> None:
    for f in _of(corpus, "wrong-extension"):
        assert f.parent is not None
        assert f.data == by_name[f.parent].data
        assert PurePath(f.name).suffix != "." + SUFFIXES[family(f.base)]
    assert [f.data for f in _of(corpus, "zero-bytes")] == [b""]
    assert all(set(f.data) == {0} for f in _of(corpus, "zero-filled"))
    assert all(b"<html" in f.data.lower() for f in _of(corpus, "html-body"))
    for f in _of(corpus, "zeroed-tail"):
        assert f.parent is not None
        keep = int(f.detail.split()[2].split("/")[0])
        assert f.data[:keep] == by_name[f.parent].data[:keep] and set(f.data[keep:]) == {0}


def test_bombs_claim_more_than_the_cap(
    corpus: list[CorruptFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    bombs = _of(corpus, "bomb")
    assert {family(f.base) for f in bombs} == {"png", "gif", "jpeg", "webp", "tiff", "bmp"}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for f in bombs:
        assert len(f.data) < 200_000, f.name  # small on the wire
        if f.base == "png":
            assert f.data[12:16] == b"IHDR"
            width, height = struct.unpack(">II", f.data[16:24])
        elif f.base == "gif":
            screen = struct.unpack("<HH", f.data[6:10])
            at = 13 + (3 * (2 << (f.data[10] & 7)) if f.data[10] & 0x80 else 0)
            while f.data[at] == 0x21:  # extensions: introducer, label, sub-blocks
                at += 2
                while f.data[at]:
                    at += f.data[at] + 1
                at += 1
            assert f.data[at] == 0x2C  # the image descriptor
            frame = struct.unpack("<HH", f.data[at + 5 : at + 9])
            width, height = max(screen[0], frame[0]), max(screen[1], frame[1])
        else:
            with Image.open(io.BytesIO(f.data)) as img:  # the header only
                width, height = img.size
        assert width * height > PIXEL_CAP, (f.name, width, height)
    # the real one inflates to all of it
    (real,) = [f for f in bombs if "complete" in f.detail]
    idat = b"".join(body for t, body, _ in _chunks(real.data) if t == b"IDAT")
    assert len(zlib.decompress(idat)) == 10000 * (1 + 10000 // 8)


def _files(*rows: tuple[str, bool]) -> list[CorruptFile]:
    return [
        CorruptFile(f"f{i}", "png-rgb", damage, is_bomb, b"")
        for i, (damage, is_bomb) in enumerate(rows)
    ]


def test_score_on_a_hand_made_table() -> None:
    D, R, C, H, N, E = DECODED, REFUSED, CRASH, HANG, NOT_ATTEMPTED, ERROR
    records = _files(
        ("clean", False),  # 0: everyone
        ("truncate", False),  # 1: only opencv alone; imgfleet misses it
        ("truncate", False),  # 2: only imgfleet (not in the union)
        ("bitflip-data", False),  # 3: nobody; vips hangs
        ("png-bad-crc-ancillary", False),  # 4: pillow crashes, vips reads, imgfleet too
        ("bomb", True),  # 5: pillow "decodes" it: bombs never count in the union
        ("bomb", True),  # 6: imgfleet decodes a bomb: not refused
        ("png-missing-iend", False),  # 7: vips alone; imgfleet errors
    )
    statuses = {
        "imgfleet": [D, R, D, R, D, R, D, E],
        "pillow": [D, R, R, R, C, D, R, R],
        "opencv": [D, D, R, R, R, N, N, R],
        "vips": [D, R, R, H, D, N, N, D],
    }
    figures = score(records, statuses)
    assert figures["union"] == 4  # 0, 1, 4, 7
    assert figures["imgfleet_in_union"] == 2  # 0, 4
    assert figures["ratio"] == 0.5
    assert figures["missed"] == 2
    assert figures["missed_by_damage"] == {"truncate": 1, "png-missing-iend": 1}
    assert [(m["name"], m["read_by"], m["imgfleet"]) for m in figures["missed_files"]] == [
        ("f1", ["opencv"], R),
        ("f7", ["vips"], E),
    ]
    assert figures["imgfleet_only"] == 1 and figures["imgfleet_only_by_damage"] == {"truncate": 1}
    assert (figures["bombs"], figures["bombs_refused"]) == (2, 1)
    assert figures["counts"]["pillow"] == {D: 2, R: 5, C: 1, H: 0, N: 0, E: 0}
    assert figures["counts"]["vips"][H] == 1 and figures["counts"]["vips"][N] == 2
    assert figures["counts"]["imgfleet"][E] == 1
    assert figures["by_damage"]["truncate"] == {
        "files": 2, "union": 1, "imgfleet": 1, "pillow": 0, "opencv": 1, "vips": 0,
    }  # fmt: skip
    assert figures["by_damage"]["bomb"]["union"] == 0
    assert set(figures["by_damage"]) == {r.damage for r in records}
    assert score(records, statuses, max_misses=1)["missed_files"][0]["name"] == "f1"


def test_score_edges() -> None:
    records = _files(("bomb", True))
    figures = score(records, {c: [REFUSED] for c in CONTENDERS})
    assert (figures["union"], figures["ratio"], figures["bombs_refused"]) == (0, 0.0, 1)
    with pytest.raises(ValueError, match="statuses for 1 files"):
        score(records, {c: [] for c in CONTENDERS})
    with pytest.raises(ValueError, match="unknown statuses"):
        score(records, {c: ["exploded"] for c in CONTENDERS})
