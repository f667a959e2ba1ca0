"""The step log (nbagent/_steplog.py): a step commit is one append, moved into SQLite later.

What users see: a step committed by a process that was killed before anything moved
its log is there for the next process (replayed, counted, traced); damage in the log
costs at most the steps from the damage on, with a warning; nothing moves twice.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nbagent
from nbagent import _steplog
from nbagent._errors import StoreError
from nbagent._store import Store


def _logged_bytes(path: Path) -> int:
    """Bytes of entries waiting in the store's step log."""
    log = _steplog.StepLog(path / "cache.db-steplog")
    try:
        return int(log.head[2]) - _steplog.HEADER
    finally:
        log.close()


def _records(path: Path, prefix: str) -> list[str]:
    con = sqlite3.connect(path / "cache.db")
    try:
        rows = con.execute(
            "SELECT key FROM records WHERE key >= ? AND key < ? ORDER BY rowid",
            (prefix, prefix + "\uffff"),
        ).fetchall()
    finally:
        con.close()
    return [k for (k,) in rows]


def _commit(run: nbagent.Run, name: str, value: object) -> None:
    ex = run.begin(name, 1, f"src-{name}", {})
    assert not ex.replay
    ex.commit({"v": value}, outputs=[], result=None)


def test_steps_of_a_killed_process_are_in_its_log_and_replay_in_the_next(tmp_path: Path) -> None:
    path = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        import os, signal, nbagent
        run = nbagent.Run("r", store={str(path)!r})
        for i in range(3):
            ex = run.begin(f"s{{i}}", 1, f"src-s{{i}}", {{}})
            ex.commit({{"v": i * 10}}, outputs=[], result=None)
        os.kill(os.getpid(), signal.SIGKILL)  # no exit handlers: nothing moves the log
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert _logged_bytes(path) > 0  # the commits are in the log only
    assert _records(path, "step/") == []

    run = nbagent.Run("r", store=path)
    for i in range(3):
        ex = run.begin(f"s{i}", 1, f"src-s{i}", {})
        assert ex.replay, f"step s{i} would run again"
        assert ex.restored_values() == {"v": i * 10}
        ex.replayed()
    assert run.steps_executed == 3  # the killed process's executions are counted
    _, rows = run.store.trace_rows("r")
    assert [r[3] for r in rows][:3] == ["s0#1", "s1#1", "s2#1"]  # in commit order
    assert _records(path, "step/") == ["step/r/s0#1", "step/r/s1#1", "step/r/s2#1"]
    assert _logged_bytes(path) == 0  # moved, and the log restarted empty


def test_bytes_past_the_logs_end_are_not_entries(tmp_path: Path) -> None:
    """A process killed while writing an entry leaves bytes past the end; the next
    entry overwrites them, and a fold never reads them."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    _commit(run, "a", 1)
    log = run.store._log
    assert log is not None
    os.pwrite(log.fd, b"\x07" * 5000, int(log.head[2]))  # a torn write, the end not moved
    other = Store(path)  # another process's view reads what is committed only
    assert other.get_step("r", "a#1") is not None
    assert other.get_step("r", "b#1") is None
    _commit(run, "b", 2)
    again = nbagent.Run("r", store=Store(path))
    assert again.begin("b", 1, "src-b", {}).restored_values() == {"v": 2}


def test_a_damaged_entry_warns_and_keeps_the_steps_before_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    _commit(run, "a", 1)
    log = run.store._log
    assert log is not None
    second = int(log.head[2])
    _commit(run, "b", 2)
    _commit(run, "c", 3)
    os.pwrite(log.fd, b"\xff\xff", second + 20)  # inside entry b: its checksum fails
    with pytest.warns(RuntimeWarning, match="damaged entry.*will run again"):
        steps = Store(path).step_ids("r")
    assert steps == ["a#1"]  # a is kept; b and c run again
    fresh = nbagent.Run("r", store=Store(path))
    assert fresh.begin("a", 1, "src-a", {}).replay
    ex = fresh.begin("b", 1, "src-b", {})
    assert not ex.replay
    ex.commit({"v": 22}, outputs=[], result=None)  # and the store goes on working
    assert Store(path).get_step("r", "b#1") is not None


def test_a_fold_killed_before_the_log_restarts_moves_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows moved and where the move got to are one transaction: a step reset after
    the move stays reset, though the log still holds its entry."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    _commit(run, "a", 1)
    monkeypatch.setattr(_steplog.StepLog, "restart", lambda self, generation, end: None)
    assert run.store.get_step("r", "a#1") is not None  # moved; the log is not restarted
    assert _logged_bytes(path) > 0
    assert run.store.drop_step("r", "a#1")  # the user resets the step
    monkeypatch.undo()
    for store in (run.store, Store(path)):
        assert store.get_step("r", "a#1") is None
    assert len(run.store.trace_rows("r")[1]) == 1  # its trace row moved once
    assert run.steps_executed == 1


def test_steps_of_two_threads_interleave_in_one_log(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)

    def work(prefix: str) -> None:
        for i in range(100):
            _commit(run, f"{prefix}{i}", "x" * 3000)  # writing an entry takes a while

    threads = [threading.Thread(target=work, args=(p,)) for p in "wxyz"]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two lines
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    fresh = Store(path)
    assert len(fresh.step_ids("r")) == 400
    assert fresh.counter("r", "steps") == 400
    assert len(fresh.trace_rows("r")[1]) == 400


def test_a_store_without_shared_maps_commits_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_log(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")

    monkeypatch.setattr(_steplog.StepLog, "__init__", no_log)
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    assert run.store._log is None
    _commit(run, "a", 1)
    assert _records(path, "step/") == ["step/r/a#1"]  # in SQLite at once


def test_processes_append_to_one_log_without_losing_a_step(tmp_path: Path) -> None:
    path = tmp_path / "s"
    nbagent.Run("r", store=path)
    script = textwrap.dedent(
        f"""
        import sys, time, nbagent
        run = nbagent.Run("r", store={str(path)!r})
        start = float(sys.argv[2])
        while time.time() < start:
            pass
        for i in range(150):
            ex = run.begin(f"{{sys.argv[1]}}{{i}}", 1, "src", {{}})
            ex.commit({{"v": "x" * 3000}}, outputs=[], result=None)
        """
    )
    import time

    start = str(time.time() + 1.5)  # the three start appending at the same moment
    procs = [
        subprocess.Popen([sys.executable, "-c", script, prefix, start], stderr=subprocess.PIPE)
        for prefix in "abc"
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    fresh = Store(path)
    assert len(fresh.step_ids("r")) == 450
    assert fresh.counter("r", "steps") == 450


def test_a_reservation_waiting_in_the_log_counts_for_another_process(tmp_path: Path) -> None:
    """Reservations are log entries (no SQLite transaction on a call's path); another
    process's cap check adds the increments that wait in the log to SQLite's counters.
    Two Store objects have two locks and two views, as two processes do."""
    path = tmp_path / "s"
    a = nbagent.Run("r", store=Store(path), max_cost_usd=1.0)
    b = nbagent.Run("r", store=Store(path))
    for run in (a, b):
        run.settle(run.reserve(0.01), 0.01)  # each knows itself as a reserving owner now
    kept = a.reserve(0.5)
    assert _logged_bytes(path) > 0  # it waits in the log
    with pytest.raises(nbagent.CostCapExceeded, match=r"\+\$0\.50 reserved"):
        b.reserve(0.5)  # 0.02 spent + 0.5 reserved + 0.5 > 1.0
    b.reserve(0.4)  # and what fits, fits
    a.settle(kept, 0.1)
    assert round(Store(path).counter("r", "spend_nusd") / 1e9, 2) == 0.12
    assert round(b.reserved_usd, 2) == 0.4


def test_a_commit_inside_a_transaction_is_rolled_back_with_it(tmp_path: Path) -> None:
    """Inside a transaction nothing goes to the log: a rollback takes it all back."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path, max_cost_usd=1.0)
    with pytest.raises(RuntimeError), run.store.transaction():
        _commit(run, "a", 1)
        run.reserve(0.5)
        raise RuntimeError("rolled back")
    fresh = Store(path)
    assert fresh.get_step("r", "a#1") is None
    assert fresh.counter("r", "reserved_nusd") == 0


def test_a_process_that_cannot_map_files_refuses_a_store_with_logged_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    _commit(run, "a", 1)  # waits in the log

    def no_maps(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")

    monkeypatch.setattr(_steplog.StepLog, "__init__", no_maps)
    with pytest.raises(StoreError, match="waiting in its step log.*cannot map files"):
        Store(path)
    monkeypatch.undo()
    run.store.close()  # the writer moves its steps in when it closes
    monkeypatch.setattr(_steplog.StepLog, "__init__", no_maps)
    assert Store(path).get_step("r", "a#1") is not None
