"""The index's operator errors: printed by the CLI as they are, each with its exit code."""

from __future__ import annotations

import pytest

from common.errors import ExitCode, JobFailure, OperatorError
from index.generations import GenerationError
from index.manifest import ManifestConflictError
from index.records import IndexBuildError
from index.runs import RunInfo, RunNotFoundError, RunStillPublishingError
from index.shardset import ShardSetError


@pytest.mark.parametrize(
    "error",
    [
        GenerationError("no index generation has been published yet"),
        ManifestConflictError("the manifest kept changing under us"),
        IndexBuildError("cannot build a generation"),
        RunNotFoundError("no run file 'runs/x.json'"),
        RunStillPublishingError(RunInfo("night-1", "cat", 0, 0.0, state="publishing")),
        ShardSetError("shard 1 has dim 8, others have 16"),
    ],
)
def test_index_errors_are_operator_errors_that_exit_1(error: OperatorError) -> None:
    assert isinstance(error, OperatorError) and not isinstance(error, JobFailure)
    assert error.exit_code == ExitCode.FAILED  # what `imgfleet index ...` has always returned
