"""Decode throughput: imgfleet's decode paths against naive Pillow, same mix, same run.

The mix is catalogue-like: 70% baseline JPEG, 15% progressive JPEG, 8% PNG (with alpha),
5% WebP, 2% broken (truncated JPEG, HTML, garbage), 800-2000 px per side, generated here.
Both sides go from bytes in memory to a 224x224 RGB array:

- project: ``workers.decode.cpu.decode_image`` (DCT-domain JPEG downscale, libvips PNG,
  OpenCV WebP, the reference resize + crop); all cores through ``DecodePool`` (shared
  memory returns);
- baseline: ``Image.open(...).convert("RGB").resize((224, 224))``; all cores through a
  plain ``ProcessPoolExecutor`` returning pickled arrays.

    python bench/decode.py [--quick] [--json] [--images N]

The last line with --json is one JSON object; ``ratio`` is project ÷ naive on one core,
``scaling_all_cores`` the project's all-core rate ÷ its one-core rate.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# The repository root instead of bench/ itself: bench/ holds scripts named like stdlib
# modules (queue.py), which would shadow them for this process and its spawned children.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

from bench.support.harness import bench_parser, host_figures, report  # noqa: E402

MIX = (("jpeg", 0.70), ("progressive", 0.15), ("png", 0.08), ("webp", 0.05), ("broken", 0.02))


def _photo(rng: np.random.Generator) -> Any:
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(800, 2001, size=2))
    # A smooth background plus a few flat shapes and mild noise: compresses like a
    # product shot (large flat areas, some texture).
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(100, width // 2)), y0 + int(rng.integers(100, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    # Product shots are clean studio photos: little sensor noise.
    noise = rng.normal(0, 1.5, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


def make_mix(n_images: int, seed: int = 0) -> list[tuple[str, bytes]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds: list[str] = []
    for kind, share in MIX:
        kinds += [kind] * max(1, round(share * n_images))
    kinds = kinds[:n_images]
    rng.shuffle(kinds)  # type: ignore[arg-type]
    out = []
    for n, kind in enumerate(kinds):
        img = _photo(np.random.default_rng([seed, n]))
        buf = io.BytesIO()
        if kind == "jpeg":
            img.save(buf, "JPEG", quality=88)
        elif kind == "progressive":
            img.save(buf, "JPEG", quality=88, progressive=True)
        elif kind == "png":
            alpha = Image.new("L", img.size, 255)
            alpha.paste(0, (0, 0, img.width // 4, img.height))
            rgba = img.copy()
            rgba.putalpha(alpha)
            rgba.save(buf, "PNG", compress_level=6)
        elif kind == "webp":
            img.save(buf, "WEBP", quality=80)
        else:
            which = n % 3
            if which == 0:
                img.save(buf, "JPEG", quality=88)
                data = buf.getvalue()
                buf = io.BytesIO(data[: len(data) * 7 // 10])
            elif which == 1:
                buf = io.BytesIO(b"<!DOCTYPE html><html><body>502</body></html>")
            else:
                buf = io.BytesIO(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40)
        out.append((kind, buf.getvalue()))
    return out


def naive_decode(data: bytes) -> np.ndarray | None:
    from PIL import Image

    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224)))
    except Exception:
        return None


def one_core(
    mix: list[tuple[str, bytes]], chunk: int = 10
) -> tuple[float, float, dict[str, Counter[str]], dict[str, Counter[str]]]:
    """Project and naive in alternating chunks of the mix, so that load from anything else
    on the machine falls on both sides alike; returns (project_s, naive_s, outcomes...)."""
    from common.errors import ImgfleetError
    from workers.decode.cpu import configure_decoder_threads, decode_image

    configure_decoder_threads()
    project_out: dict[str, Counter[str]] = defaultdict(Counter)
    naive_out: dict[str, Counter[str]] = defaultdict(Counter)
    decode_image(mix[0][1])  # warm imports and codec tables
    naive_decode(mix[0][1])
    project_s = naive_s = 0.0
    for start in range(0, len(mix), chunk):
        part = mix[start : start + chunk]
        t0 = time.perf_counter()
        for kind, data in part:
            naive_out[kind]["ok" if naive_decode(data) is not None else "failed"] += 1
        naive_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for kind, data in part:
            try:
                result = decode_image(data)
                project_out[kind]["recovered" if result.recovered else f"ok:{result.path}"] += 1
            except ImgfleetError as exc:
                project_out[kind][f"failed:{exc.reason.value}"] += 1
        project_s += time.perf_counter() - t0
    return project_s, naive_s, project_out, naive_out


def project_all_cores(mix: list[tuple[str, bytes]], processes: int) -> float:
    import asyncio

    from workers.decode.limits import IN_FLIGHT_PER_PROCESS
    from workers.decode.pool import DecodePool

    with DecodePool(processes) as pool:
        asyncio.run(pool.warm_up())

        async def run_all() -> None:
            # As many in flight per process as the pipeline keeps.
            limit = asyncio.Semaphore(processes * IN_FLIGHT_PER_PROCESS)

            async def one(data: bytes) -> None:
                async with limit:
                    # Broken images fail by design; only the time counts here.
                    with contextlib.suppress(Exception):
                        await pool.decode(data)

            await asyncio.gather(*(one(data) for _, data in mix))

        t0 = time.perf_counter()
        asyncio.run(run_all())
        return time.perf_counter() - t0


def naive_all_cores(mix: list[tuple[str, bytes]], processes: int) -> float:
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        list(pool.map(naive_decode, [mix[0][1]] * processes))  # start the processes
        t0 = time.perf_counter()
        futures: list[Future[Any]] = [pool.submit(naive_decode, data) for _, data in mix]
        for future in futures:
            future.result()
        return time.perf_counter() - t0


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], quick_help="small mix, about a minute")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n_images = args.images or (120 if args.quick else 600)

    t0 = time.perf_counter()
    mix = make_mix(n_images)
    make_s = time.perf_counter() - t0
    n = len(mix)
    proj_s, base_s, proj_out, base_out = one_core(mix)
    base_all_s = naive_all_cores(mix, args.processes)
    proj_all_s = project_all_cores(mix, args.processes)
    load_1m = os.getloadavg()[0]

    rates = {
        "project_one_core": n / proj_s,
        "naive_one_core": n / base_s,
        "project_all_cores": n / proj_all_s,
        "naive_all_cores": n / base_all_s,
    }
    result: dict[str, Any] = {
        "bench": "decode",
        "images": n,
        "processes": args.processes,
        **{f"{k}_images_per_s": round(v, 1) for k, v in rates.items()},
        "ratio": round(rates["project_one_core"] / rates["naive_one_core"], 3),
        "ratio_all_cores": round(rates["project_all_cores"] / rates["naive_all_cores"], 3),
        "scaling_all_cores": round(rates["project_all_cores"] / rates["project_one_core"], 3),
        "naive_scaling_all_cores": round(rates["naive_all_cores"] / rates["naive_one_core"], 3),
        "outcomes_project": {k: dict(v) for k, v in sorted(proj_out.items())},
        "outcomes_naive": {k: dict(v) for k, v in sorted(base_out.items())},
        "mix": dict(Counter(kind for kind, _ in mix)),
        "make_mix_s": round(make_s, 1),
        "load_average_1m": round(load_1m, 2),  # other work on the machine skews scaling
        **host_figures(),
    }
    lines = [
        f"mix     : {result['mix']} ({n} images, generated in {make_s:.1f} s)",
        f"one core: project {rates['project_one_core']:.1f}/s, "
        f"naive {rates['naive_one_core']:.1f}/s, ratio {result['ratio']}x",
        f"{args.processes} procs : project {rates['project_all_cores']:.1f}/s, "
        f"naive {rates['naive_all_cores']:.1f}/s, ratio {result['ratio_all_cores']}x",
        f"scaling : project {result['scaling_all_cores']}x on {args.processes} processes "
        f"(naive {result['naive_scaling_all_cores']}x)",
    ]
    lines += [
        f"  {kind:<12} project {dict(proj_out[kind])}  naive {dict(base_out[kind])}"
        for kind in sorted(proj_out)
    ]
    return report(result, lines, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
