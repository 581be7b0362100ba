"""The CLI surface: help, config show, dlq list, errors people read."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import pytest

from common.brokers.local.broker import LocalBroker
from common.config import load_settings, masked_dump
from common.schema import Job
from common.storage.local import LocalStorage
from imgfleet.cli import main
from index.runs import RunInfo, write_run


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
    err = capsys.readouterr().err
    assert "no index generation has been published yet" in err and "sku-1" not in err
    (tmp_path / "store").mkdir()  # a store, but nothing published in it
    assert main(["search", "--item", "sku-1"]) == 1
    assert "no index generation has been published yet" in capsys.readouterr().err
    assert main(["index", "status"]) == 1


def test_config_show_is_a_config_file_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__RABBITMQ__PUBLISH_WINDOW", "32")
    monkeypatch.setenv("IMGFLEET_BROKER__KAFKA__RETRY_DELAYS_S", "[1.5, 60]")
    monkeypatch.setenv("IMGFLEET_CMS__TOKENS", '["tok-secret-1"]')
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    parsed = tomllib.loads(shown)  # nested sections are tables, not inline JSON
    assert parsed["broker"]["rabbitmq"]["publish_window"] == 32
    assert "tok-secret-1" not in shown
    for name in ("IMGFLEET_BROKER__RABBITMQ__PUBLISH_WINDOW", "IMGFLEET_CMS__TOKENS"):
        monkeypatch.delenv(name)
    monkeypatch.delenv("IMGFLEET_BROKER__KAFKA__RETRY_DELAYS_S")
    config = tmp_path / "shown.toml"
    config.write_text(shown)
    loaded = load_settings(config)
    assert masked_dump(loaded) == parsed
    assert loaded.broker.kafka.retry_delays_s == [1.5, 60.0]


def test_unknown_runs_and_empty_builds_are_said_in_the_operators_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "q.sqlite3"))
    storage = LocalStorage(tmp_path / "store")
    for run_id in ("night-2", "night-1"):
        write_run(storage, RunInfo(run_id, "c.jsonl", 3, 1.0))
    for argv in (["status", "--run", "nope"], ["index", "finalize", "--run", "nope"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["imgfleet: no run 'nope' (known runs: night-1, night-2)"]
    assert main(["index", "build"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imgfleet: nothing to build: no segment holds a vector yet")
    assert "internal_error" not in err and "run a worker first" in err


def test_read_only_commands_leave_no_state_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In an empty directory (the default paths: ./imgfleet-data/...) nothing is created,
    and each command says there is nothing yet."""
    for name in ("IMGFLEET_STORAGE__ROOT", "IMGFLEET_BROKER__LOCAL_PATH", "IMGFLEET_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (status["lanes"], status["runs"], status["dead_letters"]["total"]) == ([], [], 0)
    assert main(["status"]) == 0
    assert "nothing yet" in capsys.readouterr().out
    assert main(["dlq", "list"]) == 0
    assert "nothing yet: there is no local queue" in capsys.readouterr().out
    assert main(["requeue", "--reason", "http_404", "--dry-run"]) == 0
    assert main(["dlq", "show", "x"]) == 1
    for argv in (["search", "--item", "x"], ["index", "status"], ["index", "eval"]):
        assert main(argv) == 1
        assert "no index generation has been published yet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_starts_no_metrics_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port_file = tmp_path / "metrics.port"
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("IMGFLEET_METRICS__PORT", "0")
    monkeypatch.setenv("IMGFLEET_METRICS__PORT_FILE", str(port_file))
    catalogue = tmp_path / "c.jsonl"
    catalogue.write_text('{"item_id": "a", "image_urls": ["http://img.test/a.jpg"]}\n')
    assert main(["produce", "catalogue", str(catalogue), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 1
    assert not port_file.exists()  # the listener writes it once it listens


def test_search_says_what_is_wrong_with_a_query_vector_or_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from index.publish import build_generation
    from index.segments import SegmentWriter, VectorRecord

    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    storage = LocalStorage(tmp_path / "store")
    writer = SegmentWriter(storage, 2, "w-test")
    for n in range(4):
        vector = np.random.default_rng(n).random(4).astype(np.float32)
        writer.add(VectorRecord(n + 1, f"sku-{n}", 1, "h", "m", vector))
    writer.flush()
    build_generation(storage, 2, grace_s=0.0)
    capsys.readouterr()  # the build's own log lines
    np.save(tmp_path / "dim3.npy", np.ones(3, np.float32))
    (tmp_path / "text.npy").write_text("not a vector")
    cases = [
        (["--vector", str(tmp_path / "dim3.npy")], 2, "--vector has 3 dimensions; index"),
        (["--vector", str(tmp_path / "text.npy")], 2, "not a readable .npy file"),
        (["--vector", str(tmp_path / "absent.npy")], 2, "not a readable .npy file"),
        (["--item", "sku-1", "--generation", "9"], 1, "generation 9 is not kept (kept: 1)"),
        (["--item", "nope"], 1, "item 'nope' is not in index generation 1"),
    ]
    for argv, code, message in cases:
        assert main(["search", *argv]) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert main(["search", "--item", "sku-1", "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == 2
