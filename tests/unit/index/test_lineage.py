"""Catalogue lineage: an older run, or another catalogue, never silently replaces the
serving generation; rollback names what it undoes; live apply after a rollback."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from common.errors import ExitCode
from common.identity import image_id_for
from common.storage.local import LocalStorage
from imgfleet.cli import main
from imgfleet.run_registry import IndexRunRegistry
from index.apply import Applier
from index.build import build_unpublished
from index.generations import rollback
from index.known import KnownImages
from index.lineage import (
    CatalogueState,
    OtherCatalogueError,
    SupersededError,
    replacement_problem,
)
from index.manifest import MANIFEST_KEY, load_manifest
from index.publish import build_generation, publish_generation
from index.runs import RUN_PUBLISHING, RunInfo, write_run
from index.search import Searcher
from tests.unit.index.conftest import RecordFactory, write_records

T0 = time.time() - 100  # both runs' windows take in the segments the tests write now


def live_items(storage: LocalStorage, items: list[str] | None = None) -> set[str]:
    searcher = Searcher(storage)
    return {i for i in items or _ITEMS if searcher.images_of_item(i).shape[0]}


def served_version(storage: LocalStorage, item: str) -> int | None:
    found = KnownImages(storage, check_interval_s=0.0).lookup(image_id_for(item, "0"))
    return None if found is None else found.version


_ITEMS = [f"a{i}" for i in range(10)] + ["c0", "c1"]


def two_runs(storage: LocalStorage, make_record: RecordFactory) -> None:
    """Run A: a0..a9 at v1. Run B (started later): a0, a1 deleted, a2 bumped to v2.
    The CMS: c0 added, a5 bumped to v3."""
    write_run(storage, RunInfo("A", "a.jsonl", 10, T0, catalogue="shop"))
    write_records(storage, 2, *[make_record(f"a{i}", seed=i, run_id="A") for i in range(10)])
    write_run(storage, RunInfo("B", "b.jsonl", 10, T0 + 10, catalogue="shop"))
    write_records(
        storage,
        2,
        make_record("a0", vector=None, run_id="B"),
        make_record("a1", vector=None, run_id="B"),
        make_record("a2", version=2, seed=102, run_id="B"),
        *[make_record(f"a{i}", seed=i, run_id="B") for i in range(3, 10)],
    )
    write_records(
        storage,
        2,
        make_record("c0", seed=200, run_id="cms"),
        make_record("a5", version=3, seed=205, run_id="cms"),
    )


def test_the_rule_is_a_pure_function_of_the_two_states() -> None:
    older = CatalogueState("A", "shop", 100.0)
    newer = CatalogueState("B", "shop", 200.0, generation=4)
    problem = replacement_problem(newer, older)
    assert problem is not None and problem.error is SupersededError
    assert "run 'B'" in problem.text and "generation 4" in problem.text
    assert replacement_problem(older, newer) is None
    assert replacement_problem(newer, newer) is None  # rebuilding the same run
    other = replacement_problem(newer, CatalogueState("X", "outlet", 300.0))
    assert other is not None and other.error is OtherCatalogueError
    # Unknown states (old manifests, a full replay's catalogue) never refuse.
    assert replacement_problem(CatalogueState("B", None, None), older) is None
    assert replacement_problem(newer, CatalogueState(None, None, 300.0)) is None
    assert SupersededError("x").exit_code == ExitCode.SUPERSEDED == 5
    assert OtherCatalogueError("x").exit_code == ExitCode.OTHER_CATALOGUE == 6


def test_an_older_run_is_refused_unless_forced_and_forced_keeps_cms_changes(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    two_runs(storage, make_record)
    info = build_generation(storage, 2, run_id="B", grace_s=0.0)
    assert (info.catalogue, info.catalogue_as_of_s) == ("shop", T0 + 10)
    newest = {f"a{i}" for i in range(2, 10)} | {"c0"}
    assert live_items(storage) == newest
    assert (served_version(storage, "a2"), served_version(storage, "a5")) == (2, 3)
    before = storage.get(MANIFEST_KEY)

    with pytest.raises(SupersededError, match=r"run 'B'.*Nothing was published.*--force"):
        build_generation(storage, 2, run_id="A", grace_s=0.0)
    assert storage.get(MANIFEST_KEY) == before
    assert not storage.list("generations/000002/")  # refused before building anything

    # A manifest written before generations recorded their catalogue: the run file says.
    raw = orjson.loads(before)
    for gen in raw["generations"]:
        del gen["catalogue"], gen["catalogue_as_of_s"]
    storage.put(MANIFEST_KEY, orjson.dumps(raw))
    with pytest.raises(SupersededError):
        build_generation(storage, 2, run_id="A", grace_s=0.0)

    # Forced: a deliberate rollback to A's catalogue; the CMS changes stay.
    build_generation(storage, 2, run_id="A", grace_s=0.0, force=True)
    assert live_items(storage) == {f"a{i}" for i in range(10)} | {"c0"}
    assert (served_version(storage, "a2"), served_version(storage, "a5")) == (1, 3)

    # A full replay holds every run's records: as new as B, never refused.
    build_generation(storage, 2, grace_s=0.0)
    assert live_items(storage) == newest


def test_a_newer_run_published_during_the_build_wins_at_publish(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    two_runs(storage, make_record)
    built_a = build_unpublished(storage, 2, run_id="A", grace_s=0.0)  # no generation yet
    build_generation(storage, 2, run_id="B", grace_s=0.0)  # published meanwhile
    with pytest.raises(SupersededError):
        publish_generation(storage, built_a)
    manifest = load_manifest(storage)
    assert manifest is not None and manifest.current().run_id == "B"


def test_another_catalogue_is_refused_unless_forced(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    two_runs(storage, make_record)
    build_generation(storage, 2, run_id="B", grace_s=0.0)
    write_run(storage, RunInfo("X", "x.jsonl", 1, T0 + 20, catalogue="outlet"))
    write_records(storage, 2, make_record("x0", seed=300, run_id="X"))
    with pytest.raises(OtherCatalogueError, match=r"'outlet'.*'shop'"):
        build_generation(storage, 2, run_id="X", grace_s=0.0)
    assert Searcher(storage).count() == 9
    build_generation(storage, 2, run_id="X", grace_s=0.0, force=True)
    assert live_items(storage, [*_ITEMS, "x0"]) == {"x0", "c0", "a5"}  # x0 and the CMS's


def test_rollback_names_what_it_undoes_and_live_apply_keeps_cms_changes(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    two_runs(storage, make_record)
    build_generation(storage, 2, run_id="B", grace_s=0.0)
    build_generation(storage, 2, run_id="A", grace_s=0.0, force=True)  # generation 2

    back = rollback(storage)  # to generation 1: B, the newer catalogue state
    assert (back.generation, back.replaced, back.undoes) == (1, 2, None)

    # While B serves: a CMS change, and a late redelivery of one of B's jobs.
    write_records(
        storage,
        2,
        make_record("c1", seed=201, run_id="cms"),
        make_record("a3", seed=3, run_id="B"),
    )
    applier = Applier(storage, grace_s=0.0)
    assert applier.apply_once().upserts == 2
    assert "c1" in live_items(storage)

    undo = rollback(storage, 2)
    assert undo.generation == 2 and undo.undoes is not None
    assert "run 'B'" in undo.undoes and "deleted" in undo.undoes
    report = applier.apply_once()
    # The CMS change made while B served reaches A's generation; B's record does not.
    assert (report.upserts, report.other_run, report.other_runs) == (1, 1, ["B"])
    assert live_items(storage) == {f"a{i}" for i in range(10)} | {"c0", "c1"}
    assert served_version(storage, "a5") == 3
    # The applier holds the shards of the generation it serves only.
    assert {generation for generation, _ in applier._cache._loaded} == {2}


def test_a_resumed_older_run_deletes_against_the_run_before_it(storage: LocalStorage) -> None:
    registry = IndexRunRegistry(storage)
    write_run(storage, RunInfo("Z", "z.jsonl", 5, T0 - 100, catalogue="shop"))
    write_run(storage, RunInfo("B", "b.jsonl", 5, T0 + 10, catalogue="shop"))
    # A started before B, was cut off, and is resumed after B published.
    write_run(storage, RunInfo("A", "a.jsonl", 0, T0, catalogue="shop", state=RUN_PUBLISHING))
    previous = registry.last_published("shop", exclude_run_id="A")
    assert previous is not None and previous.run_id == "Z"
    latest = registry.last_published("shop", exclude_run_id="C")  # a new run: the newest
    assert latest is not None and latest.run_id == "B"


def test_finalize_exit_codes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_record: RecordFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "queue.sqlite3"))
    monkeypatch.setenv("IMGFLEET_INDEX__N_SHARDS", "2")
    monkeypatch.setenv("IMGFLEET_INDEX__GRACE_S", "0")
    storage = LocalStorage(tmp_path / "store")
    two_runs(storage, make_record)
    assert main(["index", "finalize", "--run", "B"]) == 0
    capsys.readouterr()
    # A superseded run is refused before its accounting: 5 even with jobs missing, not
    # the 1 that tells the nightly script to wait and ask again.
    write_run(storage, RunInfo("A-late", "a.jsonl", 99, T0 + 5, catalogue="shop"))
    for run_id in ("A", "A-late"):
        assert main(["index", "finalize", "--run", run_id]) == ExitCode.SUPERSEDED
        err = capsys.readouterr().err
        assert err.startswith("imgfleet: ") and "run 'B'" in err and "--force" in err
    write_run(storage, RunInfo("X", "x.jsonl", 1, T0 + 20, catalogue="outlet"))
    write_records(storage, 2, make_record("x0", seed=300, run_id="X"))
    assert main(["index", "finalize", "--run", "X"]) == ExitCode.OTHER_CATALOGUE
    assert "catalogue 'outlet'" in capsys.readouterr().err
    manifest = load_manifest(storage)
    assert manifest is not None and len(manifest.generations) == 1
