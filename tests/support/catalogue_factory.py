"""Generated catalogues for the producer tests, with the jobs a run of them must publish.

Rows: item ``sku-<i>`` has ``1 + i % max_images`` images; every ``bad_every``-th row is
followed by a broken one (alternately not JSON and without an item id); every
``dup_every``-th row is followed by an exact repeat of itself. ``drop`` leaves items out
and ``fewer`` lists items with one image less (for the second run's deletes). With
``stale_every``, every ``stale_every``-th item is also listed at an older version with
other URLs and one image more, alternately before and after its current row: the current
row must win (``images`` and ``urls`` describe the current rows only).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from common.identity import image_id_for, job_id_for


@dataclass
class Written:
    path: Path
    rows: int = 0
    bad_rows: int = 0
    duplicate_rows: int = 0
    images: dict[int, tuple[str, str]] = field(default_factory=dict)  # image id -> item, key
    urls: dict[int, str] = field(default_factory=dict)  # image id -> URL
    stale_rows: int = 0

    def job_ids(self, run_id: str, op: str = "upsert") -> set[str]:
        return {job_id_for(run_id, image_id, op) for image_id in self.images}

    def gone_since(self, previous: Written) -> dict[int, tuple[str, str]]:
        return {i: v for i, v in previous.images.items() if i not in self.images}


def default_url(i: int, key: int) -> str:
    return f"http://127.0.0.1:9/img/{i}/{key}.jpg"


def write_catalogue(
    path: Path,
    n_items: int,
    *,
    max_images: int = 3,
    bad_every: int = 97,
    dup_every: int = 53,
    drop: Collection[int] = (),
    fewer: Collection[int] = (),
    url: Callable[[int, int], str] = default_url,
    version: int = 1,
    stale_every: int = 0,
) -> Written:
    out = Written(path)
    drop, fewer = set(drop), set(fewer)
    with path.open("wb") as fh:
        for i in range(n_items):
            if i in drop:
                continue
            n = 1 + i % max_images
            if i in fewer and n > 1:
                n -= 1
            item_id = f"sku-{i:07d}"
            row = orjson.dumps(
                {
                    "item_id": item_id,
                    "image_urls": [url(i, k) for k in range(n)],
                    "version": version,
                }
            )
            stale = b""
            if stale_every and i % stale_every == 0:
                stale = orjson.dumps(
                    {
                        "item_id": item_id,
                        "image_urls": [url(i, k) + "?stale" for k in range(n + 1)],
                        "version": version - 1,
                    }
                )
                out.stale_rows += 1
                out.rows += 1
            after = (i // max(stale_every, 1)) % 2 == 1
            if stale and not after:
                fh.write(stale + b"\n")
            fh.write(row + b"\n")
            if stale and after:
                fh.write(stale + b"\n")
            out.rows += 1
            for k in range(n):
                out.images[image_id_for(item_id, str(k))] = (item_id, str(k))
                out.urls[image_id_for(item_id, str(k))] = url(i, k)
            if i % dup_every == 0:
                fh.write(row + b"\n")
                out.rows += 1
                out.duplicate_rows += 1
            if i % bad_every == 0:
                bad = b"{not json" if (i // bad_every) % 2 else b'{"image_urls": ["http://x/y"]}'
                fh.write(bad + b"\n")
                out.rows += 1
                out.bad_rows += 1
    return out
