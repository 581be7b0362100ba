"""`imgfleet` commands run in the test's process, answering their JSON.

In-process saves an interpreter start and the imports per command. The settings come from
the environment the test sets (``monkeypatch``), or from a configuration file written from
``load_settings`` sections (``config_env``). The log level is given, so the ops commands
leave the client libraries' loggers as they are (they mute them by default).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from imgfleet.cli import main


class Cli:
    """``cli("status")`` runs ``imgfleet status --json`` and returns its last JSON line;
    a non-zero exit fails the test with the command's stderr."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        env: Mapping[str, str],
    ) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        self._capsys = capsys

    def __call__(self, *args: str) -> Any:
        code = main([*args, "--json", "--log-level", "warning"])
        out, err = self._capsys.readouterr()
        assert code == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])


def config_env(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Write ``sections`` as the TOML configuration file ``path``; the variable naming it."""
    path.write_text(tomli_w.dumps({name: dict(values) for name, values in sections.items()}))
    return {"IMGFLEET_CONFIG": str(path)}
