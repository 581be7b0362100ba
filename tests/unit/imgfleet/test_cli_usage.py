"""Usage errors of the real command line: one line on stderr, exit 2, never a traceback;
a typo is reported by the subcommand it was given to, with the option it resembles.
And the safety net behind the argument types, and what `--help` costs to import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import imgfleet.cli.search as cli_search
from imgfleet.cli import build_parser, log_level, main
from tests.support.fleet import REPO_ROOT


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The test process's environment without its IMGFLEET_ settings, state under tmp."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IMGFLEET_")}
    env["IMGFLEET_STORAGE__ROOT"] = str(tmp_path / "store")
    env["IMGFLEET_BROKER__LOCAL_PATH"] = str(tmp_path / "queue.sqlite3")
    return env


def imgfleet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgfleet", *args],
        cwd=tmp_path,
        env={**clean_env(tmp_path), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_usage_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["search", "--item", "x", "-k", "0"],
            "imgfleet search: error: argument -k: must be at least 1",
        ),
        (["search", "--item", "x", "-k", "-5"], "argument -k: must be at least 1, got '-5'"),
        (["search", "--item", "x", "-k", "many"], "argument -k: a whole number expected"),
        (["search", "--item", "x", "--generation", "0"], "argument --generation"),
        (["index", "eval", "-k", "0"], "imgfleet index eval: error: argument -k"),
        (["index", "eval", "--queries", "-1"], "argument --queries"),
        (["index", "prune", "--keep", "0"], "argument --keep"),
        (["index", "apply", "--watch", "--interval-s", "nan"], "argument --interval-s"),
        (["status", "--runs", "-1"], "argument --runs: must be 0 or more"),
        (["status", "--watch", "0"], "argument --watch: must be above 0"),
        (["dlq", "list", "--limit", "-3"], "argument --limit"),
        (["requeue", "--all", "--limit", "0"], "argument --limit"),
        (["serve", "search", "--port", "70000"], "argument --port: a port is 0 to 65535"),
        (["demo", "--items", "0"], "argument --items"),
        (["produce", "catalogue", "c.jsonl", "--max-rate", "-1"], "argument --max-rate"),
    ],
)
def test_a_bad_argument_value_is_one_line_and_exit_2(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    assert expected in one_usage_line(imgfleet(tmp_path, *argv))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "--jsn"], "imgfleet status: error: unrecognized arguments: --jsn (did"),
        (["status", "--jsn"], "(did you mean --json?)"),
        (["dlq", "list", "--run_id", "r"], "imgfleet dlq list: error: unrecognized arguments"),
        (["work", "--until_idle"], "did you mean --until-idle?"),
        (["requeue", "--reasn", "timeout"], "imgfleet requeue: error: unrecognized arguments"),
        # A typo that also leaves a required option out: the typo is what is reported.
        (["search", "--itme", "x"], "imgfleet search: error: unrecognized arguments: --itme"),
        (["search", "--itme", "x"], "(did you mean --item?)"),
        (["stauts"], "invalid choice: 'stauts'"),
        (["dlq", "lst"], "did you mean 'list'?"),
        # An unknown reason is a typo that would match no letter and move nothing.
        (["requeue", "--reason", "bogus_reason", "--dry-run"], "unknown reason 'bogus_reason'"),
        (["dlq", "list", "--reason", "http404"], "'http404' (did you mean http_404?)"),
    ],
)
def test_typos_are_reported_by_their_subcommand_with_a_suggestion(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    line = one_usage_line(imgfleet(tmp_path, *argv))
    assert expected in line
    assert "usage:" not in line


def test_the_safety_net_turns_a_refused_value_into_one_line_and_lets_bugs_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMGFLEET_STORAGE__ROOT", str(tmp_path / "store"))
    raised: list[BaseException] = [ValueError("k must be >= 1, got 0")]

    def handler(*_: object) -> int:
        raise raised[0]

    monkeypatch.setattr(cli_search, "_cmd_search", handler)
    assert main(["search", "--item", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgfleet search: error: k must be >= 1")
    assert "raised at imgfleet/test_cli_usage.py:" in err[0]  # where: a bug stays findable
    # Debug logging shows the traceback; other errors are bugs and keep theirs.
    with pytest.raises(ValueError, match="k must be"):
        main(["search", "--item", "x", "--log-level", "debug"])
    for bug in (KeyError("x"), TypeError("unhashable"), json.JSONDecodeError("bad", "{", 0)):
        raised[0] = bug
        with pytest.raises(type(bug)):
            main(["search", "--item", "x"])


def test_one_shot_commands_log_warnings_only_unless_asked(tmp_path: Path) -> None:
    from common.config import load_settings

    settings = load_settings()
    parser = build_parser()

    def level(*argv: str) -> str:
        return log_level(parser.parse_args(list(argv)), settings)

    assert level("search", "--item", "x") == "warning"
    assert level("inspect", "a.jpg") == "warning"
    assert level("status") == "error"  # ops commands report for themselves
    assert level("search", "--item", "x", "-v") == "info"
    assert level("-vv", "search", "--item", "x") == "debug"
    assert level("search", "--item", "x", "--log-level", "error") == "error"
    assert level("work") == settings.logging.level  # services log as configured


def test_help_and_usage_errors_import_nothing_heavy(tmp_path: Path) -> None:
    """`imgfleet --help` took 0.47 s, 0.30 s of it pydantic and structlog imported only to
    print help; the parser must stay free of them (and of numpy, torch, faiss)."""
    probe = (
        "import sys\n"
        "from imgfleet.cli import build_parser\n"
        "try:\n"
        "    build_parser().parse_args(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'pydantic', 'structlog', 'numpy', 'torch', 'faiss', 'orjson', 'asyncio'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    for argv in (["--help"], ["search", "-k", "0", "--item", "x"], ["status", "--jsn"]):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *argv],
            cwd=REPO_ROOT,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stdout.strip().splitlines()[-1] == "[]", (argv, proc.stdout, proc.stderr)
