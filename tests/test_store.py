"""The on-disk store: format version, permissions, signed blobs, step locks, counters, trace."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import diskcache
import pytest

import nbagent
from nbagent._errors import StepLockedError, StoreError, StoreFormatError
from nbagent._store import FORMAT_VERSION, TRACE_COLUMNS, Store, open_store


def _kv_snapshot(path: Path) -> dict[str, object]:
    """Every entry of a store: diskcache's and (format 4) the records table's."""
    with diskcache.Cache(str(path)) as c:
        found = {k: c.get(k) for k in c.iterkeys()}
    db = sqlite3.connect(path / "cache.db")
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchall():
            found.update(db.execute("SELECT key, value FROM records").fetchall())
    finally:
        db.close()
    return found


# -- format -------------------------------------------------------------------------


def test_new_store_records_the_format_version(tmp_path: Path) -> None:
    Store(tmp_path / "s").close()
    assert _kv_snapshot(tmp_path / "s")["meta/format"] == FORMAT_VERSION


def test_store_of_a_newer_format_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with diskcache.Cache(str(path)) as c:
        c.set("meta/format", FORMAT_VERSION + 1)
        c.set("run/r", '{"name": "r"}')
    before = _kv_snapshot(path)
    with pytest.raises(StoreFormatError) as err:
        Store(path)
    message = str(err.value)
    assert str(FORMAT_VERSION + 1) in message
    assert "pip install -U nbagent" in message and "--store" in message
    assert "nothing was changed" in message
    assert _kv_snapshot(path) == before
    assert not (tmp_path / "keys").exists()  # no signing key was made for it either


def make_format_1_store(path: Path) -> None:
    """A store as format 1 wrote it: a step index, SQL lock rows."""
    with diskcache.Cache(str(path)) as c:
        c.set("meta/format", 1)
        c.set("run/r", '{"name": "r", "caps": {}}')
        c.set("runs", '["r"]')
        for n, step in enumerate(["b#1", "a#1", "c#1"], 1):
            c.set(f"step/r/{step}", f'{{"name": "{step[0]}", "saved": [], "ordinal": {n}}}')
            c.set(f"stepidx/r/{n}", step)
        c.set("ctr/r/step_seq", 3)
        c.set("lock/r/z#1", '{"pid": 1, "host": "h", "since": 0}')
    cols = ", ".join(TRACE_COLUMNS)
    write_old_trace(
        path / "trace.sqlite3",
        f"CREATE TABLE trace (seq INTEGER PRIMARY KEY AUTOINCREMENT, {cols})",
        (3, 7),
    )


def write_old_trace(db_path: Path, create: str, seqs: tuple[int, ...]) -> None:
    """A trace table as an older format made it, with rows at ``seqs`` (gaps: rows deleted)."""
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(create)
    for seq in seqs:
        db.execute(
            "INSERT INTO trace (seq, ts, run, kind, status) VALUES (?, ?, 'r', 'step', 'done')",
            (seq, float(seq)),
        )
    db.commit()
    db.close()


def test_store_of_format_1_is_read_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_format_1_store(path)
    store = Store(path)
    assert _kv_snapshot(path)["meta/format"] == FORMAT_VERSION
    assert store.step_ids("r") == ["b#1", "a#1", "c#1"]  # first-commit order
    cols, rows = store.trace_rows("r")  # moved into cache.db, seq kept
    assert [(r[0], r[1]) for r in rows] == [(3, 3.0), (7, 7.0)]
    assert not list(path.glob("trace.sqlite3*"))
    store.add_trace({"run": "r", "kind": "step"})
    assert store.trace_rows("r", since_seq=7)[1][0][0] == 8
    assert Store(path).trace_rows("r")[1][:2] == rows  # opened again: not copied twice
    assert store.acquire_lock("r", "z#1") is None  # an SQL lock row is no lock any more
    store.release_lock("r", "z#1")
    store.commit_step("r", "a#1", {"name": "a", "saved": []}, {})
    store.commit_step("r", "d#1", {"name": "d", "saved": []}, {})
    assert store.drop_step("r", "b#1")
    assert store.step_ids("r") == ["a#1", "c#1", "d#1"]
    assert "stepidx/r/1" not in _kv_snapshot(path)
    store.commit_step("r", "b#1", {"name": "b", "saved": []}, {})
    assert store.step_ids("r") == ["a#1", "c#1", "d#1", "b#1"]  # committed again: last
    store.drop_run("r")
    assert not [k for k in _kv_snapshot(path) if "/r/" in str(k)]


_FORMAT_3_TRACE = """CREATE TABLE trace (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, run TEXT NOT NULL, step TEXT, kind TEXT NOT NULL, name TEXT,
    attempt INTEGER, status TEXT, error TEXT, wait_s REAL, model TEXT,
    input_tokens INTEGER, cached_tokens INTEGER, output_tokens INTEGER,
    reasoning_tokens INTEGER, cost_usd REAL, latency_s REAL, idempotency_key TEXT,
    replayed INTEGER, price_known INTEGER, request TEXT, response TEXT, detail TEXT
)"""


def make_format_3_store(path: Path) -> dict[str, object]:
    """A store as format 3 wrote it: every entry in diskcache's table (large ones in
    files), value blobs signed with keyed BLAKE3, the trace with AUTOINCREMENT."""
    import blake3

    key = bytes(range(32))
    keys = Path(os.environ["NBAGENT_KEY_DIR"])
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "format3.key").write_bytes(key)

    def sign(payload: bytes) -> bytes:
        return b"NBA2" + bytes(12) + blake3.blake3(payload, key=key).digest() + payload

    small, big = pickle.dumps([1, 2]), pickle.dumps(os.urandom(40_000))
    ledger = {"response": "r" * 50_000}  # larger than a row: diskcache kept it in a file
    with diskcache.Cache(str(path), eviction_policy="none", size_limit=2**62) as c:
        c.set("meta/format", 3)
        c.set("meta/id", "format3")
        c.set("run/r", '{"name": "r", "caps": {}}')
        c.set("runs", '["r"]')
        for step in ("b#1", "a#1"):
            c.set(f"step/r/{step}", f'{{"name": "{step[0]}", "saved": ["x"]}}')
        c.set("blob/r/b#1/x", sign(small))
        c.set("blob/r/a#1/x", sign(big))
        c.set("llm/r/k1", json.dumps(ledger))
        c.set("ctr/r/steps", 2)
    write_old_trace(path / "cache.db", _FORMAT_3_TRACE, (5, 9))
    return {"small": [1, 2], "big": pickle.loads(big), "ledger": ledger}


def test_store_of_format_3_is_upgraded_with_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "s"
    expected = make_format_3_store(path)
    assert len(list(path.rglob("*.val"))) == 2  # the big blob and the ledger record
    store = Store(path)
    assert _kv_snapshot(path)["meta/format"] == FORMAT_VERSION
    assert store.step_ids("r") == ["b#1", "a#1"]  # first-commit order kept
    assert pickle.loads(store.get_blob("r/b#1/x")) == expected["small"]
    assert pickle.loads(store.get_blob("r/a#1/x")) == expected["big"]
    assert store.get_record("llm", "r/k1") == expected["ledger"]
    assert store.runs() == ["r"] and store.counter("r", "steps") == 2
    with diskcache.Cache(str(path)) as c:  # diskcache keeps the identity and the large value
        assert sorted(c.iterkeys()) == ["blob/r/a#1/x", "meta/format", "meta/id"]
    assert len(list(path.rglob("*.val"))) == 1  # the ledger's file went with its move
    db = sqlite3.connect(path / "cache.db")
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'trace'").fetchone()
    db.close()
    assert "AUTOINCREMENT" not in sql.upper()
    cols, rows = store.trace_rows("r")
    assert [(r[0], r[1]) for r in rows] == [(5, 5.0), (9, 9.0)]  # seq kept
    store.add_trace({"run": "r", "kind": "step"})
    assert store.trace_rows("r", since_seq=9)[1][0][0] == 10
    store.close()
    again = Store(path)  # opened again: nothing moves twice
    assert again.step_ids("r") == ["b#1", "a#1"] and len(again.trace_rows("r")[1]) == 3
    assert again.incr("r", "steps") == 3
    again.drop_run("r")
    assert not [k for k in _kv_snapshot(path) if "/r/" in str(k) or k == "run/r"]
    assert not list(path.rglob("*.val"))


def test_store_format_error_is_a_store_error() -> None:
    assert issubclass(StoreFormatError, StoreError)


# -- the directory ------------------------------------------------------------------


def test_store_directory_is_private_to_the_user(tmp_path: Path) -> None:
    store = Store(tmp_path / "deep" / "s")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700


def test_unwritable_store_directory_names_the_fix(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # chmod does not stop root: use a path under a regular file
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        target = blocker / "sub"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        target = parent / "sub"
    try:
        with pytest.raises(StoreError) as err:
            Store(target)
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    assert "--store" in str(err.value) and "NBAGENT_DIR" in str(err.value)
    assert str(target) in str(err.value)


def test_existing_read_only_store_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "s"
    target.mkdir()
    target.chmod(0o500)
    if os.geteuid() == 0:  # root may write a 0500 folder: have the permission check say no
        # (tests/reliability covers a really read-only file system)
        monkeypatch.setattr("nbagent._store.os.access", lambda path, mode: False)
    try:
        with pytest.raises(StoreError, match="NBAGENT_DIR"):
            Store(target)
    finally:
        target.chmod(0o700)


def test_damaged_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    (path / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="damaged or not a store"):
        Store(path)


def test_open_store_defaults_to_nbagent_dir(isolated_nbagent: Path) -> None:
    store = open_store()
    assert store.path == isolated_nbagent.resolve()
    assert open_store() is store


# -- signed blobs ---------------------------------------------------------------------


class _Bomb:
    """Creates a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def test_blobs_round_trip_and_are_signed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.put_blob("r/a#1/x", b"payload")
    assert store.get_blob("r/a#1/x") == b"payload"
    assert store.get_blob("r/a#1/missing") is None
    raw = store._raw("blob/r/a#1/x")  # a small value: a record
    assert raw != b"payload" and raw.endswith(b"payload")  # magic + signature in front


def test_large_blob_round_trips(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    big = os.urandom(3 << 20)
    store.put_blob("r/a#1/big", big)
    assert bytes(store.get_blob("r/a#1/big")) == big


def test_large_arrays_come_back_equal_writable_and_aligned(tmp_path: Path) -> None:
    """NumPy/pandas bulk data is stored out of band and rebuilt on the read bytes."""
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    from nbagent._engine import dumps_value, loads_value

    store = Store(tmp_path / "s")
    arr = np.arange(3 << 18, dtype=np.float64).reshape(-1, 4)  # 6 MB: kept in a file
    frame = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000), "c": ["x"] * 1000})
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    mid = np.arange(12_000, dtype=np.float64)  # 96 KB: a file read whole, not mapped
    values = {"arr": arr, "frame": frame, "small": np.arange(5), "f": fortran, "mid": mid}
    for name, value in values.items():
        store.put_blob(f"r/a#1/{name}", dumps_value(value))
    back = {n: loads_value(store.get_blob(f"r/a#1/{n}")) for n in values}
    assert np.array_equal(back["arr"], arr) and back["arr"].flags.aligned
    assert np.array_equal(back["mid"], mid) and back["mid"].flags.aligned
    assert back["frame"].equals(frame) and np.array_equal(back["f"], fortran)
    for a in (back["arr"], back["small"], back["f"], back["mid"]):
        assert a.flags.writeable
        a[0] = 7  # the user's code may change a restored value in place
    back["frame"].loc[0, "b"] = 9.0
    for name in ("small", "mid", "arr"):  # the store is not changed
        assert loads_value(store.get_blob(f"r/a#1/{name}")).flat[0] == 0


def test_blobs_of_format_2_are_still_read(tmp_path: Path) -> None:
    import hmac

    store = Store(tmp_path / "s")
    payload = pickle.dumps({"x": 1}, protocol=5)
    old = b"NBA1" + hmac.digest(store._key, payload, "sha256") + payload
    store._put("blob/r/a#1/x", old)
    assert pickle.loads(store.get_blob("r/a#1/x")) == {"x": 1}
    store._put("blob/r/a#1/x", old[:-3] + bytes([old[-3] ^ 1]) + old[-2:])  # tampered
    with pytest.raises(StoreError, match="not signed"):
        store.get_blob("r/a#1/x")


def test_tampered_large_blob_in_a_file_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.put_blob("r/a#1/big", os.urandom(3 << 20))
    (filename,) = [p for p in (tmp_path / "s").rglob("*.val")]
    data = bytearray(filename.read_bytes())
    data[-1] ^= 1
    filename.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="not signed"):
        store.get_blob("r/a#1/big")


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda payload, store: payload, id="raw-pickle"),
        pytest.param(lambda payload, store: b"NBA1" + b"\0" * 32 + payload, id="forged-signature"),
        pytest.param(
            lambda payload, store: store.sign(b"harmless")[:-8] + payload, id="spliced-payload"
        ),
    ],
)
@pytest.mark.parametrize("where", ["records", "diskcache"])
def test_tampered_blob_is_never_unpickled(tmp_path: Path, forge, where: str) -> None:  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "s")
    boom = tmp_path / "boom"
    planted = forge(pickle.dumps(_Bomb(boom)), store)
    if where == "records":
        store._put("blob/r/a#1/x", planted)
    else:  # where large values (and format 3's small ones) are kept
        store._kv.set("blob/r/a#1/x", planted)
    with pytest.raises(StoreError, match="not signed"):
        store.get_blob("r/a#1/x")
    assert not boom.exists()


def test_pickled_cache_entry_under_a_blob_key_is_never_unpickled(tmp_path: Path) -> None:
    """diskcache itself unpickles values it stored as pickles: a planted one must not run."""
    path = tmp_path / "s"
    Store(path).close()
    boom = tmp_path / "boom"
    with diskcache.Cache(str(path)) as other:  # someone else writing into the store
        other.set("blob/r/a#1/x", _Bomb(boom))
    store = Store(path)
    with pytest.raises(StoreError):
        store.get_blob("r/a#1/x")
    assert not boom.exists()


def test_tampered_blob_fails_a_replay_without_running_it(tmp_path: Path) -> None:
    run = nbagent.Run("r", store=tmp_path / "s")

    @run.step("make")
    def make() -> list[int]:
        return [1, 2, 3]

    assert make() == [1, 2, 3]
    boom = tmp_path / "boom"
    run.store._put("blob/r/make#1/(return)", pickle.dumps(_Bomb(boom)))
    # a new process (a Store object of its own: this one would replay the value it wrote)
    again = nbagent.Run("r", store=Store(tmp_path / "s"))
    make2 = again.step("make")(make.__wrapped__)
    with pytest.raises(StoreError, match="--rerun"):
        make2()
    assert not boom.exists()


def test_signing_key_lives_outside_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    keys = list((tmp_path / "keys").iterdir())
    assert [k.name for k in keys] == [f"{store.id}.key"]
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    key = keys[0].read_bytes()
    assert len(key) == 32
    for f in store.path.rglob("*"):
        if f.is_file():
            assert key not in f.read_bytes(), f


def test_store_copied_without_its_key_does_not_load_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s")
    store.put_blob("r/a#1/x", pickle.dumps([1]))
    store.close()
    monkeypatch.setenv("NBAGENT_KEY_DIR", str(tmp_path / "other-keys"))
    with pytest.raises(StoreError, match="not signed"):
        Store(tmp_path / "s").get_blob("r/a#1/x")


def test_two_store_objects_share_one_key(tmp_path: Path) -> None:
    a = Store(tmp_path / "s")
    a.put_blob("r/a#1/x", b"v")
    assert Store(tmp_path / "s").get_blob("r/a#1/x") == b"v"


# -- steps -------------------------------------------------------------------------------


def test_commit_and_drop_step(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.commit_step("r", "a#1", {"saved": ["x", "y"]}, {"x": b"1", "y": b"2"})
    assert store.step_ids("r") == ["a#1"]
    assert store.get_step("r", "a#1")["saved"] == ["x", "y"]
    # a re-commit that no longer saves y deletes its blob
    store.commit_step("r", "a#1", {"saved": ["x"]}, {"x": b"3"})
    assert store.step_ids("r") == ["a#1"]
    assert store.get_blob("r/a#1/x") == b"3"
    assert store.get_blob("r/a#1/y") is None
    assert store.drop_step("r", "a#1") is True
    assert store.get_step("r", "a#1") is None and store.step_ids("r") == []
    assert store.get_blob("r/a#1/x") is None
    assert store.drop_step("r", "a#1") is False


def test_runs_are_listed_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.put_run("a", {"name": "a"})
    store.put_run("b", {"name": "b"})
    store.put_run("a", {"name": "a", "x": 1})
    assert store.runs() == ["a", "b"]
    assert store.get_run("a") == {"name": "a", "x": 1}


# -- step locks ---------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from nbagent._store import Store
    store = Store(sys.argv[1])
    store.acquire_lock("r", "a#1")
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _lock_holder(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    return child


def test_step_lock_of_a_live_process_blocks_and_of_a_killed_one_is_free(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s"
    store = Store(path)
    child = _lock_holder(path)
    try:
        with pytest.raises(StepLockedError) as err:
            store.acquire_lock("r", "a#1")
        assert str(child.pid) in str(err.value) and "'a#1'" in str(err.value)
        assert store.acquire_lock("r", "b#1") is None  # other steps are free
    finally:
        child.kill()
        child.wait()
    # SIGKILL: the OS released its lock (no stale lock, no pid checks)
    assert store.acquire_lock("r", "a#1") is None
    assert store.acquire_lock("r", "a#1") is None  # re-entrant for its owner
    store.release_lock("r", "a#1")
    assert store.acquire_lock("r", "a#1") is None
    store.release_lock("r", "a#1")


def test_run_begin_refuses_a_step_another_process_executes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    child = _lock_holder(path)
    try:
        run = nbagent.Run("r", store=path)
        with pytest.raises(StepLockedError):
            run.begin("a", 1, "h", {})
        assert run.steps_executed == 0
    finally:
        child.kill()
        child.wait()
    ex = run.begin("a", 1, "h", {})
    assert not ex.replay
    ex.abort(None)


def test_lock_is_held_per_process_whatever_store_object_took_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    one, two = Store(path), Store(path)
    assert one.acquire_lock("r", "a#1") is None
    assert two.acquire_lock("r", "a#1") is None  # same process: re-entrant
    two.close()  # closing another Store object does not drop this process's locks
    child = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(path)], capture_output=True, text=True, timeout=60
    )
    assert child.stdout.strip() == f"locked by {os.getpid()}", child.stderr
    one.release_lock("r", "a#1")
    child = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(path)], capture_output=True, text=True, timeout=60
    )
    assert child.stdout.strip() == "free", child.stderr
    one.release_lock("r", "a#1")  # not held: a no-op


_TRY_LOCK = textwrap.dedent(
    """
    import sys
    from nbagent._errors import StepLockedError
    from nbagent._store import Store
    try:
        Store(sys.argv[1]).acquire_lock("r", "a#1")
    except StepLockedError as e:
        print("locked by", str(e).split("process ")[1].split(".")[0])
    else:
        print("free")
    """
)


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "s"
    code = (
        "import os, sys\nfrom nbagent._store import Store\n"
        "Store(sys.argv[1]).acquire_lock('r', 'a#1')\nos._exit(0)  # never released\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert Store(path).acquire_lock("r", "a#1") is None


# -- counters ------------------------------------------------------------------------------


def test_counters(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert store.counter("r", "steps") == 0
    assert store.incr("r", "steps") == 1
    assert store.incr("r", "steps", 5) == 6
    assert store.incr("r", "steps", -2) == 4
    assert store.counter("r", "steps") == 4
    assert store.counter("other", "steps") == 0
    assert Store(tmp_path / "s").counter("r", "steps") == 4


def test_counters_are_atomic_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store(path).close()
    code = (
        "import sys\nfrom nbagent._store import Store\ns = Store(sys.argv[1])\n"
        "for _ in range(100): s.incr('r', 'n')\n"
    )
    children = [subprocess.Popen([sys.executable, "-c", code, str(path)]) for _ in range(2)]
    assert [c.wait() for c in children] == [0, 0]
    assert Store(path).counter("r", "n") == 200


# -- trace -----------------------------------------------------------------------------------


def test_trace_rows_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.add_trace(
        {
            "ts": 1.5,
            "run": "r",
            "step": "a#1",
            "kind": "llm",
            "name": "chat",
            "input_tokens": 10,
            "cost_usd": 0.25,
            "request": {"model": "m"},
            "detail": {"a": 1},
            "extra_field": "kept",
        }
    )
    store.add_trace({"run": "other", "kind": "step"})
    store.add_trace({"run": "r", "kind": "step", "status": "done"})
    cols, rows = store.trace_rows("r")
    assert cols == ["seq", *TRACE_COLUMNS]
    assert len(rows) == 2
    first = dict(zip(cols, rows[0], strict=True))
    assert first["ts"] == 1.5 and first["step"] == "a#1" and first["input_tokens"] == 10
    assert first["cost_usd"] == 0.25
    assert first["request"] == '{"model": "m"}'
    import json

    assert json.loads(first["detail"]) == {"a": 1, "extra_field": "kept"}
    second = dict(zip(cols, rows[1], strict=True))
    assert second["ts"] > 1e9  # filled in
    assert second["status"] == "done"
    _, later = store.trace_rows("r", since_seq=first["seq"])
    assert [r[0] for r in later] == [second["seq"]]
    assert len(store.trace_rows()[1]) == 3
    # another Store object (another process) reads the same rows
    assert Store(tmp_path / "s").trace_rows("r")[1] == rows
    store.delete_trace("r")
    assert store.trace_rows("r")[1] == [] and len(store.trace_rows()[1]) == 1


def fill_two_runs(store: Store) -> None:
    """Two runs with a step, a value, counters, a ledger record, an effect and trace rows."""
    for run in ("gone", "kept"):
        store.put_run(run, {"name": run})
        store.commit_step(run, "a#1", {"saved": ["x"]}, {"x": b"1"})
        store.incr(run, "spend_nusd", 7)
        store.set_record("llm", f"{run}/a#1/1/h", {"v": 1})
        store.set_record("effect", f"{run}/run:{run}:step:a:1:charge", {"status": "done"})
        store.add_trace({"run": run, "kind": "llm"})


def check_only_gone_was_dropped(store: Store) -> None:
    assert store.runs() == ["kept"]
    assert store.get_run("gone") is None and store.step_ids("gone") == []
    assert store.get_blob("gone/a#1/x") is None and store.counter("gone", "spend_nusd") == 0
    assert store.get_record("llm", "gone/a#1/1/h") is None
    assert store.get_record("effect", "gone/run:gone:step:a:1:charge") is None
    assert store.trace_rows("gone")[1] == []
    assert store.step_ids("kept") == ["a#1"] and store.get_blob("kept/a#1/x") == b"1"
    assert store.counter("kept", "spend_nusd") == 7 and store.get_record("llm", "kept/a#1/1/h")
    assert len(store.trace_rows("kept")[1]) == 1


def test_drop_run_removes_everything_of_that_run_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    fill_two_runs(store)
    assert store.drop_run("gone") == 1
    check_only_gone_was_dropped(store)


def test_without_a_step_cap_an_execution_is_counted_when_it_ends(tmp_path: Path) -> None:
    run = nbagent.Run("r", store=tmp_path / "s")
    ex = run.begin("a", 1, "h", {})
    assert ex.uncounted and run.steps_executed == 0  # begin wrote nothing
    ex.commit({"x": 1}, outputs=[], result=None)
    assert run.steps_executed == 1
    ex = run.begin("b", 1, "h", {})
    ex.abort(RuntimeError("boom"))  # a failed step counts too, once
    ex.abort(RuntimeError("again"))
    assert run.steps_executed == 2
    capped = nbagent.Run("c", store=tmp_path / "s", max_steps=5)
    ex = capped.begin("a", 1, "h", {})
    assert not ex.uncounted and capped.steps_executed == 1  # with a cap: counted at begin
    ex.commit({}, outputs=[], result=None)
    assert capped.steps_executed == 1


def test_checkpoints_run_on_a_thread_not_in_commits(tmp_path: Path) -> None:
    """SQLite would copy the write-ahead log into cache.db inside a commit; the store's own
    thread does it while commits go on."""
    import time as _time

    store = Store(tmp_path / "s")
    assert store._kv._con.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    db = tmp_path / "s" / "cache.db"
    before = db.stat().st_size
    for i in range(300):
        store.commit_step("r", f"a{i}#1", {"pad": "x" * 2000}, {}, previous=None)
    deadline = _time.monotonic() + 10
    while db.stat().st_size < before + 400_000:  # the records reached the database file
        assert _time.monotonic() < deadline, "the log was not checkpointed"
        _time.sleep(0.05)
    assert store.get_step("r", "a299#1") == {"pad": "x" * 2000}
    store.close()
    assert store._checkpointer.stopped


def test_replay_trace_rows_are_deferred_but_read_and_committed_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.begin("a", 1, "h", {}).commit({"x": 1}, outputs=[], result=None)
    ex = run.begin("a", 1, "h", {})
    assert ex.replay
    ex.replayed()
    raw = sqlite3.connect(path / "cache.db")
    statuses = "SELECT status FROM trace WHERE kind = 'step' ORDER BY seq"
    # a's row waits as a pend/ record (written with its step), the replay's in memory
    assert raw.execute(statuses).fetchall() == []
    run.begin("b", 1, "h", {}).commit({}, outputs=[], result=None)  # both written with it
    assert raw.execute(statuses).fetchall() == [("done",), ("replayed",)]  # b's waits
    cols, rows = run.store.trace_rows("r")
    steps = [r[cols.index("status")] for r in rows if r[cols.index("kind")] == "step"]
    assert steps == ["done", "replayed", "done"]
    ex = run.begin("a", 1, "h", {})
    ex.replayed()
    cols, rows = run.store.trace_rows("r")  # reading the trace writes it first
    status = cols.index("status")
    assert [r[status] for r in rows if r[cols.index("kind")] == "step"][-1] == "replayed"
    raw.close()
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import nbagent
            run = nbagent.Run("r", store={str(path)!r})
            run.begin("a", 1, "h", {{}}).replayed()
        """)],
        check=True,
    )  # fmt: skip
    assert child.returncode == 0
    cols, rows = Store(path).trace_rows("r")
    assert [r[cols.index("status")] for r in rows].count("replayed") == 3  # written at exit


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_connections_of_its_own(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert store.incr("r", "n") == 1
    parent_con = store._tls.con
    pid = os.fork()
    if pid == 0:  # the child: never the parent's SQLite connection
        code = 1
        try:
            fresh = getattr(store._tls, "con", None) is None
            code = (
                0 if fresh and store.incr("r", "n") == 2 and store._tls.con is not parent_con else 1
            )
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.incr("r", "n") == 3 and store._tls.con is parent_con


# -- beginning a step without a read (cache.db-versions) ------------------------------------

_OTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import nbagent
    store, what = sys.argv[1], sys.argv[2]
    run = nbagent.Run("r", store=store)
    if what == "commit b":
        ex = run.begin("b", 1, "source of b", {})
        (Path(store).parent / "b-ran").write_text("other\\n")
        ex.commit({"made_by": "the other process"}, outputs=[], result=None)
    elif what == "stop":
        run.stop("stopped from another process")
    elif what == "reset a":
        run.reset(["a#1"])
    elif what == "rerun a":
        ex = run.begin("a", 1, "source of a", {}, rerun=True)
        ex.commit({"made_by": "the other process"}, outputs=[], result=None)
    """
)


def _other_process(path: Path, what: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(path), what],
        check=True,
        timeout=120,
        capture_output=True,
    )


def _step_b(run: nbagent.Run) -> str:
    """Step b as the other process runs it; who made the value it stored."""
    ex = run.begin("b", 1, "source of b", {})
    if ex.replay:
        return str(ex.load_value("made_by"))
    ex.commit({"made_by": "this process"}, outputs=[], result=None)
    return "this process"


def test_a_step_another_process_committed_replays_here(tmp_path: Path) -> None:
    """This process knows the run (it ran a step: begins now skip their read); another
    process commits step b; b here replays it instead of running it a second time."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    assert run.step("a")(lambda: 1)() == 1
    assert run.step("a2")(lambda: 2)() == 2  # began without a read
    _other_process(path, "commit b")
    assert _step_b(run) == "the other process"  # replayed, not run again
    assert (tmp_path / "b-ran").read_text() == "other\n"
    assert run.steps_executed == 3


def test_a_stop_from_another_process_is_seen_at_the_next_step(tmp_path: Path) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.step("a")(lambda: 1)()
    run.step("a2")(lambda: 2)()
    _other_process(path, "stop")
    with pytest.raises(nbagent.RunStopped, match="another process"):
        _step_b(run)
    assert run.steps_executed == 2


def test_a_step_another_process_reset_runs_again_here(tmp_path: Path) -> None:
    path = tmp_path / "s"
    calls = []
    run = nbagent.Run("r", store=path)
    run.step("a")(lambda: calls.append(1))()
    _other_process(path, "reset a")
    again = nbagent.Run("r", store=path)  # a fresh look at the run: step a is gone
    again.step("a")(lambda: calls.append(2))()
    assert calls == [1, 2]


def test_steps_are_right_without_the_versions_file(tmp_path: Path) -> None:
    """A folder where cache.db-versions cannot be made: every step begins with a read."""
    path = tmp_path / "s"
    path.mkdir(mode=0o700)
    (path / "cache.db-versions").mkdir()  # os.open fails on it
    run = nbagent.Run("r", store=path)
    run.step("a")(lambda: 1)()
    _other_process(path, "commit b")
    assert _step_b(run) == "the other process"
    _other_process(path, "stop")
    with pytest.raises(nbagent.RunStopped):
        run.step("c")(lambda: 3)()


def test_a_writer_killed_before_its_commit_costs_a_read_not_a_wrong_replay(
    tmp_path: Path,
) -> None:
    """A process counts its change, then dies before COMMIT: nothing changed, the counter
    moved; this process reads again and goes on, then knows the run again."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.step("a")(lambda: 1)()
    code = (
        "import os, sys\nfrom nbagent._store import Store\ns = Store(sys.argv[1])\n"
        "with s.transaction():\n"
        "    s.put_run('r', {'name': 'r', 'caps': {}, 'stopped': {'reason': 'x'}})\n"
        "    os._exit(0)  # killed before COMMIT\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert run.stopped is None
    assert run.step("b")(lambda: 2)() == 2
    _other_process(path, "stop")
    with pytest.raises(nbagent.RunStopped):
        run.step("c")(lambda: 3)()


# -- a step's trace row and count wait as a pend/ record --------------------------------------


def _step_statuses(store: Store, run: str) -> list[tuple[str, str]]:
    cols, rows = store.trace_rows(run)
    kind, step, status = cols.index("kind"), cols.index("step"), cols.index("status")
    return [(r[step], r[status]) for r in rows if r[kind] == "step"]


def test_a_process_killed_after_its_commits_loses_no_trace_row_or_count(tmp_path: Path) -> None:
    path = tmp_path / "s"
    code = textwrap.dedent(
        """
        import os, sys
        import nbagent
        run = nbagent.Run("r", store=sys.argv[1])
        for name in ("a", "b", "c"):
            run.begin(name, 1, "h", {}).commit({"x": 1}, outputs=[], result=None)
        os._exit(0)  # no exit handlers: the rows are still waiting
        """
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    run = nbagent.Run("r", store=path)
    assert run.steps_executed == 3
    assert _step_statuses(run.store, "r") == [("a#1", "done"), ("b#1", "done"), ("c#1", "done")]


def test_trace_rows_keep_their_order_across_waiting_and_batches(tmp_path: Path) -> None:
    run = nbagent.Run("r", store=tmp_path / "s")
    expected = []
    for i in range(150):  # more than two batches of pend/ records
        run.begin(f"s{i}", 1, "h", {}).commit({}, outputs=[], result=None)
        expected.append(("step", f"s{i}"))
        if i % 7 == 0:  # a row written at once (as an LLM call's is)
            run.record_event(kind="control", name=f"e{i}", status="ok")
            expected.append(("control", f"e{i}"))
    cols, rows = run.store.trace_rows("r")
    assert [(r[cols.index("kind")], r[cols.index("name")]) for r in rows] == expected
    seqs = [r[0] for r in rows]
    assert seqs == sorted(seqs)
    assert run.steps_executed == 150


def test_dropping_a_run_leaves_no_waiting_row_to_bring_it_back(tmp_path: Path) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.begin("a", 1, "h", {}).commit({}, outputs=[], result=None)
    assert run.store.drop_run("r") == 1
    other = nbagent.Run("other", store=path)
    other.begin("a", 1, "h", {}).commit({}, outputs=[], result=None)
    assert other.store.trace_rows("r")[1] == []
    assert other.store.counter("r", "steps") == 0
    assert other.steps_executed == 1


def test_a_damaged_waiting_row_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.begin("a", 1, "h", {}).commit({}, outputs=[], result=None)
    assert run.store.get_step("r", "a#1") is not None  # a read moves the step log into SQLite
    raw = sqlite3.connect(path / "cache.db")
    with raw:
        raw.execute(
            "UPDATE records SET value = '{\"not\": 1}' WHERE key >= 'pend/' AND key < 'pend0'"
        )
    raw.close()
    with pytest.raises(StoreError, match="damaged .*pending trace row.*fresh --store"):
        Store(path).trace_rows("r")
    assert Store(path).get_step("r", "a#1") is not None  # nothing else is lost


def test_records_are_encoded_as_json_dumps_would() -> None:
    from nbagent._store import _to_json

    for value in (
        {"a": [1, 2.5, None, True, 'é\n"x"'], "b": {"c": float("nan"), 1: -0.0}},
        {"path": Path("/tmp/x"), "big": 10**30, "inf": float("inf")},
        [],
        "text",
        3.25,
    ):
        assert _to_json(value) == json.dumps(value, default=str)


def test_a_replay_here_sees_a_step_another_process_ran_again(tmp_path: Path) -> None:
    """This process committed step a (and could replay it from what it wrote); another
    process runs it again with a new value; a replay here gives the new value."""
    path = tmp_path / "s"
    run = nbagent.Run("r", store=path)
    run.begin("a", 1, "source of a", {}).commit(
        {"made_by": "this process"}, outputs=[], result=None
    )
    ex = run.begin("a", 1, "source of a", {})
    assert ex.replay and ex.load_value("made_by") == "this process"
    ex.replayed()
    _other_process(path, "rerun a")
    ex = run.begin("a", 1, "source of a", {})
    assert ex.replay and ex.load_value("made_by") == "the other process"
