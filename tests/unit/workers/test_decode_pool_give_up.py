"""A decode pool that keeps dying is given up: the worker must exit, not spin."""

from __future__ import annotations

import pytest

from common.errors import TransientError, UnrecoverableError
from workers.decode.pool import DecodePool, _crash_for_test, _ready


def test_restarts_in_a_row_give_up_and_a_success_resets_the_count() -> None:
    restarts: list[int] = []
    with DecodePool(1, max_restarts=2, on_restart=lambda: restarts.append(1)) as pool:
        with pytest.raises(TransientError):
            pool._submit_raw(_crash_for_test).result(60)
        assert pool._submit_raw(_ready).result(60) is True  # the new pool works...
        assert pool.restarts_in_a_row == 0  # ...which resets the count
        with pytest.raises(TransientError):
            pool._submit_raw(_crash_for_test).result(60)
        # The second death in a row reaches the limit: the in-flight job is not blamed
        # (no decoder_crashed retry), and nothing more is submitted.
        with pytest.raises(UnrecoverableError) as failure:
            pool._submit_raw(_crash_for_test).result(60)
        assert failure.value.component == "decode_pool"
        assert pool.failed
        with pytest.raises(UnrecoverableError):
            pool._submit_raw(_ready)
    assert len(restarts) == pool.restarts == 3
