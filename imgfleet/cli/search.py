"""`imgfleet search`: the current (or a kept) index generation, by item, image or vector.

A query image is fetched, decoded and embedded exactly as a worker would
(``imgfleet.factories.embed_one``), so it lands near the vectors the workers wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import Settings
from imgfleet.cli.output import print_json
from imgfleet.cli.parser import subcommand

if TYPE_CHECKING:
    import numpy as np


def register(sub: Any) -> None:
    search = subcommand(
        sub, "search", handler=_cmd_search, help="search the current index generation"
    )
    target = search.add_mutually_exclusive_group(required=True)
    target.add_argument("--item", help="find items similar to this item id")
    target.add_argument("--image", help="find items similar to this image (path or URL)")
    target.add_argument("--vector", type=Path, help="a query vector as a .npy file")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--generation", type=int, help="search this kept generation")
    search.add_argument("--json", action="store_true")


def embed_image(target: str, settings: Settings) -> np.ndarray:
    """Fetch, decode and embed one image with the worker's model (search by image)."""
    from imgfleet.cli.inspect import fetch_input
    from imgfleet.factories import embed_one, make_embedder
    from workers.decode.cpu import configure_decoder_threads

    data = fetch_input(target, settings)
    configure_decoder_threads()
    return embed_one(settings, data, lambda: make_embedder(settings))


def _cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from imgfleet.factories import configure_faiss_threads, make_storage
    from index.search import Searcher

    configure_faiss_threads(settings)
    searcher = Searcher(make_storage(settings), generation=args.generation)
    if args.item:
        found = searcher.search_by_item(args.item, k=args.k)
        if found is None:
            print(f"item {args.item!r} is not in the current index generation", file=sys.stderr)
            return 1
        hits = found
    else:
        if args.vector:
            vector = np.load(args.vector, allow_pickle=False)
        else:
            vector = embed_image(args.image, settings)
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
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
