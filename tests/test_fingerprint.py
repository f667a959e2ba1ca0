"""Fingerprints: normalized source, value hashes stable across processes, names a cell reads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pandas as pd
import pytest

from nbagent._fingerprint import (
    hash_value,
    is_opaque,
    names_deleted,
    names_read,
    reachable_names,
    source_hash,
)

# -- source -----------------------------------------------------------------------------

BASE = "x = load(1)\nfor i in range(3):\n    x.append(i)\n"


@pytest.mark.parametrize(
    "edited",
    [
        "# a comment\nx = load(1)\nfor i in range(3):\n    x.append(i)  # inline\n",
        "\n\nx = load( 1 )\n\nfor i in range(3):\n\n    x.append(i)\n\n\n",
        "x=load(1)\nfor i in range(3):\n        x.append(i)\n",
        "x = load(1)  \nfor i in range(3):\n    x.append(i)   \n# trailing comment",
    ],
)
def test_comment_and_whitespace_edits_keep_the_source_hash(edited: str) -> None:
    assert source_hash(edited) == source_hash(BASE)


@pytest.mark.parametrize(
    "edited",
    [
        "x = load(2)\nfor i in range(3):\n    x.append(i)\n",
        "y = load(1)\nfor i in range(3):\n    y.append(i)\n",
        "x = load(1)\nfor i in range(3):\n    x.append(i)\nprint(x)\n",
        "x = load(1)\nfor i in range(3):\n    pass\nx.append(i)\n",
        "x = load('1')\nfor i in range(3):\n    x.append(i)\n",
    ],
)
def test_code_edits_change_the_source_hash(edited: str) -> None:
    assert source_hash(edited) != source_hash(BASE)


def test_source_hash_of_code_that_does_not_parse_is_still_stable() -> None:
    bad = "x = (\n"
    assert source_hash(bad) == source_hash(bad + "   \n")
    assert source_hash(bad) != source_hash("x = [\n")


# -- values ------------------------------------------------------------------------------


def _hash_in_subprocess(expr: str, seed: str, setup: str = "") -> str:
    code = f"{setup}\nfrom nbagent._fingerprint import hash_value\nprint(hash_value({expr}))\n"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_sets_of_strings_hash_the_same_in_every_process() -> None:
    expr = "[{'alpha', 'beta', 'gamma', 'delta', 'eps'}, frozenset({'x', 'y', 'z'}), {'k': {'a', 'b'}}]"
    here = hash_value(
        [{"alpha", "beta", "gamma", "delta", "eps"}, frozenset({"x", "y", "z"}), {"k": {"a", "b"}}]
    )
    assert _hash_in_subprocess(expr, "1") == here
    assert _hash_in_subprocess(expr, "12345") == here


def test_notebook_functions_hash_by_code_across_processes() -> None:
    setup = (
        "def add_finding(x):\n"
        "    if x not in {'alpha', 'beta', 'gamma', 'delta'}:  # a frozenset constant\n"
        "        findings.append(x)\n"
    )
    here_ns: dict[str, object] = {"__name__": "__main__"}
    exec(compile(setup, "<cell>", "exec"), here_ns)
    digest = hash_value(here_ns["add_finding"])
    assert not is_opaque(digest)
    assert _hash_in_subprocess("add_finding", "7", setup) == digest
    other: dict[str, object] = {"__name__": "__main__"}
    exec(compile(setup.replace("append", "remove"), "<cell>", "exec"), other)
    assert hash_value(other["add_finding"]) != digest


def test_lambdas_and_closures_hash_by_code() -> None:
    def make(k: int):  # type: ignore[no-untyped-def]
        return lambda v: v + k

    assert hash_value(lambda v: v + 1) == hash_value(lambda v: v + 1)
    assert hash_value(lambda v: v + 1) != hash_value(lambda v: v + 2)
    assert not is_opaque(hash_value(make(1)))


def test_equal_values_hash_equal_and_different_values_differ() -> None:
    values = [
        None,
        True,
        1,
        1.0,
        "1",
        b"1",
        [1, 2],
        (1, 2),
        {"a": 1},
        {"a": 2},
        {1, 2},
        [1, [2, [3]]],
    ]
    digests = [hash_value(v) for v in values]
    assert len(set(digests)) == len(values)  # 1, 1.0, True, "1" are all told apart
    assert digests == [hash_value(v) for v in values]
    assert hash_value({"a": 1, "b": [1, 2]}) == hash_value({"a": 1, "b": [1, 2]})


def test_scalars_and_strings_hash_as_the_general_path_does() -> None:
    """hash_value's fast path for scalars and strings gives the walker's digests (stored hashes
    in records made before it keep matching)."""
    from nbagent._fingerprint import _Hasher

    for value in (None, True, False, 0, -7, 2**80, 1.5, float("nan"), -0.0, 3j, "", "héllo",
                  "\ud800", "x" * 10_000):  # fmt: skip
        walker = _Hasher()
        walker.feed(value)
        assert hash_value(value) == walker.h.hexdigest(), value


def test_dict_hash_tracks_content() -> None:
    d = {"k": [1, 2]}
    before = hash_value(d)
    d["k"].append(3)
    assert hash_value(d) != before
    d["k"].pop()
    assert hash_value(d) == before


def test_cyclic_structures_hash() -> None:
    a: list[object] = [1]
    a.append(a)
    assert hash_value(a) == hash_value(a)
    assert not is_opaque(hash_value(a))


def test_numpy_arrays() -> None:
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert hash_value(a) == hash_value(a.copy())
    assert hash_value(a) == hash_value(np.asfortranarray(a))  # same content, other layout
    assert hash_value(a) != hash_value(a.astype(np.float32))
    assert hash_value(a) != hash_value(a.reshape(4, 3))
    b = a.copy()
    b[1, 1] = -1
    assert hash_value(a) != hash_value(b)
    assert hash_value(a[:, ::2]) == hash_value(np.ascontiguousarray(a[:, ::2]))
    obj = np.array(["x", None], dtype=object)
    assert hash_value(obj) == hash_value(obj.copy())
    setup = "import numpy as np"
    assert _hash_in_subprocess("np.arange(12, dtype=np.float64).reshape(3, 4)", "3", setup) == (
        hash_value(a)
    )


def test_pandas_dataframes() -> None:
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    assert hash_value(df) == hash_value(df.copy())
    changed = df.copy()
    changed.loc[1, "a"] = 20
    assert hash_value(changed) != hash_value(df)
    renamed = df.rename(columns={"b": "c"})
    assert hash_value(renamed) != hash_value(df)
    setup = "import pandas as pd"
    expr = "pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})"
    assert _hash_in_subprocess(expr, "99", setup) == hash_value(df)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(threading.Lock, id="lock"),
        pytest.param(lambda: (i for i in range(3)), id="generator"),
    ],
)
def test_unpicklable_objects_give_an_opaque_token(make) -> None:  # type: ignore[no-untyped-def]
    value = make()
    digest = hash_value(value)
    assert is_opaque(digest)
    assert digest.startswith("opaque:")
    assert type(value).__qualname__ in digest
    assert hash_value(make()) == digest  # a new client does not invalidate steps


def test_unpicklable_part_of_a_container_does_not_make_it_opaque() -> None:
    lock = threading.Lock()
    digest = hash_value({"lock": lock, "n": 1})
    assert not is_opaque(digest)
    assert digest != hash_value({"lock": lock, "n": 2})


# -- names ------------------------------------------------------------------------------------


SAMPLES = [
    "x = 1",
    "plan = ask(goal).split('\\n')\nfor p in plan:\n    findings.append(p)",
    "async def f(a, *b, c=1, **d):\n    global g\n    await h(a)\n    return [i async for i in b]",
    "class C(B, metaclass=M):\n    x: int = 3\n    def m(self): nonlocal_ = lambda: y",
    "with open(p) as f, lock:\n    data = {k: v for k, v in f if k not in seen}",
    "try:\n    r = 1 / z\nexcept (ValueError, E) as e:\n    raise X from e\nfinally:\n    del q",
    "match cmd:\n    case [a, *rest] if a > lim:\n        print(f'{a!r:>{w}}')\n    case _:\n        pass",
    "s = b'bytes' + 'x' 'y'; t = 1j + 2.5e-3; u = ...; v = None; w = True",
    "import os.path as op\nfrom .m import (a, b as c)\nx = [*a, *op.sep]",
]


@pytest.mark.parametrize("source", SAMPLES)
def test_one_walk_reads_what_the_ast_walk_reads_and_survives_unparse(source: str) -> None:
    import ast

    from nbagent._fingerprint import fingerprint

    tree = ast.parse(source)
    old = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            old.add(node.id)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            old.update(node.names)
    digest, reads = fingerprint(tree)
    assert reads == old
    # an exported module hashes ast.unparse(body): the notebook's records must match it
    assert fingerprint(ast.parse(ast.unparse(tree)))[0] == digest == source_hash(source)
    others = {fingerprint(ast.parse(other))[0] for other in SAMPLES if other != source}
    assert digest not in others


def test_names_read_includes_names_inside_functions_and_globals() -> None:
    tree = ast.parse(
        textwrap.dedent(
            """
            y = x + 1
            def f():
                global counter
                return helper(z)
            print(y)
            """
        )
    )
    assert {"x", "helper", "z", "counter", "print", "y"} <= names_read(tree)
    assert "f" not in names_read(tree)


def test_names_deleted() -> None:
    assert names_deleted(ast.parse("del a, b\nx = 1\ndef f():\n    del c\n")) == {"a", "b"}


def test_reachable_names_follow_a_function_that_mutates_a_global() -> None:
    ns: dict[str, object] = {}
    exec(
        compile(
            textwrap.dedent(
                """
                findings = []
                seen = set()
                unrelated = 1
                def _remember(x):
                    seen.add(x)
                def add_finding(x):
                    findings.append(x)
                    _remember(x)
                class Box:
                    def put(self, x):
                        findings.append(x)
                box = Box()
                """
            ),
            "<cell>",
            "exec",
        ),
        ns,
    )
    reached = reachable_names({"add_finding", "len"}, ns)
    assert {"add_finding", "findings", "_remember", "seen"} <= reached
    assert "unrelated" not in reached and "len" not in reached
    assert reachable_names({"unrelated"}, ns) == {"unrelated"}
    # a bound method of a notebook-defined class
    ns["put"] = ns["box"].put  # type: ignore[attr-defined]
    assert "findings" in reachable_names({"put"}, ns)


_NOTEBOOK_CLASSES = (
    "from dataclasses import dataclass, field\n"
    "@dataclass\n"
    "class Finding:\n"
    "    title: str\n"
    "    tags: set = field(default_factory=set)\n"
    "class Box:\n"
    "    pass\n"
    "box = Box()\n"
    "box.items = [Finding('a', {'x', 'y', 'z'})]\n"
    "box.me = box\n"
)


def test_instances_of_notebook_classes_hash_the_same_after_a_restart() -> None:
    """A class defined in the notebook is re-created by every kernel: same content, same hash."""
    ns: dict[str, object] = {"__name__": "__main__"}
    exec(compile(_NOTEBOOK_CLASSES, "<cell>", "exec"), ns)
    digest = hash_value(ns["box"])
    assert not is_opaque(digest)
    again: dict[str, object] = {"__name__": "__main__"}
    exec(compile(_NOTEBOOK_CLASSES, "<cell>", "exec"), again)  # the class is a new object
    assert hash_value(again["box"]) == digest
    assert _hash_in_subprocess("box", "5", _NOTEBOOK_CLASSES) == digest
    again["box"].items[0].title = "b"  # type: ignore[attr-defined]
    assert hash_value(again["box"]) != digest


def test_notebook_object_holding_a_lock_hashes_its_other_state() -> None:
    ns: dict[str, object] = {"__name__": "__main__"}
    exec(compile("class Client:\n    pass\n", "<cell>", "exec"), ns)
    client = ns["Client"]()  # type: ignore[operator]
    client.lock, client.n = threading.Lock(), 1
    digest = hash_value(client)
    assert not is_opaque(digest)
    client.lock = threading.Lock()
    assert hash_value(client) == digest
    client.n = 2
    assert hash_value(client) != digest
