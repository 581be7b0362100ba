"""Two nightly runs of one catalogue, finished out of order (issue 20, scenario 3a).

Run A (60 items) is published and a real worker starts on it; run B (A without 10
items, 5 bumped to version 2 with a new image) is published while it drains, and a CMS
change bumps one more item to version 3. B is finalized first. Finalizing A afterwards,
or building from it, must not serve A's older catalogue again: it is refused with exit 5
and the served index stays B's. ``--force`` is the deliberate rollback to A's catalogue
(the CMS change stays), and `index rollback` moves between the two, warning when the
generation it serves undoes B. After every step the test checks what search serves: the
vector count, the deleted items (by ``--item`` and as the nearest neighbours of their own
vectors) and the version and vector of every bumped item.

On the local broker and on RabbitMQ; the worker and the commands run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.config import Settings, load_settings
from common.identity import image_id_for
from common.schema import Job, Lane
from common.storage.local import LocalStorage
from imgfleet.cli import main
from imgfleet.factories import (
    make_broker,
    make_embedder,
    make_storage,
    open_catalogue,
    run_options,
    run_worker,
)
from imgfleet.run_registry import IndexRunRegistry
from index.known import KnownImages
from index.search import Searcher
from index.segments import list_segments, read_segment
from producers.nightly.run import CatalogueRun
from tests.support.faulty_image_server import FaultyImageServer as ImageServer

pytestmark = pytest.mark.integration

N_ITEMS = 60
DELETED = [f"sku-{i:02d}" for i in range(10)]  # not in run B
BUMPED = [f"sku-{i:02d}" for i in range(10, 15)]  # version 2, a new image, in run B
CMS_ITEM = "sku-20"  # version 3 by the CMS, while B is published


def _write_images(folder: Path) -> None:
    """``N.jpg`` for every item; ``N-v2.jpg`` for the bumped ones, ``N-v3.jpg`` for the CMS's."""
    folder.mkdir()
    names = [f"{i}.jpg" for i in range(N_ITEMS)]
    names += [f"{_number(item)}-v2.jpg" for item in BUMPED] + [f"{_number(CMS_ITEM)}-v3.jpg"]
    for seed, name in enumerate(names):
        pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
        # Coarse blocks rather than pixel noise: images the model tells apart.
        Image.fromarray(pixels).resize((128, 128), Image.Resampling.NEAREST).save(
            folder / name, "JPEG"
        )


def _number(item: str) -> int:
    return int(item.removeprefix("sku-"))


def _write_catalogue(path: Path, base_url: str, *, run_b: bool) -> Path:
    with path.open("w") as fh:
        for i in range(N_ITEMS):
            item = f"sku-{i:02d}"
            if run_b and item in DELETED:
                continue
            bumped = run_b and item in BUMPED
            name = f"{i}-v2.jpg" if bumped else f"{i}.jpg"
            row = {
                "item_id": item,
                "image_urls": [f"{base_url}/images/{name}"],
                "version": 2 if bumped else 1,
            }
            fh.write(json.dumps(row) + "\n")
    return path


async def _produce(settings: Settings, run_id: str, path: Path) -> None:
    broker = make_broker(settings)
    await broker.connect()
    storage = make_storage(settings)
    options = run_options(
        settings,
        run_id=run_id,
        source=str(path),
        lane=Lane.BULK,
        max_rate_per_s=None,
        no_deletes=False,
        allow_mass_delete=False,
        resume=False,
        rejects_path=None,
    )
    try:
        with open_catalogue(settings, str(path), format=None) as catalogue:
            await CatalogueRun(
                options, broker=broker, storage=storage, registry=IndexRunRegistry(storage)
            ).run(lambda: contextlib.nullcontext(catalogue))
    finally:
        await broker.close()


async def _publish_both_while_a_worker_drains(
    settings: Settings, run_a: Path, run_b: Path, cms_url: str
) -> None:
    await _produce(settings, "night-a", run_a)
    embedder = make_embedder(settings)
    worker = asyncio.create_task(
        run_worker(settings, worker_id="w1", until_idle=True, embedder=embedder)
    )
    await _produce(settings, "night-b", run_b)
    broker = make_broker(settings)
    await broker.connect()
    cms = Job(item_id=CMS_ITEM, url=cms_url, run_id="cms", version=3, lane=Lane.LIVE)
    await broker.publish([cms])
    await worker
    # A worker that went idle between the publishes leaves the rest to a second pass.
    while await broker.pending() > 0:
        await run_worker(settings, worker_id="w2", until_idle=True, embedder=embedder)
    await broker.close()


@dataclass
class Served:
    """What each run (and the CMS) wrote per item, to compare with what search serves."""

    storage: LocalStorage
    tmp: Path
    vectors: dict[tuple[str, str], np.ndarray]  # (run id, item) -> vector written

    @classmethod
    def read(cls, storage: LocalStorage, tmp: Path) -> Served:
        vectors = {}
        for key in list_segments(storage):
            for record in read_segment(storage, key).records():
                if record.vector is not None:
                    vectors[(record.run_id, record.item_id)] = record.vector
        return cls(storage, tmp, vectors)

    def check(
        self, capsys: pytest.CaptureFixture[str], *, count: int, deleted_served: bool, bump: str
    ) -> None:
        """``bump``: the run whose version of the bumped items serves."""
        assert Searcher(self.storage).count() == count
        known = KnownImages(self.storage, check_interval_s=0.0)
        for item in DELETED:
            found = _cli(
                capsys, "search", "--item", item, "-k", "3", code=0 if deleted_served else 1
            )
            assert deleted_served or f"{item!r} is not in" in found.err
            hits = self._neighbours(capsys, self.vectors[("night-a", item)])
            assert (item in hits) is deleted_served
        for item in BUMPED:
            served = known.lookup(image_id_for(item, "0"))
            assert served is not None and served.version == (2 if bump == "night-b" else 1)
            assert np.array_equal(served.vector, self.vectors[(bump, item)])
            assert self._neighbours(capsys, self.vectors[(bump, item)])[0] == item
        cms = known.lookup(image_id_for(CMS_ITEM, "0"))
        assert cms is not None and cms.version == 3  # the CMS change is never undone
        assert np.array_equal(cms.vector, self.vectors[("cms", CMS_ITEM)])

    def _neighbours(self, capsys: pytest.CaptureFixture[str], vector: np.ndarray) -> list[str]:
        query = self.tmp / "query.npy"
        np.save(query, np.asarray(vector, np.float32))
        out = _cli(capsys, "search", "--vector", str(query), "-k", str(N_ITEMS + 5), "--json")
        return [hit["item_id"] for hit in json.loads(out.out)]


@dataclass
class _Out:
    out: str
    err: str


def _cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> _Out:
    capsys.readouterr()
    rc = main([*args, "--log-level", "error"])
    captured = capsys.readouterr()
    assert rc == code, (args, captured.out[-2000:], captured.err[-2000:])
    return _Out(captured.out, captured.err)


def _last_json(out: _Out) -> Any:
    return json.loads(out.out.strip().splitlines()[-1])


def _scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in {
        "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store"),
        "IMGFLEET_PRODUCER__CATALOGUE_NAME": "shop",
        "IMGFLEET_INDEX__N_SHARDS": "2",
        "IMGFLEET_INDEX__GRACE_S": "0",
        "IMGFLEET_INDEX__EVAL_QUERIES": "0",
        "IMGFLEET_WORKER__DECODE_PROCESSES": "1",
        "IMGFLEET_WORKER__SEGMENT_FLUSH_INTERVAL_S": "0.3",
        "IMGFLEET_WORKER__FETCH_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "IMGFLEET_METRICS__ENABLED": "false",
    }.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    _write_images(tmp_path / "images")
    with ImageServer(tmp_path) as server:
        run_a = _write_catalogue(tmp_path / "a.jsonl", server.base_url, run_b=False)
        run_b = _write_catalogue(tmp_path / "b.jsonl", server.base_url, run_b=True)
        cms_url = f"{server.base_url}/images/{_number(CMS_ITEM)}-v3.jpg"
        asyncio.run(_publish_both_while_a_worker_drains(settings, run_a, run_b, cms_url))
    storage = LocalStorage(tmp_path / "store")
    served = Served.read(storage, tmp_path)
    newest = N_ITEMS - len(DELETED)

    final_b = _last_json(_cli(capsys, "index", "finalize", "--run", "night-b", "--json"))
    assert final_b["finalized"] is True and final_b["undoes"] is None
    served.check(capsys, count=newest, deleted_served=False, bump="night-b")

    # The older run after the newer one: refused at once, nothing changes.
    refused = _cli(capsys, "index", "finalize", "--run", "night-a", code=5)
    assert "run 'night-b'" in refused.err and "--force" in refused.err
    served.check(capsys, count=newest, deleted_served=False, bump="night-b")
    refused = _cli(capsys, "index", "build", "--run", "night-a", code=5)
    assert "Nothing was published" in refused.err
    served.check(capsys, count=newest, deleted_served=False, bump="night-b")

    # On purpose: A's catalogue serves again, with a warning naming B; the CMS change stays.
    forced = _cli(capsys, "index", "finalize", "--run", "night-a", "--force", "--json")
    assert _last_json(forced)["generation"] == 2 and "night-b" in _last_json(forced)["undoes"]
    assert "warning" in forced.err and "run 'night-b'" in forced.err
    served.check(capsys, count=N_ITEMS, deleted_served=True, bump="night-a")

    # Back to B's generation: newer in catalogue state, nothing undone, no warning.
    back = _cli(capsys, "index", "rollback", "--json")
    assert _last_json(back) == {"current_generation": 1, "replaced": 2, "undoes": None}
    assert "warning" not in back.err
    served.check(capsys, count=newest, deleted_served=False, bump="night-b")
    # To A's again: a higher generation number, but an older catalogue: it warns.
    again = _cli(capsys, "index", "rollback", "--to", "2", "--json")
    assert "run 'night-b'" in again.err and "CMS changes are kept" in again.err
    assert _cli(capsys, "index", "apply", "--json").out  # live apply: the CMS change stays
    served.check(capsys, count=N_ITEMS, deleted_served=True, bump="night-a")


def test_older_run_after_newer_on_the_local_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__KIND", "local")
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "queue.sqlite3"))
    monkeypatch.setenv("IMGFLEET_BROKER__POLL_INTERVAL_S", "0.02")
    _scenario(tmp_path, monkeypatch, capsys)


def test_older_run_after_newer_on_rabbitmq(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rabbitmq_url: str,
    rabbit_prefix: str,
) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__KIND", "rabbitmq")
    monkeypatch.setenv("IMGFLEET_BROKER__URL", rabbitmq_url)
    monkeypatch.setenv("IMGFLEET_BROKER__NAME_PREFIX", rabbit_prefix)
    _scenario(tmp_path, monkeypatch, capsys)
