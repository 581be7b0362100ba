"""The index on S3: build, apply, search and known-image lookup against moto's S3 server.

The S3 adapter itself is tested in ``tests/contract/test_storage_contract.py`` (what every
adapter does) and ``tests/adapters/s3/test_storage.py`` (what only it does).
"""

from __future__ import annotations

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.s3 import S3Storage
from index.apply import Applier
from index.known import KnownImages
from index.manifest import load_manifest
from index.publish import build_generation
from index.search import Searcher
from tests.unit.index.conftest import RecordFactory, write_records

pytestmark = pytest.mark.integration


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
