"""Damaged stores: each a clear error (naming the store and the fix) or a recovery.

Never a silent wrong replay, and nothing already stored is lost.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relkit import records

import nbagent
from nbagent import _store
from nbagent._errors import StoreError, StoreFormatError

CI = os.environ.get("CI") == "true"


def fresh_stores() -> None:
    """Forget open stores, as a new process would."""
    with _store._open_lock:
        stores = list(_store._open_stores.values())
        _store._open_stores.clear()
    for s in stores:
        s.close()


def program(store: Path, big: int = 2 << 20) -> tuple[nbagent.Run, dict[str, Callable[[], Any]]]:
    """Three steps: a small value, a large one (a diskcache file), one with an effect."""
    fresh_stores()
    run = nbagent.Run("r", store=store)
    calls: list[str] = []

    @run.step("small")
    def small() -> dict[str, int]:
        calls.append("small")
        return {"a": 1}

    @run.step("large")
    def large() -> bytes:
        calls.append("large")
        return b"x" * big

    def charge(key: str) -> str:
        calls.append("charge")
        return f"charged with {key}"

    @run.step("effect")
    def effect() -> str:
        calls.append("effect")
        return str(nbagent.once("charge", charge))

    return run, {"small": small, "large": large, "effect": effect, "calls": calls}  # type: ignore[dict-item]


EXPECTED = {
    "small": {"a": 1},
    "large": 2 << 20,
    "effect": "charged with run:r:step:effect:1:charge",
}


def run_all(store: Path) -> tuple[dict[str, Any], list[str]]:
    _, steps = program(store)
    with contextlib.redirect_stdout(io.StringIO()):
        out = {name: steps[name]() for name in ("small", "large", "effect")}
    out["large"] = len(out["large"])
    return out, steps["calls"]  # type: ignore[return-value]


def kv_rows(store: Path) -> dict[str, Any]:
    with diskcache.Cache(str(store)) as c:
        found = {k: c.get(k) for k in c.iterkeys()}
    found.update(records(store))
    return {k: v for k, v in found.items() if not str(k).startswith("lock/")}


def value_files(store: Path) -> list[str]:
    return glob.glob(str(store / "**" / "*.val"), recursive=True)


def clear(err: pytest.ExceptionInfo[BaseException], store: Path) -> None:
    """A StoreError naming the store."""
    assert isinstance(err.value, StoreError), repr(err.value)
    assert str(store) in str(err.value), str(err.value)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    out, calls = run_all(path)
    assert out == EXPECTED and calls == ["small", "large", "effect", "charge"]
    fresh_stores()  # closed, as when the process ends: everything is in cache.db
    return path


# -- damaged entries -------------------------------------------------------------------


def test_truncated_large_value_is_a_clear_error_and_rerun_recovers(store: Path) -> None:
    (blob,) = [f for f in value_files(store) if os.path.getsize(f) > 1 << 20]
    with open(blob, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError) as err:
        run_all(store)
    clear(err, store)
    assert "--rerun" in str(err.value)
    run, steps = program(store)
    assert steps["small"]() == {"a": 1}  # the rest is still there

    @run.step("large", rerun=True)
    def large() -> bytes:
        return b"x" * (2 << 20)

    assert len(large()) == 2 << 20
    assert run_all(store)[0] == EXPECTED


def test_deleted_value_file_is_a_clear_error(store: Path) -> None:
    for f in value_files(store):
        os.unlink(f)
    with pytest.raises(StoreError) as err:
        run_all(store)
    clear(err, store)


def test_lost_effect_outcome_is_an_error_not_a_silent_none(store: Path) -> None:
    """Regression: a done effect whose outcome blob was gone replayed as None."""
    con = sqlite3.connect(store / "cache.db")
    con.execute("DELETE FROM records WHERE key LIKE 'blob/r/(effects)/%'")
    con.execute("DELETE FROM records WHERE key LIKE 'step/r/effect#%'")  # the step runs again
    con.commit()
    con.close()
    with pytest.raises(StoreError) as err:
        run_all(store)
    clear(err, store)
    assert "not done again" in str(err.value)


@pytest.mark.parametrize(
    "key, text",
    [
        ("step/r/small#1", '{"name": "small", "sav'),
        ("step/r/small#1", "[1, 2, 3]"),
        ("run/r", '{"name": "r", "caps": {'),
        ("effect/r/run:r:step:effect:1:charge", "{not json"),
    ],
)
def test_damaged_record_is_a_clear_error(store: Path, key: str, text: str) -> None:
    assert key in dict(records(store)), key
    con = sqlite3.connect(store / "cache.db")
    con.execute("UPDATE records SET value = ? WHERE key = ?", (text, key))
    con.commit()
    con.close()
    if key.startswith("effect/"):  # read when the step executes again
        con = sqlite3.connect(store / "cache.db")
        con.execute("DELETE FROM records WHERE key = 'step/r/effect#1'")
        con.commit()
        con.close()
    with pytest.raises(StoreError) as err:
        run_all(store)
    clear(err, store)
    assert key in str(err.value)


def test_damaged_step_record_can_be_reset(store: Path) -> None:
    con = sqlite3.connect(store / "cache.db")
    con.execute("UPDATE records SET value = '{broken' WHERE key = 'step/r/small#1'")
    con.commit()
    con.close()
    run, _ = program(store)
    assert "small#1" in run.reset(["small"])
    out, calls = run_all(store)
    assert out == EXPECTED and calls == ["small"]


@settings(
    max_examples=25,
    deadline=None,
    derandomize=CI,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1), spots=st.integers(1, 12))
def test_corrupted_database_pages_never_replay_wrong_values(
    tmp_path_factory: pytest.TempPathFactory, seed: int, spots: int
) -> None:
    store = tmp_path_factory.mktemp("pages") / "store"
    run_all(store)
    fresh_stores()
    con = sqlite3.connect(store / "cache.db")  # everything into the main file
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray((store / "cache.db").read_bytes())
    rnd = random.Random(seed)
    for _ in range(spots):  # keep the 100-byte header: a wrong header is covered elsewhere
        at = rnd.randrange(100, len(data))
        data[at : at + 32] = rnd.randbytes(32)
    (store / "cache.db").write_bytes(bytes(data))
    try:
        out, calls = run_all(store)
    except StoreError as e:
        assert str(store) in str(e)
        return
    assert out == EXPECTED
    assert "charge" not in calls, "an effect happened twice"


# -- format, disk, permissions ---------------------------------------------------------------


def test_store_of_a_newer_format_through_run_and_magic(tmp_path: Path, ip: Any) -> None:
    store = tmp_path / "store"
    run_all(store)
    fresh_stores()
    with diskcache.Cache(str(store)) as c:
        c.set("meta/format", _store.FORMAT_VERSION + 1)
    before = kv_rows(store)
    with pytest.raises(StoreFormatError) as err:
        nbagent.Run("r", store=store)
    clear(err, store)
    assert "pip install -U nbagent" in str(err.value)
    result = ip.run_cell(f"%nbagent start r --store {store} --no-dashboard")
    assert isinstance(result.error_in_exec, StoreFormatError)
    assert kv_rows(store) == before


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        message = f"cannot mount ({done.stderr.strip()}): needs root"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        fresh_stores()
        subprocess.run(["umount", "-l", str(path)], check=False)


def first_step(run: nbagent.Run, calls: list[str]) -> Callable[[], list[int]]:
    @run.step("first")
    def first() -> list[int]:
        calls.append("first")
        return list(range(100))

    return first


def test_full_disk_is_a_clear_error_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small-disk", "1m") as disk:
        store = disk / "store"
        run, _ = program(store, big=100)
        calls: list[str] = []
        assert first_step(run, calls)() == list(range(100))
        for size in (300_000, 700_000, 2_000_000):

            @run.step(f"big-{size}")
            def big(n: int = size) -> bytes:
                return os.urandom(n)  # incompressible

            with contextlib.suppress(StoreError):
                big()
        # the disk is full now: the next commit fails clearly
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"z" * 4096)
                f.flush()

        @run.step("last")
        def last() -> bytes:
            return os.urandom(200_000)

        with pytest.raises(StoreError) as err:
            last()
        clear(err, store)
        assert "full" in str(err.value)
        filler.unlink()
        # nothing stored before is lost; the failed step runs again and commits
        run, _ = program(store, big=100)
        assert first_step(run, calls)() == list(range(100))
        assert calls == ["first"], "a completed step executed again"

        @run.step("last")
        def last_again() -> int:
            return 7

        assert last_again() == 7


@contextlib.contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    view.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(source), str(view))
    try:
        mount("-o", "remount,bind,ro", str(view))
        yield view
    finally:
        fresh_stores()
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_read_only_store_is_a_clear_error_and_unchanged(
    tmp_path: Path, store: Path, ip: Any
) -> None:
    fresh_stores()
    before = kv_rows(store)
    with read_only_view(store, tmp_path / "ro") as view:
        with pytest.raises(StoreError) as err:
            nbagent.Run("r", store=view)
        clear(err, view)
        assert "--store" in str(err.value)
        result = ip.run_cell(f"%nbagent start r --store {view} --no-dashboard")
        assert isinstance(result.error_in_exec, StoreError)
    assert kv_rows(store) == before
    assert run_all(store)[1] == []  # all of it still replays


def test_immutable_store_is_a_clear_error(store: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    fresh_stores()
    done = subprocess.run(["chattr", "-R", "+i", str(store)], capture_output=True, text=True)
    if done.returncode != 0:
        if CI:
            pytest.fail(f"chattr failed: {done.stderr}")
        pytest.skip(f"chattr not supported here: {done.stderr.strip()}")
    try:
        with pytest.raises(StoreError) as err:
            nbagent.Run("r", store=store)
        clear(err, store)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(store)], check=True)
    assert run_all(store)[1] == []
