"""Catalogues on S3 (moto's server on loopback): streamed bodies and ranged Parquet reads."""

from __future__ import annotations

import gzip
import io
import uuid
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from common.config import Settings, StorageConfig
from common.errors import OperatorError
from imgfleet.factories import storage_s3_client
from producers.catalogue.reader import CatalogueItem, ColumnMapping, RejectedRow, open_catalogue
from producers.catalogue.sources import (
    CatalogueAccessError,
    CatalogueChangedError,
    CatalogueFormatError,
    CatalogueNotFoundError,
    CatalogueUnavailableError,
    S3RangeReader,
    S3StreamReader,
)
from tests.conftest import s3_client

pytestmark = pytest.mark.integration

ROWS = [
    {"item_id": f"sku-{n}", "image_urls": [f"http://x/{n}.jpg", f"http://x/{n}b.jpg"], "version": n}
    for n in range(300)
]


@pytest.fixture
def bucket(s3_endpoint: str) -> tuple[Any, str]:
    client = s3_client(s3_endpoint)
    name = f"cat-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    lines = ["item_id,image_urls,version"]
    lines += [f"{r['item_id']},{'|'.join(r['image_urls'])},{r['version']}" for r in rows]
    return ("\n".join(lines) + "\n").encode()


def _parquet_bytes(rows: list[dict[str, Any]], row_group_rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_rows)
    return buf.getvalue()


def _expected(rows: list[dict[str, Any]]) -> list[tuple[int, str, tuple[str, ...], int]]:
    return [(n + 1, r["item_id"], tuple(r["image_urls"]), r["version"]) for n, r in enumerate(rows)]


@pytest.mark.parametrize(
    ("key", "body"),
    [
        ("cat.jsonl", _jsonl_bytes(ROWS)),
        ("cat.jsonl.gz", gzip.compress(_jsonl_bytes(ROWS))),
        ("dumps/cat.csv", _csv_bytes(ROWS)),
        ("dumps/cat.csv.gz", gzip.compress(_csv_bytes(ROWS))),
        ("cat.parquet", _parquet_bytes(ROWS, row_group_rows=64)),
    ],
)
def test_each_format_reads_from_s3(bucket: tuple[Any, str], key: str, body: bytes) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key=key, Body=body)
    source = f"s3://{name}/{key}"
    with open_catalogue(source, s3_client=client) as cat:
        assert cat.source == source
        assert cat.fraction_done() == 0.0
        entries = list(cat)
        assert cat.fraction_done() == 1.0
    items = [e for e in entries if isinstance(e, CatalogueItem)]
    offset = 1 if ".csv" in key else 0  # the CSV header is line 1
    assert [(i.line - offset, i.item_id, i.image_urls, i.version) for i in items] == _expected(ROWS)


def test_rejected_rows_from_s3_keep_their_line_numbers(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    body = _jsonl_bytes(ROWS[:2]) + b"{oops\n" + _jsonl_bytes(ROWS[2:3])
    client.put_object(Bucket=name, Key="cat.ndjson", Body=body)
    with open_catalogue(f"s3://{name}/cat.ndjson", s3_client=client) as cat:
        entries = list(cat)
    assert [e.line for e in entries] == [1, 2, 3, 4]
    assert isinstance(entries[2], RejectedRow) and entries[2].raw == "{oops"


def test_ranged_reader_reads_a_multi_row_group_parquet_in_few_requests(
    bucket: tuple[Any, str],
) -> None:
    client, name = bucket
    n = 20_000
    rows = [
        {
            "sku": f"item-{k:06d}",
            "photos": [f"https://cdn.example.com/{k}/{j}.jpg" for j in range(k % 3 + 1)],
            "rev": k,
            "etag": f"e{k}",
        }
        for k in range(n)
    ]
    body = _parquet_bytes(rows, row_group_rows=2500)
    client.put_object(Bucket=name, Key="big.parquet", Body=body)
    assert pq.ParquetFile(io.BytesIO(body)).metadata.num_row_groups == 8

    mapping = ColumnMapping(item_id="sku", image_urls=("photos",), version="rev", etag="etag")
    with open_catalogue(f"s3://{name}/big.parquet", mapping, s3_client=client) as cat:
        assert cat.total_rows_hint == n
        fractions = []
        items = []
        for entry in cat:
            assert isinstance(entry, CatalogueItem)
            items.append(entry)
            fractions.append(cat.fraction_done())
        reader = cat._closers[0]
        assert isinstance(reader, S3RangeReader)
        requests = reader.requests
    assert [(i.line, i.item_id, len(i.image_urls), i.version, i.etag) for i in items] == [
        (k + 1, f"item-{k:06d}", k % 3 + 1, k, f"e{k}") for k in range(n)
    ]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # Well under one request per row group and column: the block cache serves them.
    assert requests <= len(body) // (4 * 2**20) + 4


def test_ranged_reader_seeks_and_reads_exact_bytes(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    body = bytes(range(256)) * 1000  # 256,000 bytes
    client.put_object(Bucket=name, Key="blob.bin", Body=body)
    reader = S3RangeReader(client, f"s3://{name}/blob.bin", block_bytes=10_000, cache_blocks=2)
    assert reader.size() == len(body)
    assert reader.seek(-10, io.SEEK_END) == len(body) - 10
    assert reader.read() == body[-10:]
    assert reader.read(5) == b""
    reader.seek(9_995)
    assert reader.read(10) == body[9_995:10_005]  # across two blocks
    assert reader.requests == 3
    reader.seek(9_990)
    assert reader.read(5) == body[9_990:9_995]  # cached
    assert reader.requests == 3
    reader.seek(50_000)
    assert reader.read(30_000) == body[50_000:80_000]  # larger than a block: one direct GET
    assert reader.requests == 4
    buf = bytearray(7)
    reader.seek(3)
    assert reader.readinto(buf) == 7 and bytes(buf) == body[3:10]


def test_missing_object_bucket_and_bad_footer_are_clear_errors(
    bucket: tuple[Any, str], s3_endpoint: str
) -> None:
    client, name = bucket
    for key in ("nope.jsonl", "nope.parquet"):
        with pytest.raises(CatalogueNotFoundError, match=rf"catalogue s3://{name}/{key} not found"):
            open_catalogue(f"s3://{name}/{key}", s3_client=client)
    with pytest.raises(CatalogueNotFoundError, match="bucket does not exist"):
        open_catalogue("s3://no-such-bucket-here/cat.csv", s3_client=client)
    client.put_object(Bucket=name, Key="bad.parquet", Body=b"PAR1 not really")
    with pytest.raises(CatalogueFormatError, match=rf"s3://{name}/bad.parquet is not a readable"):
        open_catalogue(f"s3://{name}/bad.parquet", s3_client=client)
    with pytest.raises(ValueError, match="not an S3 object URL"):
        open_catalogue(f"s3://{name}/", s3_client=client, format="jsonl")


class _DeniedClient:
    """S3 answering 403, as a bucket policy without s3:GetObject does."""

    def _deny(self, **kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")

    get_object = _deny
    head_object = _deny


def test_access_denied_is_a_permanent_error_naming_the_object() -> None:
    for key in ("cat.jsonl", "cat.parquet"):
        with pytest.raises(CatalogueAccessError, match=rf"s3://b/{key}: access denied") as err:
            open_catalogue(f"s3://b/{key}", s3_client=_DeniedClient())
        assert isinstance(err.value, OperatorError) and not err.value.transient


class _FlakyBody:
    """A real body that drops the connection once after ``fail_after`` bytes."""

    def __init__(self, body: Any, fail_after: int) -> None:
        self._body = body
        self._left = fail_after

    def read(self, amt: int) -> bytes:
        if self._left <= 0:
            raise ResponseStreamingError(error="connection reset by peer")
        data: bytes = self._body.read(min(amt, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._body.close()


class _FlakyClient:
    """Real S3 calls; the first ``failures`` bodies break part-way."""

    def __init__(self, client: Any, failures: int, fail_after: int) -> None:
        self._client = client
        self.failures = failures
        self.fail_after = fail_after
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        response = self._client.get_object(**kwargs)
        if self.failures > 0:
            self.failures -= 1
            response["Body"] = _FlakyBody(response["Body"], self.fail_after)
        return response


def test_a_dropped_stream_resumes_where_it_stopped(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    body = _jsonl_bytes(ROWS)
    client.put_object(Bucket=name, Key="cat.jsonl", Body=body)
    flaky = _FlakyClient(client, failures=2, fail_after=3000)
    with open_catalogue(f"s3://{name}/cat.jsonl", s3_client=flaky) as cat:
        items = [e for e in cat if isinstance(e, CatalogueItem)]
    assert [i.item_id for i in items] == [r["item_id"] for r in ROWS]
    assert [c.get("Range") for c in flaky.calls] == [None, "bytes=3000-", "bytes=6000-"]
    assert all(c.get("IfMatch") for c in flaky.calls[1:])  # the same object, never a newer one

    hopeless = _FlakyClient(client, failures=100, fail_after=0)
    stream = S3StreamReader(hopeless, f"s3://{name}/cat.jsonl", max_resumes=3)
    with pytest.raises(CatalogueUnavailableError, match="after 3 reconnects") as err:
        stream.read(len(body))
    assert isinstance(err.value, OperatorError) and err.value.transient


def test_an_object_replaced_mid_read_is_an_error(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="cat.jsonl", Body=_jsonl_bytes(ROWS))
    flaky = _FlakyClient(client, failures=1, fail_after=1000)
    stream = S3StreamReader(flaky, f"s3://{name}/cat.jsonl")
    client.put_object(Bucket=name, Key="cat.jsonl", Body=_jsonl_bytes(ROWS[:10]))
    with pytest.raises(CatalogueChangedError, match="replaced while it was being read"):
        while stream.read(10_000):
            pass

    client.put_object(Bucket=name, Key="cat.parquet", Body=_parquet_bytes(ROWS, 100))
    reader = S3RangeReader(client, f"s3://{name}/cat.parquet")
    client.put_object(Bucket=name, Key="cat.parquet", Body=_parquet_bytes(ROWS[:5], 100))
    with pytest.raises(CatalogueChangedError):
        reader.read(10)


def test_client_from_storage_config_reaches_the_endpoint(
    bucket: tuple[Any, str], s3_endpoint: str
) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="c.jsonl", Body=_jsonl_bytes(ROWS[:3]))
    config = StorageConfig(
        kind="s3",
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id="test",  # type: ignore[arg-type]
        s3_secret_access_key="test",  # type: ignore[arg-type]
        s3_max_attempts=2,
        s3_timeout_s=5.0,
    )
    built = storage_s3_client(Settings(storage=config))
    assert built.meta.endpoint_url == s3_endpoint
    # botocore counts the first try too: two retries are three attempts.
    assert built.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert built.meta.config.read_timeout == 5.0
    with open_catalogue(f"s3://{name}/c.jsonl", s3_client=built) as cat:
        assert [e.item_id for e in cat if isinstance(e, CatalogueItem)] == [
            "sku-0",
            "sku-1",
            "sku-2",
        ]
