"""`imgfleet index ...`, `imgfleet search` and the HTTP search endpoint, on real storage."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from common.storage.local import LocalStorage
from imgfleet.cli import main
from imgfleet.servers.search import make_app
from index.publish import build_generation
from index.runs import RunInfo, write_run
from index.search import Searcher
from tests.unit.index.conftest import DIM, RecordFactory, write_records


@pytest.fixture
def env_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStorage:
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "queue.sqlite3"))
    monkeypatch.setenv("IMGFLEET_INDEX__N_SHARDS", "2")
    monkeypatch.setenv("IMGFLEET_INDEX__GRACE_S", "0")
    return LocalStorage(tmp_path / "store")


def last_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_index_commands_end_to_end(
    env_storage: LocalStorage, make_record: RecordFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    write_records(env_storage, 2, *[make_record(f"i{i}", seed=i) for i in range(12)])
    assert main(["index", "build", "--json"]) == 0
    built = last_json(capsys)
    assert built["generation"] == 1 and built["vectors"] == 12  # type: ignore[index]

    write_records(env_storage, 2, make_record("cms", seed=99))
    assert main(["index", "apply", "--json"]) == 0
    assert last_json(capsys)["upserts"] == 1  # type: ignore[index]

    assert main(["index", "build", "--json"]) == 0
    capsys.readouterr()
    assert main(["index", "status", "--json"]) == 0
    status = last_json(capsys)
    assert status["current_generation"] == 2  # type: ignore[index]
    shard = status["generations"][1]["shards"][0]  # type: ignore[index]
    assert shard["factory"] == "IDMap2,Flat" and shard["recall_at_10"] == 1.0

    assert main(["index", "status"]) == 0
    assert "recall@10=1.0" in capsys.readouterr().out

    assert main(["index", "eval", "--json", "--queries", "5"]) == 0
    assert last_json(capsys)["recall_at_k"] == 1.0  # type: ignore[index]

    np.save(env_storage.root / "q.npy", make_record("i4", seed=4).vector.astype(np.float32))
    assert main(["search", "--vector", str(env_storage.root / "q.npy"), "-k", "3", "--json"]) == 0
    hits = last_json(capsys)
    assert hits[0]["item_id"] == "i4" and len(hits) == 3  # type: ignore[index]

    assert main(["search", "--item", "i4", "--json"]) == 0
    assert "i4" not in {h["item_id"] for h in last_json(capsys)}  # type: ignore[union-attr]

    assert main(["index", "rollback", "--json"]) == 0
    # Two full replays, neither older in catalogue state: nothing is undone.
    assert last_json(capsys) == {"current_generation": 1, "replaced": 2, "undoes": None}
    assert main(["index", "rollback", "--to", "7"]) == 1
    assert "not kept" in capsys.readouterr().err

    assert main(["index", "prune", "--keep", "1", "--keep-days", "0", "--json"]) == 0
    pruned = last_json(capsys)
    # Generation 2 is the newest, generation 1 serves: both are kept.
    assert pruned["dropped_generations"] == [] and pruned["kept_generations"] == [1, 2]  # type: ignore[index]


def test_finalize_refuses_incomplete_run_unless_forced(
    env_storage: LocalStorage, make_record: RecordFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(env_storage, RunInfo("night-1", "cat.jsonl", 5, 0.0))
    write_records(
        env_storage, 2, *[make_record(f"i{i}", seed=i, run_id="night-1") for i in range(3)]
    )
    assert main(["index", "finalize", "--run", "night-1"]) == 1
    captured = capsys.readouterr()
    assert "missing 2 jobs" in captured.err and "missing_jobs" in captured.out
    assert not env_storage.exists("manifest.json")

    assert main(["index", "finalize", "--run", "night-1", "--force", "--json"]) == 0
    record = last_json(capsys)
    assert record["forced"] is True and record["generation"] == 1  # type: ignore[index]
    assert Searcher(env_storage).count() == 3
    assert main(["index", "finalize", "--run", "no-such-run"]) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_search_endpoint_and_reload(storage: LocalStorage, make_record: RecordFactory) -> None:
    write_records(storage, 2, *[make_record(f"i{i}", seed=i) for i in range(10)])
    build_generation(storage, 2, grace_s=0.0)
    query = make_record("i2", seed=2).vector.astype(np.float32).tolist()

    async def scenario() -> None:
        app = make_app(Searcher(storage), reload_interval_s=0.05)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/healthz") as r:
                    assert r.status == 200 and (await r.json())["generation"] == 1
                async with http.post(f"{base}/search", json={"vector": query, "k": 2}) as r:
                    body = await r.json()
                    assert body["hits"][0]["item_id"] == "i2" and len(body["hits"]) == 2
                async with http.get(f"{base}/search", params={"item": "i2", "k": "3"}) as r:
                    assert "i2" not in {h["item_id"] for h in (await r.json())["hits"]}
                async with http.get(f"{base}/search", params={"item": "nope"}) as r:
                    assert r.status == 404
                async with http.post(f"{base}/search", json={"vector": [1.0, 2.0]}) as r:
                    assert r.status == 400
                async with http.post(f"{base}/search", json={"vector": query, "k": 0}) as r:
                    assert r.status == 400

                write_records(storage, 2, make_record("fresh", seed=2000))
                await asyncio.to_thread(build_generation, storage, 2, grace_s=0.0)
                for _ in range(100):  # the background reloader picks up the new manifest
                    async with http.get(f"{base}/healthz") as r:
                        if (await r.json())["generation"] == 2:
                            break
                    await asyncio.sleep(0.05)
                async with http.get(f"{base}/healthz") as r:
                    assert (await r.json()) == {"generation": 2, "vectors": 11}
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert len(query) == DIM
