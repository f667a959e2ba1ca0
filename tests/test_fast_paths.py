"""The fast paths added for speed behave exactly like the slow ones they replace."""

from __future__ import annotations

import os
from typing import Any

import pytest

from nbagent._engine import MARK, NamespaceSnapshot, NamespaceWatch, names_to_store, user_globals
from nbagent._errors import StoreError


def _both(
    ns: dict[str, Any],
    body: Any,
    candidates: list[str],
    inputs: dict[str, str],
    watch: NamespaceWatch | None = None,
) -> None:
    plain = user_globals(ns)
    snap = watch.snapshot() if watch is not None else NamespaceSnapshot(ns)
    body(ns)
    assert names_to_store(ns, snap, candidates, inputs) == names_to_store(
        ns, plain, candidates, inputs
    )


def test_snapshot_matches_user_globals() -> None:
    from nbagent import _fingerprint as fp

    def base() -> dict[str, Any]:
        ns: dict[str, Any] = {f"_i{i}": str(i) for i in range(50)}
        ns.update(a=1, b=[1], c="x", _hidden=3)
        return ns

    def rebind(ns: dict[str, Any]) -> None:
        ns["a"] = 2
        ns["new"] = 5
        ns["_i99"] = "y"

    def mutate(ns: dict[str, Any]) -> None:
        ns["b"].append(2)

    def delete(ns: dict[str, Any]) -> None:
        del ns["c"]
        ns["d"] = 1

    def reinsert(ns: dict[str, Any]) -> None:
        c = ns.pop("c")
        ns["c"] = c  # same object, moved to the end: not a rebinding

    for body in (rebind, mutate, delete, reinsert):
        ns = base()
        inputs = {"b": fp.hash_value(ns["b"])}
        _both(ns, body, ["b"], inputs)
    ns = base()
    snap = NamespaceSnapshot(ns)
    delete(ns)
    assert names_to_store(ns, snap, [], {}) == (["d"], ["c"])
    ns = base()
    snap = NamespaceSnapshot(ns)
    reinsert(ns)
    assert names_to_store(ns, snap, [], {}) == ([], [])


def test_snapshot_matches_user_globals_across_many_cells() -> None:
    """Random bindings, rebindings, deletions and IPython names, between and inside bodies."""
    import random

    rnd = random.Random(7)
    ns: dict[str, Any] = {}
    pool = [f"v{i}" for i in range(8)] + [f"_i{i}" for i in range(6)] + ["Out", "_"]

    def churn(ns: dict[str, Any], n: int) -> None:
        for _ in range(n):
            name, op = rnd.choice(pool), rnd.random()
            if op < 0.2:
                ns.pop(name, None)
            elif op < 0.3 and isinstance(ns.get(name), list):
                ns[name].append(1)  # in place
            elif op < 0.4 and name in ns:
                ns[name] = ns.pop(name)  # the same object, moved to the end
            else:
                ns[name] = [rnd.random()] if op < 0.7 else rnd.randrange(3)

    marked: dict[str, Any] = {MARK: object()}  # a notebook's namespace holds nbagent's name
    watch = NamespaceWatch(marked)
    for _ in range(2000):
        for space, w in ((ns, None), (marked, watch)):
            churn(space, rnd.randrange(4))  # ordinary cells
            some = [n for n in space if n[0] == "v"][:3]
            _both(space, lambda space: churn(space, rnd.randrange(4)), some, {}, w)


def test_records_round_trip_and_values_move_between_rows_and_files(tmp_path: Any) -> None:
    """Records of any size are rows; a value blob is a row when small, a file when large,
    and the stale one of the two never shows nor stays."""
    from nbagent._store import Store

    st = Store(tmp_path / "s")
    kv = st._kv
    st._set_json("k/small", {"a": 1})
    assert st._get_json("k/small") == {"a": 1}
    big = "x" * (st._min_file_size + 10)
    st._put("k/big", big)  # a record of any size is a row
    assert st._raw("k/big") == big and not list((tmp_path / "s").rglob("*.val"))
    st._put("k/bytes", b"\x00\x01")
    assert st._raw("k/bytes") == b"\x00\x01"
    assert [st.incr("r", "n") for _ in range(3)] == [1, 2, 3]
    assert st.counter("r", "n") == 3 and st.incr("r", "n", -3) == 0
    st._put("ctr/r/bad", "not a number")
    with pytest.raises(StoreError, match="damaged"):
        st.incr("r", "bad")
    assert st._raw("ctr/r/bad") == "not a number"  # left as it was
    assert st.incr_many("r", {"n": 5, "m": 2}) == {"n": 5, "m": 2}  # m is new
    with pytest.raises(StoreError, match="ctr/r/bad"):
        st.incr_many("r", {"n": 1, "bad": 1, "m": 1})
    assert (st.counter("r", "n"), st.counter("r", "m")) == (5, 2)  # all or none

    large = os.urandom(st._min_file_size)  # signed: past the row limit, so a file
    st.commit_step("r", "a#1", {"saved": ["v"]}, {"v": large}, previous=None)
    assert st.get_blob("r/a#1/v") == large and list((tmp_path / "s").rglob("*.val"))
    st.commit_step("r", "a#1", {"saved": ["v"]}, {"v": b"small"}, previous={"saved": ["v"]})
    assert st.get_blob("r/a#1/v") == b"small"
    assert not list((tmp_path / "s").rglob("*.val"))  # the older file is gone
    st.commit_step("r", "a#1", {"saved": ["v"]}, {"v": large}, previous={"saved": ["v"]})
    assert st.get_blob("r/a#1/v") == large  # the older row does not hide the file
    assert st._raw("blob/r/a#1/v") is None
    st.commit_step("r", "a#1", {"saved": []}, {}, previous={"saved": ["v"]})
    assert st.get_blob("r/a#1/v") is None and not list((tmp_path / "s").rglob("*.val"))

    count = len(kv)
    st.acquire_lock("r", "s#1")
    assert len(kv) == count  # a file lock: no row
    st.release_lock("r", "s#1")
    st.release_lock("r", "s#1")  # absent: a no-op
    assert len(kv) == count
    assert kv.check() == []
