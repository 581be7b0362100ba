"""Decode robustness: damaged and odd images through imgfleet's decoder and each decoder alone.

Same corpus, same run, every decode in a child process.

What it measures: for every file of a generated corpus of damaged images, whether each
contender returns pixels (``decoded``), refuses (an exception, or no pixels), kills its
process (``crash``) or does not answer within the per-file timeout (``hang``):

- ``imgfleet``: ``workers.decode.cpu.decode_image`` with the worker's defaults
  (``max_pixels=50_000_000``, ``recover_truncated=True``, ``min_decoded_fraction=0.5``); a
  ``JobFailure`` is a refusal, anything else escaping is an ``error``. Its ``result.path``
  (which decoder produced the pixels) and ``decoded_fraction`` are kept;
- ``pillow``: ``Image.open(...).load()`` then ``convert("RGB")``;
- ``opencv``: ``cv2.imdecode(..., IMREAD_UNCHANGED)`` is not None;
- ``vips``: ``pyvips.Image.new_from_buffer(data, "", fail_on="error")`` then ``.avg()``.

A JPEG a decoder alone returns as mostly libjpeg's grey fill (less than the worker's
minimum decoded fraction, 0.5, of its rows above the fill) does not count as decoded: the
rule imgfleet follows, so that neither side scores for a picture that is mostly missing.

The union is the files (bombs excluded) at least one decoder alone decodes; ``ratio`` is
the share of the union imgfleet decodes. Targets: ratio >= 0.99, no imgfleet crash, hang or
escaped error, every bomb refused, p99 time on a refused file under 1 s. The files of the
union imgfleet misses are listed with the decoders that read them: what the fallback chain
in ``workers/decode/cpu.py`` could learn next.

The corpus (``bench/support/corrupt.py``; deterministic for ``--seed``): a few clean
photographic-ish images (2 for ``--quick``, 6 otherwise; 200-1200 px a side) encoded as
baseline and progressive JPEG, PNG (RGB, RGBA, palette, 16-bit grey; 8 KiB IDATs with
gAMA / pHYs / tEXt, as common encoders write them), WebP (lossy, lossless, alpha), GIF,
BMP and LZW TIFF; each encoding truncated at 1%..99%, bit-flipped in its header and in its
entropy / IDAT / pixel data, zero-filled at the tail and served under a wrong suffix; PNGs
with bad CRCs on ancillary and critical chunks, an unknown critical chunk, reordered chunks,
no IEND and a second IHDR; JPEGs with bogus markers in the entropy data and a DHT or DQT
missing or repeated; empty, zero-filled, HTML and text bodies; decompression bombs in every
format (headers claiming 30000x30000 and up, a real 1-bit 10000x10000 PNG, one just over the
cap). 327 files (231 MB in memory) with ``--quick``, 1526 (~1 GB) without.

Every decode runs in one of two spawned worker processes, one file and one contender at a
time, with a per-file timeout (10 s). A worker that dies is a crash of that decoder on
that file; one past its deadline is killed, and the file is a hang; either way a fresh
worker takes over and the bench goes on. Decoders alone get the same pixel cap as imgfleet,
by their own means: ``Image.MAX_IMAGE_PIXELS`` set so that Pillow raises above 50 M pixels,
``OPENCV_IO_MAX_IMAGE_PIXELS`` at 50 M, a header check before libvips decodes; bombs are not
given to OpenCV and libvips at all (``not_attempted``). Each worker runs under a 4 GiB
address-space limit, so that a header that lies past those checks fails in its process
instead of taking the machine. Every decoder runs single-threaded
(``configure_decoder_threads``), as in the worker pool.

    python bench/robustness.py [--quick] [--json] [--seed N] [--timeout S] [--workers N]
                               [--write-corpus DIR]

``--quick`` took 11 s on the 2-core VM (load ~2.2): 2.4 s to build the corpus, 8.8 s for
1288 decodes. With ``--json`` the last line of stdout is one JSON object with every figure
and ``ratio``; progress goes to stderr. ``--write-corpus DIR`` also writes the files and a
``manifest.json`` of their records, to feed a failing one to a decoder by hand.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The repository root instead of bench/ itself: bench/ holds scripts named like stdlib
# modules (queue.py), which would shadow them for this process and its spawned children;
# nothing above this may import the queue module (concurrent.futures, multiprocessing do).
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

from bench.support.corrupt import (  # noqa: E402
    ALONE,
    CONTENDERS,
    CRASH,
    DAMAGE_KINDS,
    DECODED,
    ERROR,
    FULL,
    HANG,
    IMGFLEET,
    NOT_ATTEMPTED,
    PIXEL_CAP,
    QUICK,
    REFUSED,
    STATUSES,
    CorruptFile,
    build_corpus,
    score,
)
from bench.support.harness import bench_parser, host_figures, machine_summary, report  # noqa: E402

TIMEOUT_S = 10.0
# A spawned worker imports Pillow, OpenCV, libvips and the decoder in ~1 s on the 2-core VM
# (load ~2); a minute before a start counts as failed leaves room for a loaded machine.
STARTUP_TIMEOUT_S = 60.0
# 4 GiB of address space per worker: an idle worker with every decoder loaded maps ~0.9 GiB,
# and a 50 M pixel RGBA decode needs 0.2 GiB more; the rest is headroom, not a budget.
WORKER_ADDRESS_SPACE = 4 << 30
TARGET_RATIO = 0.99
TARGET_REFUSED_P99_S = 1.0
PROGRESS_EVERY_S = 5.0
DECODE_KWARGS: dict[str, Any] = {
    "max_pixels": PIXEL_CAP,
    "recover_truncated": True,
    "min_decoded_fraction": 0.5,
}


# --- worker side: what runs in the spawned processes --------------------------------------


def _child_setup() -> None:
    import resource
    import warnings

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = (
        WORKER_ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(hard, WORKER_ADDRESS_SPACE)
    )
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    # libjpeg, libpng and libvips print a warning per damaged file: thousands of lines
    # that say nothing the statuses do not.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)

    from PIL import Image

    from workers.decode.cpu import configure_decoder_threads

    configure_decoder_threads()
    # Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS: this makes that
    # the worker's 50 M pixel cap.
    Image.MAX_IMAGE_PIXELS = PIXEL_CAP // 2
    warnings.filterwarnings("ignore")


def _decode_imgfleet(data: bytes) -> dict[str, Any]:
    from common.errors import JobFailure
    from workers.decode.cpu import decode_image

    try:
        result = decode_image(data, **DECODE_KWARGS)
    except JobFailure as exc:
        return {"status": REFUSED, "reason": exc.reason.value, "error": str(exc)[:200]}
    except Exception as exc:
        return {"status": ERROR, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"status": DECODED, "path": result.path, "fraction": float(result.decoded_fraction)}


def _decode_pillow(data: bytes) -> dict[str, Any]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img.convert("RGB")
    return {"status": DECODED}


def _decode_opencv(data: bytes) -> dict[str, Any]:
    import cv2
    import numpy as np

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        return {"status": REFUSED, "error": "imdecode returned None"}
    return _unless_mostly_fill(data, array)


def _decode_vips(data: bytes) -> dict[str, Any]:
    import pyvips

    img = pyvips.Image.new_from_buffer(data, "", fail_on="error")
    if img.width * img.height > PIXEL_CAP:  # the header only: no pixels decoded yet
        return {"status": REFUSED, "error": f"{img.width}x{img.height} over the pixel cap"}
    if not data.startswith(b"\xff\xd8"):
        img.avg()
        return {"status": DECODED}
    return _unless_mostly_fill(data, img.numpy())


def _unless_mostly_fill(data: bytes, array: Any) -> dict[str, Any]:
    """A JPEG decoder alone held to the rule imgfleet follows: where libjpeg stopped, it
    fills the rest with mid grey (128); a picture that is mostly that fill is no decode
    (``DECODE_KWARGS["min_decoded_fraction"]``), whoever produced it."""
    import numpy as np

    if not data.startswith(b"\xff\xd8") or array.ndim != 3 or array.shape[2] != 3:
        return {"status": DECODED}
    filled = (array == 128).all(axis=(1, 2))
    trailing = len(filled) if filled.all() else int(np.argmin(filled[::-1]))
    fraction = 1.0 - trailing / max(len(filled), 1)
    if fraction < DECODE_KWARGS["min_decoded_fraction"]:
        return {"status": REFUSED, "error": f"mostly grey fill ({fraction:.0%} decoded)"}
    return {"status": DECODED, "fraction": fraction}


_DECODERS = {
    IMGFLEET: _decode_imgfleet,
    "pillow": _decode_pillow,
    "opencv": _decode_opencv,
    "vips": _decode_vips,
}


def child_main(conn: Any) -> None:
    """A worker: (contender, bytes) in, an outcome dict out, until None."""
    _child_setup()
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        contender, data = task
        started = time.perf_counter()
        try:
            out = _DECODERS[contender](data)
        except Exception as exc:  # a decoder alone refusing the bytes
            out = {"status": REFUSED, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["seconds"] = time.perf_counter() - started
        conn.send(out)


# --- parent side --------------------------------------------------------------------------


class _Worker:
    """One spawned process with a pipe, running one task at a time.

    Not a ProcessPoolExecutor: when one of its processes dies, every future in flight fails
    with BrokenProcessPool, so a crash cannot be pinned on one file (with two workers, the
    other file is lost too). A pipe per process says exactly which task it died on.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.task: tuple[int, str] | None = None
        self.deadline = float("inf")
        self.restarts = -1
        self._start()

    def _start(self) -> None:
        self.restarts += 1
        conn, child_conn = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=child_main, args=(child_conn,), daemon=True)
        self.proc.start()
        child_conn.close()
        self.conn = conn
        if not conn.poll(STARTUP_TIMEOUT_S) or conn.recv() != "ready":
            raise RuntimeError(f"decode worker did not start (exit code {self.proc.exitcode})")

    def submit(self, key: tuple[int, str], data: bytes, timeout_s: float) -> bool:
        self.task = key
        try:
            self.conn.send((key[1], data))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return False
        self.deadline = time.perf_counter() + timeout_s
        return True

    def replace(self) -> int | None:
        """Kill the process (if alive), start a fresh one; the old exit code."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        code = self.proc.exitcode
        self.conn.close()
        self._start()
        self.task, self.deadline = None, float("inf")
        return code

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def run_decodes(
    files: Sequence[CorruptFile], n_workers: int, timeout_s: float
) -> tuple[dict[tuple[int, str], dict[str, Any]], int]:
    """Every contender on every file (bombs not given to OpenCV and libvips); the outcomes
    by (file index, contender), and how many workers were restarted."""
    import multiprocessing
    from multiprocessing.connection import wait

    results: dict[tuple[int, str], dict[str, Any]] = {}
    tasks: list[tuple[int, str]] = []
    for i, f in enumerate(files):
        for contender in CONTENDERS:
            if f.is_bomb and contender in ("opencv", "vips"):
                results[(i, contender)] = {"status": NOT_ATTEMPTED, "seconds": 0.0}
            else:
                tasks.append((i, contender))
    tasks.reverse()  # popped from the end: file order, contenders interleaved
    total = len(tasks)
    ctx = multiprocessing.get_context("spawn")
    workers = [_Worker(ctx) for _ in range(n_workers)]
    started = last = time.perf_counter()
    try:
        while tasks or any(w.task for w in workers):
            for w in workers:
                while w.task is None and tasks:
                    key = tasks.pop()
                    if not w.submit(key, files[key[0]].data, timeout_s):
                        code = w.replace()
                        results[key] = {"status": CRASH, "seconds": 0.0, "exitcode": code}
            busy = [w for w in workers if w.task is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.perf_counter())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                assert w.task is not None
                key = w.task
                if w.conn in ready:
                    try:
                        results[key] = w.conn.recv()
                        w.task, w.deadline = None, float("inf")
                    except (EOFError, ConnectionResetError, OSError):
                        code = w.replace()
                        results[key] = {"status": CRASH, "seconds": 0.0, "exitcode": code}
                elif time.perf_counter() >= w.deadline:
                    w.replace()
                    results[key] = {"status": HANG, "seconds": timeout_s}
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                done = total - len(tasks) - sum(1 for w in workers if w.task)
                print(
                    f"robustness: {done}/{total} decodes ({now - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for w in workers:
            w.close()
    print(
        f"robustness: {total}/{total} decodes ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return results, sum(w.restarts for w in workers)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    # nearest rank: the value q% of the files are at or under
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def write_corpus(files: Sequence[CorruptFile], root: Path) -> None:
    import orjson

    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f.name).write_bytes(f.data)
    manifest = [f.record() for f in files]
    (root / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def main() -> int:
    parser = bench_parser(
        __doc__.splitlines()[0],
        quick_help="327 files from 2 clean images (~11 s on 2 cores)",
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="per-file seconds")
    parser.add_argument("--workers", type=int, default=2, help="decode processes")
    parser.add_argument("--write-corpus", type=Path, default=None, help="also write the files")
    args = parser.parse_args()
    started = time.perf_counter()
    # Read by OpenCV once, when the workers import it: the pixel cap for OpenCV alone (its
    # own default is 2^30), set here so the spawned workers inherit it.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(PIXEL_CAP)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    spec = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    files = build_corpus(args.seed, spec)
    corpus_s = time.perf_counter() - t0
    print(
        f"robustness: {len(files)} files ({sum(len(f.data) for f in files) / 1e6:.0f} MB) "
        f"built in {corpus_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    if args.write_corpus:
        write_corpus(files, args.write_corpus)

    t0 = time.perf_counter()
    outcomes, restarts = run_decodes(files, args.workers, args.timeout)
    decode_s = time.perf_counter() - t0
    n = len(files)
    statuses = {c: [outcomes[(i, c)]["status"] for i in range(n)] for c in CONTENDERS}
    figures = score(files, statuses)

    mine = [outcomes[(i, IMGFLEET)] for i in range(n)]
    refused_s = [o["seconds"] for o in mine if o["status"] == REFUSED]
    decoded_s = [o["seconds"] for o in mine if o["status"] == DECODED]
    paths = Counter(o["path"] for o in mine if o["status"] == DECODED)
    recovered = [i for i, o in enumerate(mine) if o["status"] == DECODED and o["fraction"] < 1.0]
    reasons = Counter(o.get("reason", "?") for o in mine if o["status"] == REFUSED)
    index_of = {f.name: i for i, f in enumerate(files)}
    for miss in figures["missed_files"]:
        o = mine[index_of[miss["name"]]]
        miss["imgfleet_reason"] = o.get("reason")
        miss["imgfleet_error"] = o.get("error", "")[:160]
    missed_reasons = Counter(
        mine[i].get("reason", mine[i]["status"])
        for i in range(n)
        if not files[i].is_bomb
        and mine[i]["status"] != DECODED
        and any(statuses[a][i] == DECODED for a in ALONE)
    )
    incidents = [
        {
            "contender": c,
            "name": files[i].name,
            "damage": files[i].damage,
            "detail": files[i].detail,
            "status": outcomes[(i, c)]["status"],
            "exitcode": outcomes[(i, c)].get("exitcode"),
            "error": outcomes[(i, c)].get("error", "")[:160],
        }
        for c in CONTENDERS
        for i in range(n)
        if outcomes[(i, c)]["status"] in (CRASH, HANG)
        or (c == IMGFLEET and statuses[c][i] == ERROR)
    ]
    counts = figures["counts"]
    refused_p99 = _percentile(refused_s, 99)
    targets = {
        "ratio": figures["ratio"] >= TARGET_RATIO,
        "no_crashes": counts[IMGFLEET][CRASH] == 0,
        "no_hangs": counts[IMGFLEET][HANG] == 0,
        "no_errors": counts[IMGFLEET][ERROR] == 0,
        "bombs_refused": figures["bombs_refused"] == figures["bombs"],
        "refused_p99": refused_p99 < TARGET_REFUSED_P99_S,
    }
    wall_s = time.perf_counter() - started

    result: dict[str, Any] = {
        "bench": "robustness",
        "quick": args.quick,
        "seed": args.seed,
        "files": n,
        "corpus_by_damage": dict(Counter(f.damage for f in files)),
        "corpus_by_base": dict(Counter(f.base for f in files)),
        "corpus_mb": round(sum(len(f.data) for f in files) / 1e6, 1),
        "decode_kwargs": DECODE_KWARGS,
        "timeout_s": args.timeout,
        **{k: v for k, v in figures.items() if k not in ("files",)},
        "target_ratio": TARGET_RATIO,
        "targets_met": targets,
        "all_targets_met": all(targets.values()),
        "imgfleet_paths": dict(paths.most_common()),
        "imgfleet_recovered": len(recovered),
        "imgfleet_recovered_by_damage": dict(Counter(files[i].damage for i in recovered)),
        "imgfleet_refusal_reasons": dict(reasons.most_common()),
        "imgfleet_missed_reasons": dict(missed_reasons.most_common()),
        "imgfleet_refused_p50_ms": round(_percentile(refused_s, 50) * 1000, 2),
        "imgfleet_refused_p99_ms": round(refused_p99 * 1000, 2),
        "imgfleet_refused_max_ms": round(max(refused_s, default=0.0) * 1000, 2),
        "imgfleet_decoded_p50_ms": round(_percentile(decoded_s, 50) * 1000, 2),
        "imgfleet_decoded_p99_ms": round(_percentile(decoded_s, 99) * 1000, 2),
        "decode_seconds": {
            c: round(sum(outcomes[(i, c)]["seconds"] for i in range(n)), 2) for c in CONTENDERS
        },
        "incidents": incidents,
        "worker_restarts": restarts,
        "corpus_s": round(corpus_s, 1),
        "decode_s": round(decode_s, 1),
        "wall_s": round(wall_s, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        **host_figures(),
    }
    return report(result, _lines(result), as_json=args.json)


def _lines(r: dict[str, Any]) -> list[str]:
    counts = r["counts"]
    columns = list(STATUSES)
    lines = [
        f"corpus : {r['files']} files, {r['corpus_mb']} MB, seed {r['seed']} "
        f"({'quick' if r['quick'] else 'full'}); {machine_summary()}",
        "",
        f"{'contender':<10}" + "".join(f"{s:>14}" for s in columns) + f"{'decode s':>10}",
    ]
    for c in CONTENDERS:
        lines.append(
            f"{c:<10}"
            + "".join(f"{counts[c][s]:>14}" for s in columns)
            + f"{r['decode_seconds'][c]:>10.1f}"
        )
    lines += [
        "",
        f"{'damage':<24}{'files':>6}{'union':>6}" + "".join(f"{c:>9}" for c in CONTENDERS),
    ]
    for kind in DAMAGE_KINDS:
        row = r["by_damage"].get(kind)
        if row:
            lines.append(
                f"{kind:<24}{row['files']:>6}{row['union']:>6}"
                + "".join(f"{row[c]:>9}" for c in CONTENDERS)
            )
    met = r["targets_met"]

    def flag(key: str) -> str:
        return "met" if met[key] else "NOT MET"

    lines += [
        "",
        f"union  : {r['union']} files some decoder alone reads (bombs excluded); imgfleet "
        f"{r['imgfleet_in_union']} -> ratio {r['ratio']} (target >= {r['target_ratio']}: "
        f"{flag('ratio')})",
        f"missed : {r['missed']} by damage {r['missed_by_damage']}; imgfleet said "
        f"{r['imgfleet_missed_reasons']}",
        f"only   : {r['imgfleet_only']} files imgfleet decodes and no decoder alone does "
        f"{r['imgfleet_only_by_damage']}",
        f"bombs  : {r['bombs_refused']}/{r['bombs']} refused by imgfleet ({flag('bombs_refused')})",
        f"imgfleet: crashes {counts[IMGFLEET][CRASH]} ({flag('no_crashes')}), hangs "
        f"{counts[IMGFLEET][HANG]} ({flag('no_hangs')}), escaped errors {counts[IMGFLEET][ERROR]}"
        f" ({flag('no_errors')})",
        f"refused: p50 {r['imgfleet_refused_p50_ms']} ms, p99 {r['imgfleet_refused_p99_ms']} ms "
        f"(target < {TARGET_REFUSED_P99_S * 1000:.0f} ms: {flag('refused_p99')}), max "
        f"{r['imgfleet_refused_max_ms']} ms; decoded p50 {r['imgfleet_decoded_p50_ms']} ms, "
        f"p99 {r['imgfleet_decoded_p99_ms']} ms",
        f"paths  : {r['imgfleet_paths']}",
        f"recovered (decoded_fraction < 1): {r['imgfleet_recovered']} "
        f"{r['imgfleet_recovered_by_damage']}",
        f"reasons: {r['imgfleet_refusal_reasons']}",
    ]
    if r["missed_files"]:
        lines += ["", f"missed files (first {len(r['missed_files'])}):"]
        for m in r["missed_files"]:
            lines.append(
                f"  {m['name']:<44} read by {','.join(m['read_by']):<19} imgfleet "
                f"{m['imgfleet_reason'] or m['imgfleet']}: {m['detail'][:60]}"
            )
    if r["incidents"]:
        lines += ["", "crashes / hangs / escaped errors:"]
        for x in r["incidents"]:
            lines.append(
                f"  {x['contender']:<9} {x['status']:<6} {x['name']:<44} exit {x['exitcode']} "
                f"{x['detail'][:50]} {x['error'][:60]}"
            )
    lines.append(
        f"wall   : {r['wall_s']} s (corpus {r['corpus_s']} s, decodes {r['decode_s']} s, "
        f"{r['worker_restarts']} worker restarts, load {r['load_average_1m']})"
    )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
