#!/usr/bin/env python3
"""Container health check: exit 0 when an imgfleet HTTP health endpoint answers 2xx.

    imgfleet-healthcheck [URL]

Without URL: $IMGFLEET_HEALTHCHECK_URL, else the metrics listener's liveness endpoint
http://127.0.0.1:$IMGFLEET_METRICS__PORT/healthz (port 9400 when unset). The images carry
no curl; this uses the standard library only, so it runs with any Python in the image.
Exit codes follow Docker's HEALTHCHECK: 0 healthy, 1 unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_METRICS_PORT = "9400"  # common.config.MetricsConfig.port; a test keeps them equal
TIMEOUT_S = 4.0  # below the HEALTHCHECK --timeout, so a hang reports itself


def default_url(environ: dict[str, str]) -> str:
    explicit = environ.get("IMGFLEET_HEALTHCHECK_URL", "")
    if explicit:
        return explicit
    port = environ.get("IMGFLEET_METRICS__PORT") or DEFAULT_METRICS_PORT
    return f"http://127.0.0.1:{port}/healthz"


def check(url: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url(dict(os.environ))
    healthy, detail = check(url)
    print(detail)  # Docker keeps the last output in `docker inspect` health logs
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
