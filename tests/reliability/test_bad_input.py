"""Bad input: fuzzed magic arguments and Python API calls, huge cells, odd values and output.

Only nbagent's own errors (NbagentError and subclasses, IPython's UsageError) with a message;
never an internal TypeError/AttributeError/KeyError. Odd but legal cells commit and replay.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

import nbagent
from nbagent import _engine, _store
from nbagent._errors import NbagentError

CI = os.environ.get("CI") == "true"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=CI,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED = (NbagentError, UsageError)

words = st.sampled_from(
    [
        "plan",
        "--retries",
        "--timeout",
        "--rerun",
        "--save",
        "--exclude",
        "--strict",
        "--help",
        "-h",
        "2",
        "-1",
        "nan",
        "1e309",
        "a,b",
        ",",
        "'",
        '"',
        "x y",
        "#",
        "/",
        "é",
        "\\",
        "",
        "--",
        "-",
        "--retries=abc",
    ]
)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
header_text = st.one_of(
    st.lists(words, max_size=6).map(" ".join),
    # no line breaks (what follows one is the body: its syntax is the user's, as in any cell)
    st.text(
        st.characters(blacklist_characters=LINE_BREAKS, blacklist_categories=("Cs",)), max_size=40
    ),
)


def cell_error(result: Any) -> BaseException | None:
    return result.error_before_exec or result.error_in_exec


def assert_clean(error: BaseException | None) -> None:
    if error is None:
        return
    assert isinstance(error, ALLOWED), f"internal error: {type(error).__name__}: {error}"
    assert str(error).strip(), "an error without a message"


@FUZZ
@given(header=header_text)
def test_fuzzed_step_headers(ip: Any, header: str) -> None:
    result = ip.run_cell(f"%%step {header}\nfuzzed_value = 1\n")
    assert_clean(cell_error(result))


sub = st.sampled_from(
    ["start", "status", "runs", "reset", "cap", "stop", "resume", "trace", "plot", "", "bogus"]
)
args = st.lists(
    st.sampled_from(
        [
            "fuzz-run",
            "--cap-usd",
            "--max-steps",
            "--max-llm-calls",
            "--usd",
            "--steps",
            "--llm-calls",
            "--all",
            "--last",
            "--no-dashboard",
            "--strict",
            "-5",
            "0",
            "nan",
            "inf",
            "abc",
            "spend",
            "latency",
            "tokens",
            "plan",
            "'",
            "--help",
            "/",
            "a/b",
            " ",
        ]
    ),
    max_size=5,
)


@FUZZ
@given(command=sub, rest=args)
def test_fuzzed_nbagent_lines(ip: Any, command: str, rest: list[str]) -> None:
    line = " ".join([command, *rest])
    if command == "start" and "--no-dashboard" not in rest:
        line += " --no-dashboard"
    result = ip.run_cell(f"%nbagent {line}")
    assert_clean(cell_error(result))
    ext_run = _engine._current_run
    if ext_run is not None and ext_run.stopped:
        ext_run.resume()


odd_numbers = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.just([1]),
    st.just(math.nan),
)
odd_names = st.one_of(
    st.text(max_size=250),
    st.none(),
    st.integers(),
    st.binary(max_size=5),
    st.just("a/b"),
    st.just("#x"),
    st.just(" x"),
)


@FUZZ
@given(name=odd_names, usd=odd_numbers, steps=odd_numbers, calls=odd_numbers, step=odd_names)
def test_fuzzed_python_api(name: Any, usd: Any, steps: Any, calls: Any, step: Any) -> None:
    try:
        run = nbagent.Run(name, max_cost_usd=usd, max_steps=steps, max_llm_calls=calls)

        @run.step(step)
        def body() -> int:
            return 1

        assert body() == 1
        run.status()
    except ALLOWED as e:
        assert str(e).strip()


# -- odd but legal cells ---------------------------------------------------------------------


def restart(ip: Any, names: list[str]) -> None:
    """Forget the kernel's variables and nbagent's in-memory state, as after a restart."""
    for n in names:
        ip.user_ns.pop(n, None)
    ext = next(iter(__import__("nbagent._magics", fromlist=["_extensions"])._extensions.values()))
    ext.run = None
    ext.cells.clear()
    _engine._current_run = None
    with _store._open_lock:
        _store._open_stores.clear()


def test_huge_cell_commits_and_replays(ip: Any) -> None:
    body = "\n".join(f"v{i} = {i}" for i in range(10_000))
    cell = (
        f"%%step huge\n{body}\ntotal = sum([{', '.join(f'v{i}' for i in range(0, 10_000, 100))}])"
    )
    assert cell_error(ip.run_cell(cell)) is None
    expected = ip.user_ns["total"]
    restart(ip, ["total", *(f"v{i}" for i in range(10_000))])
    result = ip.run_cell(cell)
    assert cell_error(result) is None
    assert ip.user_ns["total"] == expected and ip.user_ns["v9999"] == 9999


def test_recursive_and_unpicklable_values_commit_and_replay(ip: Any) -> None:
    cell = (
        "%%step odd\n"
        "import threading\n"
        "loop = [1, 2]\nloop.append(loop)\n"
        "a = {'name': 'a'}\nb = {'name': 'b', 'a': a}\na['b'] = b\n"
        "lock = threading.Lock()\n"
        "gen = (i for i in range(3))\n"
    )
    assert cell_error(ip.run_cell(cell)) is None
    restart(ip, ["loop", "a", "b", "lock", "gen", "threading"])
    result = ip.run_cell(cell)
    assert cell_error(result) is None
    loop, a = ip.user_ns["loop"], ip.user_ns["a"]
    assert loop[2] is loop and loop[:2] == [1, 2]
    assert a["b"]["a"] is a
    with pytest.raises(nbagent.UnrestoredValueError, match="odd"):
        ip.user_ns["lock"].acquire()


NON_UTF8 = r"""
import sys, nbagent
run = nbagent.Run("bytes")

@run.step("raw")
def raw():
    sys.stdout.buffer.write(b"\xff\xfe raw bytes\n")
    sys.stdout.flush()
    print("lone surrogate: \udcff")
    return "done"

print(raw())
"""


@pytest.mark.slow
def test_non_utf8_output_of_a_python_step_commits_and_replays(tmp_path: Path) -> None:
    script = tmp_path / "raw.py"
    script.write_text(NON_UTF8)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"}
    runs = [
        subprocess.run([sys.executable, str(script)], capture_output=True, env=env, timeout=60)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr.decode("utf-8", "replace")[-2000:]
    assert b"\xff\xfe raw bytes" in runs[0].stdout
    assert b"replayed step 'raw'" in runs[1].stdout and runs[1].stdout.endswith(b"done\n")


def test_non_utf8_output_of_a_step_cell_commits_and_replays(ip: Any) -> None:
    cell = (
        "%%step raw-cell\n"
        "import sys\n"
        "print('lone surrogate: \\udcff')\n"
        "sys.stdout.write('\\udcfe\\n')\n"
        "raw_done = True\n"
    )
    assert cell_error(ip.run_cell(cell)) is None
    restart(ip, ["raw_done"])
    assert cell_error(ip.run_cell(cell)) is None
    assert ip.user_ns["raw_done"] is True


def test_header_ends_where_ipython_ends_the_line() -> None:
    """Regression: a header with \\u2028 or \\x1e was one line for nbagent, two for IPython."""
    from nbagent._magics import parse_header

    assert parse_header("%%step plan\u2028x = 1\ny = 2\n") == ("plan", "x = 1\ny = 2\n")
    assert parse_header("%%step plan --rerun\nx = 1") == ("plan --rerun", "x = 1")
