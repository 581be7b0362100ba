"""The CLI surface: help, config show, dlq list, errors people read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from common.brokers.local.broker import LocalBroker
from common.schema import Job
from imgfleet.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "produce", "work", "index", "search", "inspect", "config", "dlq"):
        assert command in out


def test_config_show_masks_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__URL", "amqp://svc:s3cr3t@rabbit:5672/")
    monkeypatch.setenv("IMGFLEET_WORKER__MAX_BATCH", "48")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out
    assert "amqp://svc:***@rabbit:5672/" in out
    assert "max_batch = 48" in out


def test_bad_config_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_WORKER__MAX_BATCH", "lots")
    assert main(["config", "show"]) == 2
    assert "worker.max_batch" in capsys.readouterr().err


def test_dlq_list_groups_by_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = tmp_path / "q.sqlite3"
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(queue))

    async def seed() -> None:
        broker = LocalBroker(queue, poll_interval_s=0.01)
        jobs = [Job(item_id=f"i{n}", url=f"http://x/{n}") for n in range(3)]
        await broker.publish(jobs)
        got = []
        async for delivery in broker.consume():
            got.append(delivery)
            if len(got) == 3:
                break
        for delivery, job, reason in zip(got, jobs, ["http_404", "http_404", "empty"], strict=True):
            await broker.dead_letter(delivery, reason, f"{reason} happened", 1, job)
        await broker.close()

    asyncio.run(seed())
    assert main(["dlq", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listing["counts"] == {"http_404": 2, "empty": 1}
    assert {j["item_id"] for j in listing["jobs"]} == {"i0", "i1", "i2"}
    assert main(["dlq", "list", "--reason", "empty", "--json"]) == 0
    only = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert only["counts"] == {"empty": 1} and only["jobs"][0]["url"] == "http://x/2"


def test_search_before_any_index_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    assert main(["search", "--item", "sku-1"]) == 1
    assert "not in the current index generation" in capsys.readouterr().err
    assert main(["index", "status"]) == 1
