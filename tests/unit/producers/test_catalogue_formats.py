"""Catalogue formats on local files: JSONL, CSV, Parquet, gzip, column mappings, rejections."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from common.config import ProducerConfig
from common.errors import ExitCode, OperatorError
from common.schema import MAX_ITEM_ID_CHARS, MAX_URL_CHARS, Job
from imgfleet.factories import column_mapping
from producers.catalogue.reader import (
    CatalogueItem,
    ColumnMapping,
    RejectedRow,
    open_catalogue,
    read_catalogue,
)
from producers.catalogue.sources import (
    CatalogueFormatError,
    CatalogueNotFoundError,
)


def _items(entries: list[CatalogueItem | RejectedRow]) -> list[CatalogueItem]:
    return [e for e in entries if isinstance(e, CatalogueItem)]


def _rejects(entries: list[CatalogueItem | RejectedRow]) -> list[tuple[int, str]]:
    return [(e.line, e.reason) for e in entries if isinstance(e, RejectedRow)]


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


# --- every rejection reason, with its line ----------------------------------------------


def test_every_jsonl_rejection_names_its_line_and_column(tmp_path: Path) -> None:
    lines = [
        b'{"item_id": "ok", "image_urls": ["http://x/1.jpg"], "version": 2}',  # 1
        b"{not json",  # 2
        b'["a", "list"]',  # 3
        b'{"image_urls": ["http://x/1.jpg"]}',  # 4
        b'{"item_id": "   ", "image_urls": ["http://x/1.jpg"]}',  # 5
        b'{"item_id": "n", "image_urls": []}',  # 6
        b'{"item_id": "n", "image_urls": ["ftp://x/1.jpg"]}',  # 7
        b'{"item_id": "n", "image_urls": ["http://x/'
        + b'", "http://x/'.join(str(i).encode() for i in range(17))
        + b'"]}',  # 8: 17 URLs, max 16
        b'{"item_id": "n", "image_urls": ["http://x/1.jpg"], "version": -1}',  # 9
        b'{"item_id": "n", "image_urls": ["http://x/1.jpg"], "version": "1.5"}',  # 10
        b'{"item_id": "n\xff", "image_urls": ["http://x/1.jpg"]}',  # 11: bad UTF-8
        b'{"item_id": 1.5, "image_urls": ["http://x/1.jpg"]}',  # 12
        b'{"item_id": "n", "image_urls": {"a": 1}}',  # 13
        b'{"item_id": "n", "image_urls": ["http://x/1.jpg", 7]}',  # 14
        b'{"item_id": "n", "image_urls": ["http://x/1.jpg"], "version": true}',  # 15
        b'{"item_id": "n", "other": 1}',  # 16
        b"",  # 17: blank, skipped
        b'{"item_id": "last", "image_urls": "http://x/a.jpg|http://x/b.jpg|http://x/a.jpg"}',
    ]
    path = tmp_path / "cat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = list(read_catalogue(path))
    assert [(i.line, i.item_id, i.image_urls, i.version) for i in _items(out)] == [
        (1, "ok", ("http://x/1.jpg",), 2),
        # The same URL twice in one item is one image; the string is split on "|".
        (18, "last", ("http://x/a.jpg", "http://x/b.jpg"), 0),
    ]
    rejects = _rejects(out)
    assert rejects[0][0] == 2 and rejects[0][1].startswith("not JSON: ")
    assert rejects[1:] == [
        (3, "not a JSON object (a JSON array)"),
        (4, "item_id: missing"),
        (5, "item_id: missing"),
        (6, "image_urls: no image URLs"),
        (7, "image_urls: not an http(s)://, s3:// or file:// URL: 'ftp://x/1.jpg'"),
        (8, "image_urls: 17 image URLs, more than max_images_per_item=16"),
        (9, "version: not a non-negative integer: -1"),
        (10, "version: not a non-negative integer: '1.5'"),
        (11, "not valid UTF-8 (byte 14 of the line)"),
        (12, "item_id: not a string or integer: 1.5"),
        (13, "image_urls: not a list or string of URLs: {'a': 1}"),
        (14, "image_urls: not a URL: 7"),
        (15, "version: not a non-negative integer: True"),
        (16, "image_urls: missing"),
    ]
    bad_utf8 = next(e for e in out if isinstance(e, RejectedRow) and e.line == 11)
    assert bad_utf8.raw == '{"item_id": "n\ufffd", "image_urls": ["http://x/1.jpg"]}'


def test_every_csv_rejection_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_bytes(
        b"item_id,image_urls,version\n"  # 1
        b"a,http://x/1.jpg|https://x/2.jpg,4\n"  # 2
        b'b,"http://x/3.jpg|\nhttp://x/4.jpg",1\n'  # 3-4: a quoted newline
        b"c,http://x/5.jpg,1,extra\n"  # 5
        b" ,http://x/6.jpg,1\n"  # 6
        b"d,,1\n"  # 7
        b"e,javascript:alert(1),1\n"  # 8
        b"f,http://x/7.jpg,seven\n"  # 9
        b"g\xfe,http://x/8.jpg,1\n"  # 10
        b"\n"  # 11: blank
        b"h,http://x/9.jpg\n"  # 12: short row, version absent -> 0
        b"i,s3://bucket/k.jpg|file:///data/a.png|s3://bucket/k.jpg,\n"  # 13
    )
    out = list(read_catalogue(path))
    assert [(i.line, i.item_id, i.image_urls, i.version) for i in _items(out)] == [
        (2, "a", ("http://x/1.jpg", "https://x/2.jpg"), 4),
        (3, "b", ("http://x/3.jpg", "http://x/4.jpg"), 1),
        (12, "h", ("http://x/9.jpg",), 0),
        (13, "i", ("s3://bucket/k.jpg", "file:///data/a.png"), 0),
    ]
    assert _rejects(out) == [
        (5, "CSV row has 4 cells, the header has 3"),
        (6, "item_id: missing"),
        (7, "image_urls: no image URLs"),
        (8, "image_urls: not an http(s)://, s3:// or file:// URL: 'javascript:alert(1)'"),
        (9, "version: not a non-negative integer: 'seven'"),
        (10, "item_id: not valid UTF-8"),
    ]
    bad = [e for e in out if isinstance(e, RejectedRow)]
    assert bad[0].raw == "c,http://x/5.jpg,1,extra"
    assert bad[-1].raw == "g\ufffd,http://x/8.jpg,1"


def test_ids_and_urls_past_the_job_limits_are_rejected_not_crashed_on(tmp_path: Path) -> None:
    longest_url = "http://x/" + "u" * (MAX_URL_CHARS - len("http://x/"))
    rows = [
        {"item_id": "i" * MAX_ITEM_ID_CHARS, "image_urls": [longest_url]},
        {"item_id": "i" * (MAX_ITEM_ID_CHARS + 1), "image_urls": ["http://x/1.jpg"]},
        {"item_id": "b", "image_urls": [longest_url + "u"]},
    ]
    out = list(read_catalogue(_jsonl(tmp_path / "cat.jsonl", rows)))
    [item] = _items(out)
    # The limits are the job schema's: the longest accepted values make a valid job, one
    # character more does not.
    assert Job(item_id=item.item_id, url=item.image_urls[0]).url == longest_url
    with pytest.raises(ValidationError):
        Job(item_id=item.item_id + "i", url=longest_url)
    with pytest.raises(ValidationError):
        Job(item_id="b", url=longest_url + "u")
    assert [(line, reason.split(": '")[0]) for line, reason in _rejects(out)] == [
        (2, f"item_id: longer than {MAX_ITEM_ID_CHARS} characters"),
        (3, f"image_urls: URL longer than {MAX_URL_CHARS} characters"),
    ]


def test_csv_needs_a_header_naming_the_mapped_columns(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(CatalogueFormatError, match=r"empty\.csv is empty: no CSV header"):
        open_catalogue(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sku,urls\nx,http://x/1.jpg\n")
    with pytest.raises(CatalogueFormatError, match=r"no column 'item_id', 'image_urls'"):
        open_catalogue(wrong)
    with pytest.raises(CatalogueFormatError, match=r"no column 'rev'"):
        open_catalogue(wrong, ColumnMapping(item_id="sku", image_urls=("urls",), version="rev"))
    # The default version column may be absent: every item is version 0.
    with open_catalogue(wrong, ColumnMapping(item_id="sku", image_urls=("urls",))) as cat:
        assert [(i.item_id, i.version) for i in _items(list(cat))] == [("x", 0)]
    no_version = ColumnMapping(item_id="sku", image_urls=("urls",), version="")
    assert [(i.item_id, i.version) for i in _items(list(read_catalogue(wrong, no_version)))] == [
        ("x", 0)
    ]


def test_csv_errors_and_byte_order_marks_do_not_stop_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_bytes(
        b"\xef\xbb\xbfitem_id,image_urls,version\n"
        b"a,http://x/1.jpg,1\n"
        b'b,"' + b"y" * 200_000 + b'",1\n'  # past the csv module's field limit
        b"c,http://x/2.jpg,1\n"
    )
    out = list(read_catalogue(path))
    assert [(i.line, i.item_id) for i in _items(out)] == [(2, "a"), (4, "c")]
    assert _rejects(out) == [(3, "not CSV: field larger than field limit (131072)")]

    jsonl = tmp_path / "cat.jsonl"
    jsonl.write_bytes(
        b'\xef\xbb\xbf{"item_id":"a","image_urls":"http://x/1.jpg"}\r\n'
        b'{"item_id":"b","image_urls":"http://x/1.jpg"}'  # no final newline
    )
    assert [(i.line, i.item_id) for i in _items(list(read_catalogue(jsonl)))] == [
        (1, "a"),
        (2, "b"),
    ]


def test_overlong_jsonl_line_is_rejected_and_reading_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producers.catalogue.formats as catalogue_formats

    monkeypatch.setattr(catalogue_formats, "MAX_LINE_BYTES", 100)
    path = tmp_path / "cat.jsonl"
    long_row = {"item_id": "long", "image_urls": ["http://x/" + "a" * 300]}
    _jsonl(path, [long_row, {"item_id": "next", "image_urls": ["http://x/1.jpg"]}])
    out = list(read_catalogue(path))
    assert _rejects(out) == [(1, "line longer than 100 bytes")]
    assert [(i.line, i.item_id) for i in _items(out)] == [(2, "next")]


# --- column mappings ----------------------------------------------------------------------


def test_several_url_columns_renamed_columns_and_an_etag(tmp_path: Path) -> None:
    mapping = ColumnMapping(
        item_id="sku",
        image_urls=("main_image", "alt_image_1", "alt_image_2"),
        version="rev",
        etag="etag",
        max_images_per_item=3,
    )
    path = tmp_path / "cat.csv"
    path.write_text(
        "sku,title,main_image,alt_image_1,alt_image_2,rev,etag\n"
        's1,Shoe,http://x/1.jpg,http://x/2.jpg,,7,"abc"\n'
        "s2,Hat,,http://x/3.jpg,http://x/3.jpg,8,\n"
        "s3,Bag,,,,9,e\n"
        "s4,Cap,http://x/4.jpg,ftp://x/5.jpg,,1,e\n"
    )
    out = list(read_catalogue(path, mapping))
    assert [(i.item_id, i.image_urls, i.version, i.etag) for i in _items(out)] == [
        ("s1", ("http://x/1.jpg", "http://x/2.jpg"), 7, "abc"),
        ("s2", ("http://x/3.jpg",), 8, None),
    ]
    assert _rejects(out) == [
        (4, "main_image, alt_image_1, alt_image_2: no image URLs"),
        (5, "alt_image_1: not an http(s)://, s3:// or file:// URL: 'ftp://x/5.jpg'"),
    ]

    jsonl = _jsonl(
        tmp_path / "cat.jsonl",
        [
            {
                "sku": 17,
                "main_image": "http://x/1.jpg",
                "alt_image_2": "http://x/2.jpg",
                "rev": 3,
                "etag": 'W/"1"',
            },
            {"sku": "s", "main_image": "http://x/1.jpg", "etag": 5},
        ],
    )
    out = list(read_catalogue(jsonl, mapping))
    assert [(i.item_id, i.image_urls, i.version, i.etag) for i in _items(out)] == [
        ("17", ("http://x/1.jpg", "http://x/2.jpg"), 3, 'W/"1"'),
    ]
    assert _rejects(out) == [(2, "etag: not a string: 5")]


def test_mapping_from_producer_config() -> None:
    config = ProducerConfig(
        item_id_column="sku",
        image_url_columns=["a", "b"],
        version_column="rev",
        etag_column="etag",
        url_separator=";",
        max_images_per_item=4,
    )
    assert column_mapping(config) == ColumnMapping(
        item_id="sku",
        image_urls=("a", "b"),
        version="rev",
        etag="etag",
        url_separator=";",
        max_images_per_item=4,
    )
    assert column_mapping(ProducerConfig()) == ColumnMapping()


def test_custom_separator_splits_joined_urls(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_text("item_id,image_urls\na,http://x/1.jpg ; http://x/2.jpg\n")
    out = list(read_catalogue(path, ColumnMapping(url_separator=";")))
    assert _items(out)[0].image_urls == ("http://x/1.jpg", "http://x/2.jpg")


# --- gzip, format names, whole-file errors ------------------------------------------------


def test_gzipped_jsonl_and_csv_stream(tmp_path: Path) -> None:
    rows = [{"item_id": f"i{n}", "image_urls": [f"http://x/{n}.jpg"]} for n in range(500)]
    gz = tmp_path / "cat.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows)))
    assert [i.item_id for i in _items(list(read_catalogue(gz)))] == [f"i{n}" for n in range(500)]

    csv_gz = tmp_path / "cat.csv.gz"
    csv_gz.write_bytes(gzip.compress(b"item_id,image_urls\na,http://x/1.jpg\n"))
    assert [i.item_id for i in _items(list(read_catalogue(csv_gz)))] == ["a"]

    # Gzip is recognised by its bytes, so a misnamed file still reads.
    misnamed = tmp_path / "cat.jsonl"
    misnamed.write_bytes(gz.read_bytes())
    assert len(_items(list(read_catalogue(misnamed)))) == 500


def test_truncated_gzip_is_a_clear_error_after_the_rows_before_it(tmp_path: Path) -> None:
    rows = [{"item_id": f"i{n}", "image_urls": [f"http://x/{n}.jpg"]} for n in range(2000)]
    data = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    path = tmp_path / "cat.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    seen = 0
    with pytest.raises(
        CatalogueFormatError, match=r"cat\.jsonl\.gz is a truncated or corrupt gzip"
    ):
        for _entry in read_catalogue(path):
            seen += 1
    assert 0 < seen < 2000


def test_format_override_and_unknown_formats(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_text("item_id,image_urls\na,http://x/1.jpg\n")
    with pytest.raises(ValueError, match=r"cannot tell the format .*supported: JSONL"):
        open_catalogue(path)
    with pytest.raises(ValueError, match=r"unsupported catalogue format 'xml'; supported: JSONL"):
        open_catalogue(path, format="xml")
    assert [i.item_id for i in _items(list(read_catalogue(path, format="csv")))] == ["a"]


def test_missing_file_and_directory_are_clear_permanent_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogueNotFoundError, match=r"catalogue .*nope\.jsonl not found") as err:
        open_catalogue(tmp_path / "nope.jsonl")
    assert isinstance(err.value, OperatorError) and not err.value.transient
    assert err.value.exit_code is ExitCode.FAILED
    with pytest.raises(CatalogueNotFoundError, match="not found"):
        open_catalogue(tmp_path / "nope.parquet")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(CatalogueNotFoundError, match="is a directory"):
        open_catalogue(tmp_path / "dir.csv")


def test_catalogue_reads_again_from_the_start_and_reports_progress(tmp_path: Path) -> None:
    rows = [{"item_id": f"i{n}", "image_urls": [f"http://x/{n}.jpg"]} for n in range(3000)]
    path = _jsonl(tmp_path / "cat.jsonl", rows)
    with open_catalogue(path) as cat:
        assert cat.fraction_done() == 0.0
        assert cat.total_rows_hint is None
        fractions = [cat.fraction_done() for _ in cat]
        assert cat.fraction_done() == 1.0
        # A nightly run reads it twice: the second pass opens the file again.
        again = iter(cat)
        assert cat.fraction_done() == 0.0
        assert [i.item_id for i in _items(list(again))] == [r["item_id"] for r in rows]
        assert cat.fraction_done() == 1.0
    assert all(f is not None for f in fractions)
    assert fractions == sorted(fractions)  # never goes back
    assert 0 < fractions[0] <= 1.0  # the first buffered read is counted


# --- Parquet ------------------------------------------------------------------------------


def _parquet(path: Path, table: pa.Table, row_group_rows: int) -> Path:
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def test_parquet_list_and_string_url_columns_and_a_null_row(tmp_path: Path) -> None:
    table = pa.table(
        {
            "item_id": pa.array(["a", None, "c", "d", "e"]),
            "image_urls": pa.array(
                [
                    ["http://x/1.jpg", "http://x/2.jpg"],
                    None,
                    [],
                    ["http://x/4.jpg", None],
                    ["http://x/5.jpg", "http://x/5.jpg"],
                ],
                type=pa.list_(pa.string()),
            ),
            "version": pa.array([1, None, 3, 4, 5], type=pa.int64()),
        }
    )
    path = _parquet(tmp_path / "cat.parquet", table, row_group_rows=2)
    with open_catalogue(path) as cat:
        assert cat.total_rows_hint == 5
        out = list(cat)
    assert [(i.line, i.item_id, i.image_urls, i.version) for i in _items(out)] == [
        (1, "a", ("http://x/1.jpg", "http://x/2.jpg"), 1),
        (4, "d", ("http://x/4.jpg",), 4),
        (5, "e", ("http://x/5.jpg",), 5),
    ]
    assert _rejects(out) == [(2, "item_id: missing"), (3, "image_urls: no image URLs")]
    null_row = next(e for e in out if isinstance(e, RejectedRow) and e.line == 2)
    assert orjson.loads(null_row.raw) == {"item_id": None, "image_urls": None, "version": None}

    # A joined string column, integer ids, renamed columns, an extra column left unread.
    table = pa.table(
        {
            "sku": pa.array([10, 11], type=pa.int64()),
            "urls": pa.array(["http://x/1.jpg|http://x/2.jpg", "http://x/3.jpg"]),
            "description": pa.array(["long text", "more"]),
            "rev": pa.array([2, -1], type=pa.int32()),
        }
    )
    path = _parquet(tmp_path / "cat2.pq", table, row_group_rows=10)
    mapping = ColumnMapping(item_id="sku", image_urls=("urls",), version="rev")
    out = list(read_catalogue(path, mapping))
    assert [(i.item_id, i.image_urls, i.version) for i in _items(out)] == [
        ("10", ("http://x/1.jpg", "http://x/2.jpg"), 2)
    ]
    assert _rejects(out) == [(2, "rev: not a non-negative integer: -1")]


def test_parquet_progress_goes_from_zero_to_one(tmp_path: Path) -> None:
    n = 10_000
    table = pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "image_urls": [[f"http://x/{k}.jpg"] for k in range(n)],
        }
    )
    path = _parquet(tmp_path / "cat.parquet", table, row_group_rows=1000)
    with open_catalogue(path) as cat:
        assert cat.fraction_done() == 0.0
        fractions = []
        for i, entry in enumerate(cat):
            assert isinstance(entry, CatalogueItem) and entry.line == i + 1
            fractions.append(cat.fraction_done())
        assert cat.fraction_done() == 1.0
    assert fractions[0] == pytest.approx(1 / n)
    assert fractions[n // 2 - 1] == pytest.approx(0.5)
    assert fractions == sorted(fractions)


def test_parquet_missing_columns_and_bad_footer(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "cat.parquet", pa.table({"sku": ["a"]}), row_group_rows=10)
    with pytest.raises(CatalogueFormatError, match=r"no column 'item_id', 'image_urls'"):
        open_catalogue(path)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(CatalogueFormatError, match=r"bad\.parquet is not a readable Parquet"):
        open_catalogue(bad)
    with pytest.raises(CatalogueFormatError, match="gzip-wrapped Parquet"):
        open_catalogue(tmp_path / "cat.parquet.gz")


def test_an_unreadable_parquet_row_group_is_reported_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    n = 3000
    table = pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "image_urls": [f"http://x/{k}.jpg" for k in range(n)],
        }
    )
    path = tmp_path / "cat.parquet"
    pq.write_table(table, path, row_group_size=1000, compression="none")
    page_at = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[page_at : page_at + 16] = b"\xff" * 16  # a page header no reader can parse
    path.write_bytes(bytes(data))

    out = list(read_catalogue(path))
    items = _items(out)
    assert [i.line for i in items] == list(range(1, 1001)) + list(range(2001, 3001))
    [(line, reason)] = _rejects(out)
    assert line == 1001
    assert reason.startswith("Parquet row group 1 unreadable from row 1001 to 2000: ")
    assert "\n" not in reason


# --- memory -------------------------------------------------------------------------------


def test_a_large_jsonl_streams_in_flat_memory(tmp_path: Path) -> None:
    n = 200_000
    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:
        for k in range(n):
            fh.write(
                b'{"item_id":"sku-%07d","image_urls":["https://cdn.example.com/%d/a.jpg",'
                b'"https://cdn.example.com/%d/b.jpg"],"version":%d}\n' % (k, k, k, k % 7)
            )
    assert path.stat().st_size > 20 * 2**20  # bigger than the bound below
    tracemalloc.start()
    try:
        items = 0
        for entry in read_catalogue(path):
            items += isinstance(entry, CatalogueItem)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert items == n
    assert peak_bytes < 8 * 2**20


@pytest.mark.parametrize(
    "name,data",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n"),
        ("header-only.csv", b"item_id,image_urls,version\n"),
        ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),
    ],
)
def test_a_catalogue_without_rows_stops_the_run_whatever_its_format(
    tmp_path: Path, name: str, data: bytes
) -> None:
    # An empty JSONL used to finish as a 0-row run (exit 0) where an empty CSV stopped.
    path = tmp_path / name
    path.write_bytes(data)
    with (
        pytest.raises(CatalogueFormatError, match=rf"{name} has no rows"),
        open_catalogue(path) as catalogue,
    ):
        list(catalogue)


def test_a_zero_byte_gz_is_a_broken_gzip_not_an_empty_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "cat.jsonl.gz"
    path.write_bytes(b"")
    with (
        pytest.raises(
            CatalogueFormatError,
            match=r"cat\.jsonl\.gz is named \.gz but is not a gzip file \(it is empty\)",
        ),
        open_catalogue(path) as catalogue,
    ):
        list(catalogue)
    path.write_bytes(b'{"item_id": "a", "image_urls": ["http://x/1.jpg"]}\n')
    with pytest.raises(CatalogueFormatError, match=r"is named \.gz but is not a gzip file$"):
        open_catalogue(path)
