import asyncio
from pathlib import Path

import orjson

from common.brokers.local.broker import LocalBroker
from producers.catalogue.reader import CatalogueItem, RejectedRow, read_catalogue
from producers.nightly.upserts import publish_catalogue


def test_jsonl_bad_rows_are_reported_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "cat.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"item_id": "a", "image_urls": ["http://x/a.jpg", "http://x/a2.jpg"],'
                ' "version": 3}',
                "{broken",
                '{"image_urls": ["http://x/b.jpg"]}',
                '{"item_id": "c", "image_urls": []}',
                '{"item_id": "d", "image_url": "http://x/d.jpg", "version": "x"}',
                "",
                '{"item_id": 42, "image_url": "http://x/e.jpg"}',
            ]
        )
    )
    out = list(read_catalogue(path))
    items = [o for o in out if isinstance(o, CatalogueItem)]
    rejects = [o for o in out if isinstance(o, RejectedRow)]
    assert [(i.item_id, len(i.image_urls), i.version, i.line) for i in items] == [
        ("a", 2, 3, 1),
        ("42", 1, 0, 7),
    ]
    assert [(r.line, r.reason) for r in rejects] == [
        (2, rejects[0].reason),
        (3, "item_id: missing"),
        (4, "image_urls: no image URLs"),
        (5, "version: not a non-negative integer: 'x'"),
    ]
    assert rejects[0].reason.startswith("not JSON: ")
    assert rejects[0].raw == "{broken"


def test_csv_with_several_images_and_a_ragged_row(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_text(
        "item_id,image_urls,version\n"
        "a,http://x/1.jpg|http://x/2.jpg,5\n"
        "b,http://x/3.jpg,1,extra\n"
        ",http://x/4.jpg,1\n"
        "c,http://x/5.jpg,\n"
    )
    out = list(read_catalogue(path))
    assert isinstance(out[0], CatalogueItem) and out[0].image_urls == (
        "http://x/1.jpg",
        "http://x/2.jpg",
    )
    assert out[1] == RejectedRow(
        3, "CSV row has 4 cells, the header has 3", "b,http://x/3.jpg,1,extra"
    )
    assert isinstance(out[2], RejectedRow) and (out[2].line, out[2].reason) == (
        4,
        "item_id: missing",
    )
    assert isinstance(out[3], CatalogueItem) and out[3].version == 0


def test_publish_dedupes_images_and_writes_rejects(tmp_path: Path) -> None:
    path = tmp_path / "cat.jsonl"
    rows = [{"item_id": f"i{n}", "image_urls": [f"http://x/{n}.jpg"]} for n in range(30)]
    rows.append(rows[3])  # a repeated row
    lines = [orjson.dumps(r).decode() for r in rows] + ["nonsense"]
    path.write_text("\n".join(lines))

    async def scenario() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3")
        report = await publish_catalogue(
            broker, path, "run-1", batch_size=7, rejects_path=tmp_path / "rejects.jsonl"
        )
        assert (report.jobs, report.duplicate_images, report.rejected) == (30, 1, 1)
        assert await broker.pending() == 30
        await broker.close()

    asyncio.run(scenario())
    reject = orjson.loads((tmp_path / "rejects.jsonl").read_text().splitlines()[0])
    assert reject["line"] == 32


def test_item_ids_are_taken_as_written_never_trimmed(tmp_path: Path) -> None:
    """A padded id is rejected with its line, not merged into the trimmed id (issue 21, D5);
    the reject names the trimmed id as its item, the one older versions indexed for it."""
    path = tmp_path / "cat.csv"
    path.write_text(
        "item_id,image_urls\n"
        "padded ,http://x/a.jpg\n"  # a CSV export's trailing space
        "padded,http://x/b.jpg\n"
        "in side,http://x/c.jpg\n"
        "\t,http://x/d.jpg\n"
    )
    out = list(read_catalogue(path))
    assert [(i.line, i.item_id) for i in out if isinstance(i, CatalogueItem)] == [
        (3, "padded"),
        (4, "in side"),
    ]
    rejects = [r for r in out if isinstance(r, RejectedRow)]
    assert [(r.line, r.item_id) for r in rejects] == [(2, "padded"), (5, None)]
    assert rejects[0].reason.startswith("item_id: starts or ends with whitespace: 'padded '")
    assert rejects[1].reason == "item_id: missing"
