"""`imgfleet config show`: the effective configuration, secrets masked, as a TOML file.

The output is valid TOML that loads back as a configuration file (``--config``): nested
sections come out as their own tables (``[broker.rabbitmq]``), not inline dicts. Masked
secrets load back as the mask, so put the real ones in through the environment.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from imgfleet.cli.parser import subcommand

if TYPE_CHECKING:
    from common.config import Settings


def register(sub: Any) -> None:
    config = subcommand(sub, "config", help="configuration")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    subcommand(
        actions,
        "show",
        handler=_cmd_show,
        log_level="warning",
        help="print the effective configuration as TOML, secrets masked",
    )


def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from common.config import masked_dump

    print(as_toml(masked_dump(settings)), end="")
    return 0


def as_toml(data: dict[str, Any]) -> str:
    """Settings as plain data (``masked_dump``) -> a TOML document, a table per section."""
    import tomli_w

    return tomli_w.dumps(data)
