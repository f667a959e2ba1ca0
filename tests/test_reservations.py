"""A reservation held by a process that died mid-call is settled when the run is reopened."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbagent

_DIES_MID_CALL = textwrap.dedent(
    """
    import os, sys
    import nbagent
    run = nbagent.Run("r", store=sys.argv[1], max_cost_usd=1.0)
    run.reserve(0.75)          # the call is in flight ...
    os.kill(os.getpid(), 9)    # ... when the process is killed: never settled
    """
)


def test_reservation_of_a_killed_process_is_billed_at_worst_case(tmp_path: Path) -> None:
    store = tmp_path / "s"
    run = nbagent.Run("r", store=store, max_cost_usd=1.0)
    kept = run.reserve(0.10)  # a live call of this process: must survive the reclaim
    child = subprocess.run([sys.executable, "-c", _DIES_MID_CALL, str(store)], env=os.environ)
    assert child.returncode == -9
    assert round(run.reserved_usd, 2) == 0.85

    reopened = nbagent.Run("r", store=store)
    # the call may have reached the provider, which bills it: counted as spent at worst case
    assert round(reopened.reserved_usd, 2) == 0.10 and round(reopened.spend_usd, 2) == 0.75
    reopened.settle(kept, 0.05)
    assert reopened.reserved_usd == 0 and round(reopened.spend_usd, 2) == 0.80
    reclaimed = reopened.trace().query("kind == 'cap' and status == 'reclaimed'")
    assert len(reclaimed) == 1 and round(reclaimed["cost_usd"].iloc[0], 2) == 0.75
