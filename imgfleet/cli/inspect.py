"""`imgfleet inspect`: why is this image (not) in the index?

Fetches and decodes each input exactly as a worker would (same fetcher, SSRF guard, caps,
decode paths and truncation policy) and reports the outcome. ``--json`` prints one object
per input with: input, status (ok / recovered / failed), reason, error, format, width,
height, bytes, path (decoder path), decoded_fraction, content_hash, etag, last_modified,
redirects, fetch_ms, decode_ms, total_ms, and would_index (what the worker would do).

The decoders (cv2, pyvips, PIL) are imported when an input is inspected, not with the
command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import JobFailure
from imgfleet.cli.output import print_json
from imgfleet.cli.parser import subcommand

if TYPE_CHECKING:
    from common.config import Settings


def register(sub: Any) -> None:
    inspect = subcommand(
        sub,
        "inspect",
        handler=_cmd_inspect,
        log_level="warning",
        help="fetch and decode images and report why each one works or fails",
    )
    inspect.add_argument("inputs", nargs="+", metavar="URL|FILE")
    inspect.add_argument("--json", action="store_true", help="one JSON object per input")


def _cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    return run_inspect(args.inputs, settings, as_json=args.json)


def input_url(target: str) -> str:
    """A URL as given; a path as its file:// URL."""
    if "://" in target:
        return target
    return Path(target).resolve().as_uri()


def fetch_input(target: str, settings: Settings) -> bytes:
    """The bytes of one URL or file, fetched as a worker would (search by image)."""
    import asyncio

    from imgfleet.factories import make_fetcher

    async def fetch() -> bytes:
        async with make_fetcher(settings) as fetcher:
            return (await fetcher.fetch(input_url(target))).data

    return asyncio.run(fetch())


async def inspect_inputs(inputs: list[str], settings: Settings) -> list[dict[str, Any]]:
    from common.identity import content_hash
    from imgfleet.factories import make_fetcher
    from workers.decode.cpu import configure_decoder_threads, decode_image, sniff_format

    reports = []
    w = settings.worker
    configure_decoder_threads()
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
                "path": None,  # the decoder that read it; "...-fallback" after another failed
                "decoded_fraction": None,
                "colour_from": None,  # the ICC profile converted to sRGB ("" : none needed)
                "content_hash": None,
                "etag": None,
                "last_modified": None,
                "redirects": None,
                "fetch_ms": None,
                "decode_ms": None,
                "total_ms": None,
                "would_index": False,
            }
            t0 = time.perf_counter()
            try:
                fetched = await fetcher.fetch(input_url(target))
                report.update(
                    fetch_ms=round((time.perf_counter() - t0) * 1000, 2),
                    bytes=len(fetched.data),
                    format=sniff_format(fetched.data),
                    content_hash=content_hash(fetched.data),
                    etag=fetched.etag,
                    last_modified=fetched.last_modified,
                    redirects=fetched.redirects,
                )
                result = decode_image(
                    fetched.data,
                    max_pixels=w.max_pixels,
                    recover_truncated=True,
                    min_decoded_fraction=w.recovered_min_fraction,
                    shrink_on_load=w.decode_shrink_on_load,
                )
                report.update(
                    status="recovered" if result.recovered else "ok",
                    format=result.format,
                    width=result.width,
                    height=result.height,
                    path=result.path,
                    decoded_fraction=round(result.decoded_fraction, 3),
                    colour_from=result.colour_from,
                    decode_ms=round(result.decode_ms, 2),
                    would_index=not result.recovered or w.truncated_policy == "index",
                )
                if result.recovered:
                    report["reason"] = "truncated"
                    report["error"] = (
                        f"decoded the readable part ({result.decoded_fraction:.0%} of rows); "
                        f"worker.truncated_policy is {w.truncated_policy}"
                    )
            except JobFailure as exc:
                report.update(reason=exc.reason.value, error=exc.message)
            report["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            reports.append(report)
    return reports


def run_inspect(inputs: list[str], settings: Settings, *, as_json: bool) -> int:
    import asyncio

    reports = asyncio.run(inspect_inputs(inputs, settings))
    for r in reports:
        if as_json:
            print_json(r)
            continue
        size = f"{r['width']}x{r['height']}" if r["width"] else "-"
        timing = f"{r['total_ms']:.0f} ms"
        line = f"{r['status']:<10}{r['format'] or '-':<6}{size:<12}{timing:>8}  {r['input']}"
        if r["path"] and (r["path"].endswith("-fallback") or r["colour_from"]):
            colour = f", {r['colour_from']} -> sRGB" if r["colour_from"] else ""
            line += f"\n          decoded by {r['path']}{colour}"
        if r["reason"]:
            line += f"\n          {r['reason']}: {r['error']}"
        print(line)
    return 0 if all(r["status"] != "failed" for r in reports) else 1
