"""What a fetch returns, and the role the pipeline's fetch stage depends on.

Light on purpose (no aiohttp, no boto3): the pipeline types itself against ``Fetcher`` and
``FetchResult`` from here, and the concrete fetchers (``http``, ``s3``, the per-scheme
``UrlFetcher``) all return a ``FetchResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class FetchResult:
    data: bytes
    etag: str | None
    last_modified: str | None
    fetch_ms: float
    not_modified: bool = False  # a conditional request answered 304: data is empty
    redirects: int = 0


class Fetcher(Protocol):
    """Fetch one URL; failures raise ``JobFailure`` subclasses with a reason code.

    ``etag`` / ``last_modified`` (what the image had when it was last indexed) make the
    request conditional: an unchanged image comes back ``not_modified`` with no body. They
    are passed only for images the index already holds.
    """

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult: ...
