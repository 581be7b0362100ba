from __future__ import annotations

import numpy as np
import pytest

from common.storage.local import LocalStorage
from index.npz import unpack_arrays
from index.routing import shard_for
from index.segments import (
    SegmentWriter,
    VectorRecord,
    encode_segment,
    list_segments,
    read_segment,
)
from tests.unit.index.conftest import DIM, RecordFactory


class FailingPutStorage(LocalStorage):
    """A real LocalStorage whose Nth segment put raises, as a full disk or S3 5xx would."""

    def __init__(self, root: object, fail_on_put: int) -> None:
        super().__init__(root)  # type: ignore[arg-type]
        self.fail_on_put = fail_on_put
        self.segment_puts = 0

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("segments/"):
            self.segment_puts += 1
            if self.segment_puts == self.fail_on_put:
                raise OSError("injected put failure")
        super().put(key, data)


def test_round_trip_with_tombstones(storage: LocalStorage, make_record: RecordFactory) -> None:
    writer = SegmentWriter(storage, n_shards=1, writer_id="w1")
    upsert = make_record("item-a", "0", version=3, seed=1)
    tombstone = make_record("item-b", "1", version=5, vector=None)
    writer.add(upsert)
    writer.add(tombstone)
    assert writer.pending_count == 2

    (key,) = writer.flush()
    assert writer.pending_count == 0
    segment = read_segment(storage, key)

    assert len(segment) == 2
    assert segment.dim == DIM
    assert segment.image_ids.tolist() == [upsert.image_id, tombstone.image_id]
    assert segment.versions.tolist() == [3, 5]
    assert segment.tombstones.tolist() == [False, True]
    assert segment.item_ids.tolist() == ["item-a", "item-b"]
    assert segment.vectors.dtype == np.float16
    np.testing.assert_array_equal(segment.vectors[0], upsert.vector)
    assert not segment.vectors[1].any()
    back = list(segment.records())
    assert back[1].vector is None
    assert back[0].content_hash == upsert.content_hash
    assert back[0].model_id == upsert.model_id


def test_segment_loads_without_pickle(storage: LocalStorage, make_record: RecordFactory) -> None:
    data = encode_segment([make_record("x"), make_record("y", vector=None)])
    # unpack_arrays uses allow_pickle=False: this would raise on any object array.
    arrays = unpack_arrays(data)
    assert all(a.dtype != object for a in arrays.values())


def test_encoding_is_deterministic(make_record: RecordFactory) -> None:
    records = [make_record(f"item-{i}", seed=i) for i in range(5)]
    assert encode_segment(records) == encode_segment(records)


def test_tombstone_only_segment(storage: LocalStorage, make_record: RecordFactory) -> None:
    writer = SegmentWriter(storage, n_shards=1, writer_id="w1")
    writer.add(make_record("gone", vector=None))
    (key,) = writer.flush()
    segment = read_segment(storage, key)
    assert segment.dim == 0
    assert segment.tombstones.tolist() == [True]


def test_keys_per_shard_and_in_write_order(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    writer = SegmentWriter(storage, n_shards=4, writer_id="worker-7")
    written: list[str] = []
    for batch in range(3):
        for i in range(20):
            writer.add(make_record(f"item-{batch}-{i}", seed=i))
        written.extend(writer.flush())

    assert list_segments(storage) == sorted(written)
    for shard in range(4):
        keys = list_segments(storage, shard)
        assert keys, "20 ids per batch should reach every one of 4 shards"
        # Flush order within one shard is key order.
        assert keys == [k for k in written if k.startswith(f"segments/shard-{shard:04d}/")]
        for key in keys:
            segment = read_segment(storage, key)
            assert all(shard_for(int(i), 4) == shard for i in segment.image_ids)


def test_flush_with_nothing_pending_writes_nothing(storage: LocalStorage) -> None:
    writer = SegmentWriter(storage, n_shards=2, writer_id="w1")
    assert writer.flush() == []
    assert list_segments(storage) == []


def test_flush_is_all_or_nothing(tmp_path: object, make_record: RecordFactory) -> None:
    storage = FailingPutStorage(tmp_path / "store", fail_on_put=2)  # type: ignore[operator]
    writer = SegmentWriter(storage, n_shards=4, writer_id="w1")
    for i in range(40):
        writer.add(make_record(f"item-{i}", seed=i))

    with pytest.raises(OSError, match="injected"):
        writer.flush()
    # Nothing may be acked: every record is still buffered for the retry.
    assert writer.pending_count == 40

    keys = writer.flush()
    assert writer.pending_count == 0
    retried = [read_segment(storage, k) for k in keys]
    assert sum(len(s) for s in retried) == 40
    # The failed attempt's key is never reused for different bytes.
    first_attempt = [k for k in list_segments(storage) if k not in keys]
    assert len(first_attempt) == 1


def test_mixed_dims_rejected(storage: LocalStorage, make_record: RecordFactory) -> None:
    writer = SegmentWriter(storage, n_shards=1, writer_id="w1")
    writer.add(make_record("a"))
    with pytest.raises(ValueError, match="mix dims"):
        writer.add(make_record("b", vector=np.ones(DIM + 1, np.float32)))
    assert writer.pending_count == 1  # the good record is still flushable
    assert len(writer.flush()) == 1

    with pytest.raises(ValueError, match="cannot mix vector dimensions"):
        encode_segment([make_record("a"), make_record("b", vector=np.ones(DIM + 1))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_id": -1}, "outside"),
        ({"image_id": 2**63}, "outside"),
        ({"version": -1}, "version"),
        ({"vector": np.ones((2, 2))}, "1-D"),
        ({"vector": np.array([1.0, np.nan])}, "non-finite"),
    ],
)
def test_record_validation(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "image_id": 1,
        "item_id": "i",
        "version": 1,
        "content_hash": "h",
        "model_id": "m",
        "vector": np.ones(4),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        VectorRecord(**fields)  # type: ignore[arg-type]


def test_writer_id_must_be_key_safe(storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match="writer_id"):
        SegmentWriter(storage, n_shards=1, writer_id="a/b")


def test_url_and_payload_survive_segment_and_shard_table(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    from dataclasses import replace

    from index.records import RecordFilter, resolve_rows
    from index.shardfiles import encode_table, read_delta

    payload = '{"brand":"acme","in_stock":false}'
    record = replace(make_record("item-7"), url="http://img.test/7.jpg", payload=payload)
    key = "segments/shard-0000/00000000000000000001-w-000000.seg"
    storage.put(key, encode_segment([record]))
    assert list_segments(storage) == [key]
    (back,) = list(read_segment(storage, key).records())
    assert (back.url, back.payload) == (record.url, record.payload)

    rows, _, _ = resolve_rows(
        [read_segment(storage, key)], 0, 1, None, RecordFilter(frozenset(), None)
    )
    storage.put("table.npz", encode_table(rows, with_vectors=True))
    table = read_delta(storage, "table.npz", DIM)
    assert table.urls.tolist() == [b"http://img.test/7.jpg"]
    assert table.payloads.tolist() == [b'{"brand":"acme","in_stock":false}']
