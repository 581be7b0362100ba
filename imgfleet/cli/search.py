"""`imgfleet search`: the current (or a kept) index generation, by item, image or vector.

A query image is fetched, decoded and embedded exactly as a worker would
(``imgfleet.factories.embed_one``), so it lands near the vectors the workers wrote.
Exit codes: 0 hits printed; 1 nothing to search (no generation published, the item not
in it, a query image that cannot be used); 2 usage (a bad -k, a vector file that is not a
vector of the index's dimension).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ExitCode
from imgfleet.cli.output import error, print_json
from imgfleet.cli.parser import positive_int, subcommand
from imgfleet.cli.state import NO_GENERATION

if TYPE_CHECKING:
    import numpy as np

    from common.config import Settings


def register(sub: Any) -> None:
    search = subcommand(
        sub,
        "search",
        handler=_cmd_search,
        log_level="warning",
        help="search the current index generation",
    )
    target = search.add_mutually_exclusive_group(required=True)
    target.add_argument("--item", help="find items similar to this item id")
    target.add_argument("--image", help="find items similar to this image (path or URL)")
    target.add_argument("--vector", type=Path, help="a query vector as a .npy file")
    search.add_argument("-k", type=positive_int, default=10, help="items returned (default 10)")
    search.add_argument("--generation", type=positive_int, help="search this kept generation")
    search.add_argument("--json", action="store_true")


def embed_image(target: str, settings: Settings) -> np.ndarray:
    """Fetch, decode and embed one image with the worker's model (search by image)."""
    from imgfleet.cli.inspect import fetch_input
    from imgfleet.factories import embed_one, make_embedder
    from workers.decode.cpu import configure_decoder_threads

    data = fetch_input(target, settings)
    configure_decoder_threads()
    return embed_one(settings, data, lambda: make_embedder(settings))


def _load_vector(path: Path) -> np.ndarray | None:
    import numpy as np

    try:
        vector = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        error(f"--vector {str(path)!r}: not a readable .npy file ({exc})")
        return None
    if not isinstance(vector, np.ndarray) or vector.dtype.kind not in "fiu":
        error(f"--vector {str(path)!r}: not a numeric array")
        return None
    return vector


def _kept_generations(storage: Any) -> list[int]:
    from index.manifest import load_manifest

    manifest = load_manifest(storage)
    return [] if manifest is None else sorted(g.generation for g in manifest.generations)


def _cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from common.errors import JobFailure
    from imgfleet.factories import configure_faiss_threads, existing_storage
    from index.search import Searcher

    storage = existing_storage(settings)  # reading creates nothing
    if storage is None:
        error(NO_GENERATION)
        return ExitCode.FAILED
    if args.generation is not None:
        kept = _kept_generations(storage)
        if kept and args.generation not in kept:
            error(
                f"index generation {args.generation} is not kept "
                f"(kept: {', '.join(map(str, kept))})"
            )
            return ExitCode.FAILED
    configure_faiss_threads(settings)
    searcher = Searcher(storage, generation=args.generation)
    if searcher.generation is None:
        error(NO_GENERATION)
        return ExitCode.FAILED
    if args.item:
        found = searcher.search_by_item(args.item, k=args.k)
        if found is None:
            error(f"item {args.item!r} is not in index generation {searcher.generation}")
            return ExitCode.FAILED
        hits = found
    else:
        if args.vector:
            vector = _load_vector(args.vector)
            if vector is None:
                return ExitCode.CONFIG
        else:
            try:
                vector = embed_image(args.image, settings)
            except JobFailure as exc:
                error(f"cannot use the query image {args.image!r}: {exc.message}")
                return ExitCode.FAILED
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != searcher.dim:
            source = "--vector" if args.vector else "the model's vector"
            error(
                f"{source} has {query.shape[1]} dimensions; index generation "
                f"{searcher.generation} holds {searcher.dim}"
            )
            return ExitCode.CONFIG if args.vector else ExitCode.FAILED
        hits = searcher.search(query, k=args.k)[0]
    if args.json:
        print_json(
            [
                {"item_id": h.item_id, "image_id": h.image_id, "score": round(h.score, 5)}
                for h in hits
            ]
        )
    else:
        for rank, hit in enumerate(hits, start=1):
            print(f"{rank:>3}  {hit.score:.4f}  {hit.item_id}")
    return 0
