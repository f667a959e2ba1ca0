"""A value a step could not store stands in as ``Unrestored``: every use names the step."""

from __future__ import annotations

import asyncio

import pytest

from nbagent import UnrestoredValueError
from nbagent._fingerprint import Unrestored


def _lost() -> Unrestored:
    return Unrestored("lock", "plan", "cannot pickle '_thread.lock' object", "t")


def test_with_statement_names_the_step() -> None:
    with pytest.raises(UnrestoredValueError, match="made by step 'plan'"):
        with _lost():
            pass


def test_async_with_names_the_step() -> None:
    async def use() -> None:
        async with _lost():
            pass

    with pytest.raises(UnrestoredValueError, match="made by step 'plan'"):
        asyncio.run(use())


@pytest.mark.parametrize(
    "use",
    [
        lambda v: v.acquire(),
        lambda v: v(),
        lambda v: list(v),
        lambda v: len(v),
        lambda v: v[0],
        lambda v: 1 in v,
        lambda v: next(v),
        lambda v: v.__setitem__(0, 1),
        lambda v: bool(v),
    ],
)
def test_any_use_names_the_step(use: object) -> None:
    with pytest.raises(UnrestoredValueError, match="--rerun"):
        use(_lost())  # type: ignore[operator]
    assert "not restored" in repr(_lost())
