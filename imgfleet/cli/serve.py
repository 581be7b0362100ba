"""`imgfleet serve search` (the HTTP search endpoint) and `imgfleet serve cms` (the CMS
intake HTTP endpoint): the long-running services.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Any

from imgfleet.cli.parser import port, subcommand

if TYPE_CHECKING:
    import asyncio
    import signal

    from common.config import Settings
    from producers.cms.runtime import IntakeSettings


def register(sub: Any) -> None:
    serve = subcommand(sub, "serve", help="long-running services")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    http = subcommand(services, "search", handler=_cmd_search, help="HTTP search endpoint")
    http.add_argument("--host", help="default: index.serve_host")
    http.add_argument("--port", type=port, help="default: index.serve_port")

    cms = subcommand(
        services,
        "cms",
        handler=_cmd_cms,
        help="CMS intake: item upserts and deletes over HTTP",
    )
    cms.add_argument("--host", help="default: cms.host")
    cms.add_argument("--port", type=port, help="default: cms.port (0: an ephemeral port)")
    cms.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="accept requests without a token (development only; loopback addresses only)",
    )


def _cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.servers.search import serve

    return serve(settings, host=args.host, port=args.port)


def _cmd_cms(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from imgfleet.factories import intake_settings

    cms = settings.cms.model_copy(
        update={
            "host": args.host or settings.cms.host,
            "port": settings.cms.port if args.port is None else args.port,
        }
    )
    # Checked before anything connects: an open intake is refused at once.
    checked = intake_settings(cms, settings.producer, insecure_no_auth=args.insecure_no_auth)
    asyncio.run(_serve(settings, checked, cms.host, cms.port))
    return 0


async def _serve(settings: Settings, checked: IntakeSettings, host: str, port: int) -> None:
    import asyncio
    import signal

    from common.observability.metrics import IntakeMetrics
    from imgfleet.factories import make_broker, make_storage
    from producers.cms.app import Intake, serve

    metrics = IntakeMetrics().with_process_collectors()
    intake = Intake(make_broker(settings), make_storage(settings), checked, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _stopper(stop, sig))
    await serve(intake, host, port, stop=stop)


def _stopper(stop: asyncio.Event, sig: signal.Signals) -> Any:
    from common.observability.logging import get_logger

    def on_signal() -> None:
        get_logger("cms_intake").info("signal received", signal=sig.name)
        stop.set()

    return on_signal
