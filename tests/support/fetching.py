"""The worker's fetcher as the composition root assembles it, from flat options.

``url_fetcher(allow_networks=..., max_bytes=...)``: the HTTP options go to the
``HttpFetcher``; file:// URLs are read under the same byte cap unless switched off; s3://
goes to the given ``S3Fetcher``, if any.
"""

from __future__ import annotations

from typing import Any

from workers.fetch.fetcher import FileFetcher, UrlFetcher
from workers.fetch.http import HttpFetcher
from workers.fetch.types import Fetcher


def url_fetcher(
    *, s3: Fetcher | None = None, allow_file_urls: bool = True, **http_options: Any
) -> UrlFetcher:
    http = HttpFetcher(**http_options)
    files = FileFetcher(max_bytes=http.max_bytes) if allow_file_urls else None
    return UrlFetcher(http, s3=s3, files=files)
