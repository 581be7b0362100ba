"""`imgfleet serve cms`: the CMS intake HTTP endpoint."""

from __future__ import annotations

import argparse
from typing import Any

from common.config import Settings


def register_service(services: Any, subcommand: Any) -> None:
    cms = subcommand(services, "cms", help="CMS intake: item upserts and deletes over HTTP")
    cms.add_argument("--host", help="default: cms.host")
    cms.add_argument("--port", type=int, help="default: cms.port")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    raise NotImplementedError("serve cms")
