"""`imgfleet inspect`: why is this image (not) in the index?

Fetches and decodes each input exactly as a worker would and reports the outcome.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from common.config import Settings
from common.errors import ImgfleetError
from imgfleet.wiring import make_embedder, make_fetcher
from workers.decode import decode_image, sniff_format


def _as_url(target: str) -> str:
    if "://" in target:
        return target
    return Path(target).resolve().as_uri()


async def inspect_inputs(inputs: list[str], settings: Settings) -> list[dict[str, Any]]:
    reports = []
    async with make_fetcher(settings) as fetcher:
        for target in inputs:
            report: dict[str, Any] = {
                "input": target,
                "status": "failed",
                "reason": None,
                "error": None,
                "format": None,
                "width": None,
                "height": None,
                "bytes": None,
                "fetch_ms": None,
                "decode_ms": None,
            }
            t0 = time.perf_counter()
            try:
                fetched = await fetcher.fetch(_as_url(target))
                report["fetch_ms"] = round((time.perf_counter() - t0) * 1000, 2)
                report["bytes"] = len(fetched.data)
                report["format"] = sniff_format(fetched.data)
                result = decode_image(
                    fetched.data,
                    max_pixels=settings.worker.max_pixels,
                    recover_truncated=True,
                )
                report.update(
                    status="recovered" if result.recovered else "ok",
                    format=result.format,
                    width=result.width,
                    height=result.height,
                    decode_ms=round(result.decode_ms, 2),
                )
                if result.recovered:
                    report["reason"] = "truncated"
                    policy = settings.worker.truncated_policy
                    report["error"] = f"decoded the readable part; policy is {policy}"
            except ImgfleetError as exc:
                report.update(reason=exc.reason.value, error=exc.message)
            reports.append(report)
    return reports


def run_inspect(inputs: list[str], settings: Settings, *, as_json: bool) -> int:
    reports = asyncio.run(inspect_inputs(inputs, settings))
    for r in reports:
        if as_json:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
            continue
        size = f"{r['width']}x{r['height']}" if r["width"] else "-"
        line = f"{r['status']:<10}{r['format'] or '-':<6}{size:<12}{r['input']}"
        if r["reason"]:
            line += f"\n          {r['reason']}: {r['error']}"
        print(line)
    return 0 if all(r["status"] != "failed" for r in reports) else 1


def embed_input(target: str, settings: Settings) -> np.ndarray:
    """Fetch, decode and embed one image (for search by image)."""

    async def _fetch() -> bytes:
        async with make_fetcher(settings) as fetcher:
            return (await fetcher.fetch(_as_url(target))).data

    data = asyncio.run(_fetch())
    pixels = decode_image(data, max_pixels=settings.worker.max_pixels).pixels
    return make_embedder(settings).embed(pixels[np.newaxis])[0]
