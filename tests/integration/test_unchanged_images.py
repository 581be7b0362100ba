"""A second run over a barely changed catalogue reuses stored vectors: conditional requests
answered 304 skip decode and embedding, and the run's segments still hold every image."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.brokers.local.broker import LocalBroker
from common.config import Settings, load_settings
from common.schema import Job
from common.storage.local import LocalStorage
from imgfleet.factories import run_worker
from index.publish import build_generation
from index.search import Searcher
from index.segments import list_segments, read_segment
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from workers.pipeline import WorkerStats

pytestmark = pytest.mark.integration

N_IMAGES = 12


def write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)).save(path, "JPEG")


async def one_run(settings: Settings, base_url: str, run_id: str, version: int) -> WorkerStats:
    """Every image of the set as a job of ``run_id``, and a worker until the queue drains."""
    broker = LocalBroker(settings.broker.local.path)
    await broker.publish(
        [
            Job(
                item_id=f"sku-{n}",
                url=f"{base_url}/images/{n}.jpg",
                run_id=run_id,
                version=version,
            )
            for n in range(N_IMAGES)
        ]
    )
    await broker.close()
    return await run_worker(settings, worker_id=run_id, until_idle=True)


def test_second_run_reuses_vectors_of_unchanged_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for n in range(N_IMAGES):
        write_image(images / f"{n}.jpg", n)
    settings = load_settings(
        broker={"local_path": str(tmp_path / "q.sqlite3"), "poll_interval_s": 0.02},
        storage={"root": str(tmp_path / "store")},
        worker={
            "decode_processes": 1,
            "segment_flush_interval_s": 0.3,
            "fetch_allow_networks": ["127.0.0.1/32"],
        },
        index={"n_shards": 2},
    )
    storage = LocalStorage(settings.storage.root)

    with ImageServer(tmp_path) as server:
        first = asyncio.run(one_run(settings, server.base_url, "night-1", 1))
        assert first.indexed == N_IMAGES and first.unchanged == 0
        build_generation(storage, 2)
        vector_before = Searcher(storage).vector_of(Job(item_id="sku-0", url="x").image_id)

        write_image(images / "0.jpg", 1000)  # the one image that changed
        server.reset_counts()
        second = asyncio.run(one_run(settings, server.base_url, "night-2", 2))
        not_modified = server.not_modified_count()

    assert second.indexed == N_IMAGES
    assert second.unchanged == N_IMAGES - 1 and second.not_modified == N_IMAGES - 1
    assert not_modified == N_IMAGES - 1
    records = [
        r
        for key in list_segments(storage)
        for r in read_segment(storage, key).records()
        if r.run_id == "night-2"
    ]
    assert len(records) == N_IMAGES  # every image of the run is in the run's segments
    assert all(r.etag and r.last_modified and r.version == 2 for r in records)
    build_generation(storage, 2)
    searcher = Searcher(storage)
    assert searcher.count() == N_IMAGES
    vector_after = searcher.vector_of(Job(item_id="sku-0", url="x").image_id)
    assert vector_before is not None and vector_after is not None
    assert not np.allclose(
        np.asarray(vector_before, np.float32), np.asarray(vector_after, np.float32)
    )
    # An unchanged image's new record carries exactly the vector of its first run.
    sku5 = Job(item_id="sku-5", url="x").image_id
    by_run = {
        r.run_id: r.vector
        for key in list_segments(storage)
        for r in read_segment(storage, key).records()
        if r.image_id == sku5
    }
    assert np.array_equal(by_run["night-1"], by_run["night-2"])


def test_a_model_switch_re_embeds_everything_and_the_generation_names_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Night 1 embeds with the plumbing CNN, night 2 with the default model over the same,
    unchanged images: the unchanged-image shortcut applies to vectors of the same model
    only, so night 2 embeds every image again, and its generation holds the new model's
    1280-d vectors alone; `index status` names the model."""
    from imgfleet.cli import main
    from index.manifest import load_manifest
    from index.records import IndexBuildError
    from index.runs import RunInfo, write_run
    from workers.embed.model import DEFAULT_MODEL_NAME

    images = tmp_path / "images"
    images.mkdir()
    for n in range(N_IMAGES):
        write_image(images / f"{n}.jpg", n)
    sections = {
        "broker": {"local_path": str(tmp_path / "q.sqlite3"), "poll_interval_s": 0.02},
        "storage": {"root": str(tmp_path / "store")},
        "worker": {
            "decode_processes": 1,
            "segment_flush_interval_s": 0.3,
            "fetch_allow_networks": ["127.0.0.1/32"],
        },
        "index": {"n_shards": 2},
    }
    plumbing = load_settings(**sections, model={"path": "plumbing"})
    default = load_settings(**sections)
    storage = LocalStorage(default.storage.root)

    with ImageServer(tmp_path) as server:
        first = asyncio.run(one_run(plumbing, server.base_url, "night-1", 1))
        build_generation(storage, 2)
        old_model = load_manifest(storage).current().model_id  # type: ignore[union-attr]
        write_run(storage, RunInfo("night-2", "catalogue", N_IMAGES, time.time()))
        second = asyncio.run(one_run(default, server.base_url, "night-2", 2))

    assert first.indexed == N_IMAGES and old_model.startswith("plumbing-random-cnn-")
    assert second.indexed == N_IMAGES and second.unchanged == 0  # all embedded again
    # The store holds both models' segments (256-d and 1280-d): a plain build refuses the
    # mix, and the run's build takes the run's model alone.
    with pytest.raises(IndexBuildError, match="nightly run"):
        build_generation(storage, 2)
    info = build_generation(storage, 2, run_id="night-2", grace_s=0.0)
    assert info.model_id.startswith(f"{DEFAULT_MODEL_NAME}-") and info.dim == 1280
    assert Searcher(storage).count() == N_IMAGES
    models = {
        r.model_id
        for key in list_segments(storage)
        for r in read_segment(storage, key).records()
        if r.run_id == "night-2"
    }
    assert models == {info.model_id}
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    capsys.readouterr()
    rc = main(["--log-level", "error", "index", "status"])
    out = capsys.readouterr().out
    assert rc == 0 and f"model={info.model_id}" in out, out
