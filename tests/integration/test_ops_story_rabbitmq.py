"""The 3 a.m. story on RabbitMQ with real workers: status -> dlq list -> fix the origin ->
requeue, and the next run indexes exactly the jobs that had failed.

The ops commands' semantics on every broker are in tests/contract/test_broker_contract.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from common.storage.local import LocalStorage
from index.segments import list_segments, read_segment
from tests.support.cli import Cli
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.rabbitmq import RabbitFleet

pytestmark = [pytest.mark.integration, pytest.mark.corpus(items=12, seed=5)]  # `served`


def _run_ids_in_segments(store_root: Path, run_id: str) -> set[int]:
    storage = LocalStorage(store_root)
    ids: set[int] = set()
    for key in list_segments(storage):
        segment = read_segment(storage, key)
        ids.update(int(i) for i in segment.image_ids[segment.run_ids == run_id])
    return ids


def _work(fleet: RabbitFleet) -> None:
    worker = fleet.spawn("work", "--until-idle", "--worker-id", "w1")
    out, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, out.decode()[-3000:]


def test_requeue_after_the_origin_is_fixed_indexes_exactly_the_failed_jobs(
    tmp_path: Path,
    served: tuple[RabbitFleet, ImageServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet, server = served
    imgfleet_env = {k: v for k, v in fleet.env().items() if k.startswith("IMGFLEET_")}
    cli = Cli(monkeypatch, capsys, imgfleet_env)
    good = [img for item in fleet.corpus.items for img in item.images if img.kind == "jpeg"][:8]
    assert len(good) == 8
    flaky, flaky_forever = good[:3], good[3]
    catalogue = tmp_path / "story.jsonl"
    rows = []
    for n, image in enumerate(good):
        rows.append(
            {"item_id": f"sku-{n}", "image_urls": [fleet.corpus.url_of(image, fleet.base_url)]}
        )
    rows.append({"item_id": "sku-gone", "image_urls": [f"{fleet.base_url}/images/missing.jpg"]})
    catalogue.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for image in [*flaky, flaky_forever]:
        server.fail_next(image.filename, 503, times=10_000)

    produced = cli("produce", "catalogue", str(catalogue), "--run-id", "night")
    assert produced["jobs"] == 9
    _work(fleet)

    # status: the run is accounted for, with its failures by reason.
    before = cli("status", "--run", "night")
    (run,) = before["runs"]
    indexed = _run_ids_in_segments(fleet.store_root, "night")
    letters = fleet.dead_letters()
    assert Counter(d.reason for d in letters) == Counter({"http_5xx": 4, "http_404": 1})
    assert (
        (run["expected"], run["indexed"], run["failed"], run["remaining"])
        == (
            9,
            len(indexed),
            len(letters),
            0,
        )
        == (9, 4, 5, 0)
    )
    assert run["failures_by_reason"] == {"http_5xx": 4, "http_404": 1}
    assert before["dead_letters"]["total"] == 5
    assert {lane["lane"]: lane["ready"] for lane in before["lanes"]}["dlq"] == 5

    # dlq list: grouped by reason.
    listing = cli("dlq", "list")
    assert [(g["reason"], g["count"]) for g in listing["by_reason"]] == [
        ("http_5xx", 4),
        ("http_404", 1),
    ]

    # Fix the origin (all but one flaky image) and requeue what failed with 5xx.
    server.clear_faults()
    server.fail_next(flaky_forever.filename, 503, times=10_000)
    dry = cli("requeue", "--reason", "http_5xx", "--dry-run")
    assert dry["dry_run"] and dry["by_reason"] == {"http_5xx": 4}
    assert len(fleet.dead_letters()) == 5  # a dry run moves nothing
    moved = cli("requeue", "--reason", "http_5xx")
    assert moved["moved"] == 4 and moved["by_reason"] == {"http_5xx": 4}
    assert [d.reason for d in fleet.dead_letters()] == ["http_404"]  # the 404 stayed
    _work(fleet)

    after = cli("status", "--run", "night")
    (run,) = after["runs"]
    indexed = _run_ids_in_segments(fleet.store_root, "night")
    letters = fleet.dead_letters()
    assert (run["indexed"], run["failed"], run["remaining"]) == (len(indexed), len(letters), 0)
    assert (run["indexed"], run["failed"]) == (7, 2)
    assert Counter(d.reason for d in letters) == Counter({"http_5xx": 1, "http_404": 1})
    # The job that failed again keeps its first failure in its history.
    again = next(d for d in letters if d.reason == "http_5xx")
    shown = cli("dlq", "show", again.dlq_id)["letters"][0]
    assert shown["item_id"] == "sku-3"
    assert [h["reason"] for h in shown["history"]] == ["http_5xx"]
    assert shown["job"]["lane"] == "live"
