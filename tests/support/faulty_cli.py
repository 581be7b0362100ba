"""`python -m tests.support.faulty_cli ARGS`: the imgfleet command line with fault hooks.

Runs ``imgfleet.cli.main`` as `python -m imgfleet` does, after installing the faults the
environment asks for (none: it is the plain command line):

- ``IMGFLEET_FAULT_KILL_AFTER_CONFIRMED_JOBS=N``: SIGKILL this process right after the
  broker confirmed the batch that brings a catalogue run's confirmed jobs to at least N,
  before any checkpoint records them (the crash-and-resume tests of `produce catalogue`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

import producers.nightly.run as nightly_run
from common.schema import Job
from imgfleet.cli import main
from producers.nightly.batches import OnConfirmed

FAULTY_CLI = "tests.support.faulty_cli"  # run as `python -m tests.support.faulty_cli`
KILL_AFTER_JOBS_ENV = "IMGFLEET_FAULT_KILL_AFTER_CONFIRMED_JOBS"


def kill_after_confirmed(limit: int, then: OnConfirmed | None = None) -> OnConfirmed:
    """An ``on_confirmed`` hook that SIGKILLs the process once ``limit`` jobs are confirmed."""
    confirmed = [0]

    def after_confirm(jobs: list[Job]) -> None:
        if then is not None:
            then(jobs)
        confirmed[0] += len(jobs)
        if confirmed[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_confirm


def install_faults(environ: Mapping[str, str] = os.environ) -> None:
    raw = environ.get(KILL_AFTER_JOBS_ENV)
    if not raw:
        return
    limit = int(raw)

    class KilledAfterConfirm(nightly_run.CatalogueRun):
        def __init__(self, *args: Any, on_confirmed: OnConfirmed | None = None, **kw: Any):
            super().__init__(*args, on_confirmed=kill_after_confirmed(limit, on_confirmed), **kw)

    # `produce catalogue` looks the run class up when it runs, so it gets this one.
    nightly_run.CatalogueRun = KilledAfterConfirm  # type: ignore[misc]


# The guard matters: the decode pool spawns processes that re-import __main__.
if __name__ == "__main__":
    install_faults()
    raise SystemExit(main())
