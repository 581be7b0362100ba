"""The S3 adapter and the index on it, against moto's S3 server on loopback through boto3."""

from __future__ import annotations

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.base import ObjectNotFoundError, Storage
from common.storage.cas import read_versioned, write_if_unchanged
from common.storage.s3 import S3Storage, StorageRejectedError
from index.apply import Applier
from index.build import build_generation
from index.known import KnownImages
from index.manifest import load_manifest
from index.search import Searcher
from tests.unit.index.conftest import RecordFactory, write_records

pytestmark = pytest.mark.integration


def test_protocol_round_trip(s3_storage: S3Storage) -> None:
    assert isinstance(s3_storage, Storage)
    s3_storage.put("segments/shard-0000/a.seg", b"one")
    s3_storage.put("segments/shard-0001/b.seg", b"two")
    s3_storage.put("manifest.json", b"{}")
    assert s3_storage.get("segments/shard-0000/a.seg") == b"one"
    assert s3_storage.exists("manifest.json") and not s3_storage.exists("nope")
    assert s3_storage.list("segments/") == [
        "segments/shard-0000/a.seg",
        "segments/shard-0001/b.seg",
    ]
    assert "manifest.json" in s3_storage.list()
    s3_storage.delete("manifest.json")
    assert not s3_storage.exists("manifest.json")
    with pytest.raises(ObjectNotFoundError):
        s3_storage.get("manifest.json")
    with pytest.raises(ValueError, match="invalid storage key"):
        s3_storage.put("../escape", b"x")
    assert s3_storage.local_path("x") is None
    assert "testing" not in repr(s3_storage)  # never the credentials


def test_large_object_goes_multipart_and_reads_back(s3_storage: S3Storage) -> None:
    data = np.random.default_rng(0).bytes(70 * 2**20)
    s3_storage.put("generations/000001/big.bin", data)
    assert s3_storage.get("generations/000001/big.bin") == data


def test_conditional_write_refuses_a_stale_writer(s3_storage: S3Storage) -> None:
    assert write_if_unchanged(s3_storage, "manifest.json", b"v1", None) is True
    assert write_if_unchanged(s3_storage, "manifest.json", b"again", None) is False
    data, token = read_versioned(s3_storage, "manifest.json")
    assert data == b"v1" and token
    assert write_if_unchanged(s3_storage, "manifest.json", b"v2", token) is True
    # A second writer still holding the first token loses.
    assert write_if_unchanged(s3_storage, "manifest.json", b"v2-other", token) is False
    assert s3_storage.get("manifest.json") == b"v2"


def test_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    storage = S3Storage(
        "no-such-bucket-here",
        endpoint_url=s3_endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        max_attempts=1,
    )
    with pytest.raises(StorageRejectedError, match="does not exist"):
        storage.put("x", b"y")


def test_build_apply_search_and_known_images_on_s3(
    s3_storage: S3Storage, make_record: RecordFactory, tmp_path: object
) -> None:
    write_records(s3_storage, 2, *[make_record(f"i{i}", seed=i) for i in range(20)])
    info = build_generation(s3_storage, 2, grace_s=0.0)
    assert info.total_vectors == 20
    searcher = Searcher(s3_storage)
    target = make_record("i7", seed=7)
    (hits,) = searcher.search(target.vector[None, :].astype(np.float32), k=1)
    assert hits[0].item_id == "i7"

    write_records(
        s3_storage, 2, make_record("i7", version=2, vector=None), make_record("cms", seed=42)
    )
    report = Applier(s3_storage, grace_s=0.0).apply_once()
    assert (report.upserts, report.deletes) == (1, 1)
    assert searcher.reload_if_changed() is True
    ids = {int(i) for i in searcher.image_ids()}
    assert image_id_for("i7", "0") not in ids and image_id_for("cms", "0") in ids

    known = KnownImages(s3_storage, check_interval_s=0.0, cache_dir=tmp_path)  # type: ignore[arg-type]
    found = known.lookup(image_id_for("i3", "0"))
    assert found is not None
    np.testing.assert_array_equal(found.vector, make_record("i3", seed=3).vector)
    manifest = load_manifest(s3_storage)
    assert manifest is not None and manifest.serial == 2
