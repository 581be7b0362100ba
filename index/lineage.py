"""Catalogue lineage: a generation never replaces one that is newer in catalogue state.

A nightly run reads a whole catalogue dump, so the generation built from it holds that
catalogue *as of the run's start* (plus the CMS changes since, which the build and live
apply take in). Two runs of one catalogue are ordered by when they started, whatever
order they finish in: finalizing yesterday's cut-off run after today's would serve
yesterday's catalogue again, bringing back what today's run deleted and undoing its
version bumps. Building the older run "with every newer segment on top" would only
reproduce the newer run's state under the older run's name, so it is refused instead:

- a generation whose catalogue state is older than the serving one's, or of another
  ``catalogue_name`` (an index serves one catalogue), is refused with its own exit code
  (``SupersededError``: 5, ``OtherCatalogueError``: 6); ``force`` publishes it anyway,
  which is a deliberate rollback to that catalogue (CMS changes since its run started
  are kept);
- a rollback is allowed but names what it undoes (``replacement_problem`` gives the text).

A full replay (``index build`` without ``--run``) resolves every record of every run and
of the CMS by version, so it is as new as the newest run; it spans catalogues (none is
named). Unknown (``None``) fields never refuse: manifests written before this existed.

Pure: no storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.errors import ExitCode, OperatorError


@dataclass(frozen=True)
class CatalogueState:
    """What a generation (or a candidate for one) holds, in catalogue terms."""

    run_id: str | None  # the nightly run it was built from; None: a full replay
    catalogue: str | None  # the run's catalogue_name; None: unknown, or every catalogue
    as_of_s: float | None  # when its catalogue was read (the run's start); None: unknown
    generation: int | None = None  # None: not published yet

    def describe(self) -> str:
        what = f"run {self.run_id!r}" if self.run_id else "a full replay of every segment"
        if self.catalogue:
            what += f" of catalogue {self.catalogue!r}"
        if self.as_of_s is not None:
            what += f" (catalogue read {_utc(self.as_of_s)})"
        if self.generation is not None:
            what = f"generation {self.generation}, {what}"
        return what


def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_s))


class SupersededError(OperatorError):
    """The serving generation is newer in catalogue state than the one to publish."""

    exit_code = ExitCode.SUPERSEDED


class OtherCatalogueError(OperatorError):
    """The serving generation holds another catalogue than the one to publish."""

    exit_code = ExitCode.OTHER_CATALOGUE


@dataclass(frozen=True)
class ReplacementProblem:
    """Serving ``candidate`` instead of ``current`` would undo catalogue state."""

    error: type[OperatorError]  # SupersededError or OtherCatalogueError
    text: str  # what would be undone

    def refusal(self) -> OperatorError:
        """The error a publish raises: says that nothing changed and how to override."""
        return self.error(
            f"{self.text}. Nothing was published. To serve it anyway (a deliberate rollback "
            "to that catalogue; CMS changes made since its run started are kept), add --force"
        )


def replacement_problem(
    current: CatalogueState, candidate: CatalogueState
) -> ReplacementProblem | None:
    """What serving ``candidate`` in place of ``current`` would undo, or None."""
    if current.catalogue and candidate.catalogue and current.catalogue != candidate.catalogue:
        return ReplacementProblem(
            OtherCatalogueError,
            f"{candidate.describe()} would replace {current.describe()}: an index serves one "
            f"catalogue, and every item of {current.catalogue!r} would leave search",
        )
    if (
        current.as_of_s is not None
        and candidate.as_of_s is not None
        and candidate.as_of_s < current.as_of_s
    ):
        newer = f"run {current.run_id!r}" if current.run_id else "the newer runs"
        return ReplacementProblem(
            SupersededError,
            f"{candidate.describe()} is older than {current.describe()}: serving it would "
            f"bring back what {newer} deleted and serve older versions of what it changed",
        )
    return None
