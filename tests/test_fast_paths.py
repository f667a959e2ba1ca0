"""The fast paths added for speed behave exactly like the slow ones they replace."""

from __future__ import annotations

from typing import Any

from nbagent._engine import NamespaceSnapshot, names_to_store, user_globals


def _both(ns: dict[str, Any], body: Any, candidates: list[str], inputs: dict[str, str]) -> None:
    snap, plain = NamespaceSnapshot(ns), user_globals(ns)
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
