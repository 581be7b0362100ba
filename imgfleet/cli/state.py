"""What the commands say when the state they read is not there: no store, no queue, no
run of that id, no generation. Said in the operator's words, with what to do next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.storage.base import Storage
    from index.runs import RunInfo

NO_GENERATION = (
    "no index generation has been published yet "
    "(imgfleet index build, or imgfleet index finalize --run RUN_ID after a nightly run)"
)
NOTHING_TO_BUILD = (
    "nothing to build: no segment holds a vector yet; run a worker first "
    "(imgfleet work, or imgfleet demo for the whole pipeline on a synthetic catalogue)"
)
_RUNS_SHOWN = 8


def read_known_run(storage: Storage | None, run_id: str) -> RunInfo:
    """The run's record; for an unknown id, an error that names the runs there are."""
    from index.runs import RunNotFoundError, nightly_runs, read_run, run_key

    # A run that is there is read at once: listing every run (a LIST on S3) is only for
    # the message about one that is not.
    if storage is not None:
        try:
            return read_run(storage, run_id)
        except ValueError:
            pass  # not a run id at all: no such run
        except RunNotFoundError:
            if storage.exists(run_key(run_id)):
                raise  # there, but not a valid run: say that
    known = sorted(nightly_runs(storage)) if storage is not None else []
    raise RunNotFoundError(f"no run {run_id!r} ({_known(known)})")


def _known(runs: list[str]) -> str:
    if not runs:
        return "no run is recorded yet: `imgfleet produce catalogue` records one"
    shown = ", ".join(runs[:_RUNS_SHOWN])
    more = f" and {len(runs) - _RUNS_SHOWN} more" if len(runs) > _RUNS_SHOWN else ""
    return f"known runs: {shown}{more}"
