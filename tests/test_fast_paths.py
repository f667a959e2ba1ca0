"""The fast paths added for speed behave exactly like the slow ones they replace."""

from __future__ import annotations

from typing import Any

from nbagent._engine import MARK, NamespaceSnapshot, NamespaceWatch, names_to_store, user_globals


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


def test_raw_rows_are_diskcache_rows(tmp_path: Any) -> None:
    """Values written by the store's one-statement paths read back through diskcache itself."""
    from nbagent._store import Store

    st = Store(tmp_path / "s")
    kv = st._kv
    st._set_json("k/small", {"a": 1})
    assert kv.get("k/small") == '{"a": 1}'
    big = "x" * (st._min_file_size + 10)
    st._put("k/file", big)  # too big for a row: diskcache keeps it in a file
    assert kv.get("k/file") == big and st._raw("k/file") == big
    files = {p for p in (tmp_path / "s").rglob("*.val")}
    assert files
    st._put("k/file", "small again")  # replaces the file (removed by diskcache)
    assert kv.get("k/file") == "small again"
    assert not any(p.exists() for p in files)
    st._put("k/bytes", b"\x00\x01")
    assert kv.get("k/bytes") == b"\x00\x01"
    assert [st.incr("r", "n") for _ in range(3)] == [1, 2, 3]
    assert kv.get("ctr/r/n") == 3 and st.counter("r", "n") == 3
    assert st.incr("r", "n", -3) == 0
    count = len(kv)
    st.acquire_lock("r", "s#1")
    assert len(kv) == count  # a file lock: no row
    st.release_lock("r", "s#1")
    st.release_lock("r", "s#1")  # absent: a no-op
    assert len(kv) == count
    assert kv.check() == []
