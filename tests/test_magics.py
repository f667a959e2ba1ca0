"""``%%step`` and ``%nbagent`` through a real IPython shell (globalipapp), and the Python API.

A "restart" here drops the cell's variables, reloads the extension and forgets
nbagent's process state (open run, open stores): what a new kernel sees. The
body of a step counts its executions in ``_log``, a name nbagent ignores (it
starts with ``_``) and that survives the simulated restart.
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest

import nbagent
from nbagent import (
    RunStopped,
    StepCapExceeded,
    StepError,
    StoreError,
    UnrestoredValueError,
    _engine,
    _store,
)

REPLAYED = "↺ replayed step"


def cell(ip: Any, source: str, **kwargs: Any) -> Any:
    return ip.run_cell(source, **kwargs)


def ok(ip: Any, source: str, **kwargs: Any) -> Any:
    result = ip.run_cell(source, **kwargs)
    assert result.success, result.error_before_exec or result.error_in_exec
    return result


def restart(ip: Any, *names: str) -> None:
    """Simulate a kernel restart: variables gone, extension and nbagent state fresh."""
    for name in names:
        ip.user_ns.pop(name, None)
    ip.run_line_magic("unload_ext", "nbagent")
    _engine._current_run = None
    _engine._notebook_step = None
    with _store._open_lock:
        stores = list(_store._open_stores.values())
        _store._open_stores.clear()
    for s in stores:
        s.close()
    ip.run_line_magic("load_ext", "nbagent")


def record(step_id: str, run: str = "default") -> dict[str, Any] | None:
    return _store.open_store().get_step(run, step_id)


@pytest.fixture
def log(ip: Any) -> list[str]:
    ip.user_ns["_log"] = []
    return ip.user_ns["_log"]


PLAN = "%%step plan\n_log.append('plan')\nplan = ['a', 'b']\nprint('planned', len(plan))\nlen(plan) * 10\n"


# -- execute, commit, replay ---------------------------------------------------------------


def test_first_run_executes_and_commits(ip: Any, log: list[str], capsys: Any) -> None:
    result = ok(ip, PLAN)
    assert log == ["plan"]
    assert ip.user_ns["plan"] == ["a", "b"]
    assert result.result == 20
    out = capsys.readouterr().out
    assert "planned 2" in out and REPLAYED not in out
    rec = record("plan#1")
    assert rec is not None and rec["status"] == "done"
    assert rec["saved"] == ["(result)", "plan"]
    assert rec["outputs"] == [{"type": "stream", "name": "stdout", "text": "planned 2\n"}]


def test_rerun_after_restart_replays_without_executing(
    ip: Any, log: list[str], capsys: Any
) -> None:
    ok(ip, PLAN)
    capsys.readouterr()
    restart(ip, "plan")
    started = time.perf_counter()
    result = ok(ip, PLAN)
    elapsed = time.perf_counter() - started
    assert log == ["plan"]  # the body did not run again
    assert ip.user_ns["plan"] == ["a", "b"]
    assert result.result == 20  # the last expression's value, shown as Out[]
    out = capsys.readouterr().out
    assert f"{REPLAYED} 'plan' from disk" in out
    assert "0 LLM calls" in out and "$0.00" in out
    assert "planned 2\n" in out
    assert out.index(REPLAYED) < out.index("planned 2")
    assert elapsed < 0.5


def as_older_nbagent_recorded(step_id: str, source_hash: str, run: str = "default") -> None:
    """Rewrite a step record as nbagent's fingerprint version 1 wrote it."""
    store = _store.open_store()
    rec = store.get_step(run, step_id)
    assert rec is not None and rec.pop("fingerprint", 2) == 2
    rec["source_hash"] = source_hash
    store._set_json(f"step/{run}/{step_id}", rec)


def test_records_of_an_older_source_fingerprint_still_replay(
    ip: Any, log: list[str], tmp_path: Any
) -> None:
    """Stores written before the one-walk fingerprint: same source replays, a change runs."""
    import ast

    from nbagent import _fingerprint as fp

    ok(ip, PLAN)
    body = PLAN.split("\n", 1)[1]
    as_older_nbagent_recorded("plan#1", fp.legacy_tree_hash(ast.parse(body)))
    restart(ip, "plan")
    ok(ip, PLAN)
    assert log == ["plan"]  # replayed: nothing re-ran (its LLM calls would be paid again)
    as_older_nbagent_recorded("plan#1", fp.legacy_tree_hash(ast.parse(body + "x = 1\n")))
    restart(ip, "plan")
    ok(ip, PLAN)
    assert log == ["plan", "plan"]  # a different source under the old hash: it runs

    # the Python API and exported modules compare the same way
    script = tmp_path / "agent.py"
    script.write_text(
        "import nbagent\n"
        f"run = nbagent.Run('py', store={str(tmp_path / 's')!r})\n"
        "calls = []\n"
        "@run.step('fetch')\n"
        "def fetch():\n"
        "    calls.append(1)\n"
        "    return 42\n"
    )
    import runpy

    from nbagent._engine import function_source_hash

    ns = runpy.run_path(str(script))
    assert ns["fetch"]() == 42 and ns["calls"] == [1]
    st = ns["run"].store
    rec = st.get_step("py", "fetch#1")
    rec.pop("fingerprint")
    rec["source_hash"] = function_source_hash(ns["fetch"].__wrapped__, legacy=True)
    st._set_json("step/py/fetch#1", rec)
    ns2 = runpy.run_path(str(script))
    assert ns2["fetch"]() == 42 and ns2["calls"] == []  # replayed


def test_replay_in_the_same_kernel_is_a_no_op(ip: Any, log: list[str]) -> None:
    ok(ip, PLAN)
    ok(ip, PLAN)
    assert log == ["plan"]


def test_display_output_is_recorded_and_replayed(ip: Any, log: list[str], capsys: Any) -> None:
    source = (
        "%%step show\n_log.append('show')\nfrom IPython.display import display\n"
        "display({'text/markdown': '**bold**', 'text/plain': 'bold text'}, raw=True)\n"
    )
    ok(ip, source)
    rec = record("show#1")
    assert rec is not None
    displays = [o for o in rec["outputs"] if o["type"] == "display"]
    assert len(displays) == 1 and displays[0]["data"]["text/markdown"] == "**bold**"
    capsys.readouterr()
    capsys.readouterr()
    restart(ip, "display")
    ok(ip, source)
    assert log == ["show"]
    out = capsys.readouterr().out
    assert REPLAYED in out and "bold text" in out


def test_stderr_is_recorded_and_replayed(ip: Any, log: list[str], capsys: Any) -> None:
    source = "%%step warn\nimport sys\n_log.append('warn')\nprint('careful', file=sys.stderr)\n"
    ok(ip, source)
    assert "careful" in capsys.readouterr().err
    restart(ip, "sys")
    ok(ip, source)
    assert log == ["warn"]
    assert "careful" in capsys.readouterr().err


def test_deleted_variable_stays_deleted_on_replay(ip: Any, log: list[str]) -> None:
    ok(ip, "tmp = 1")
    source = "%%step clean\n_log.append('clean')\ndel tmp\nkept = 2\n"
    ok(ip, source)
    restart(ip, "kept")
    ok(ip, "tmp = 1")
    ok(ip, source)
    assert log == ["clean"]
    assert "tmp" not in ip.user_ns and ip.user_ns["kept"] == 2


# -- in-place mutation of earlier variables -------------------------------------------------

SETUP = (
    "findings = []\n"
    "index = {}\n"
    "class Notes:\n"
    "    pass\n"
    "notes = Notes()\n"
    "notes.text = ''\n"
    "seen = []\n"
    "def remember(x):\n"
    "    seen.append(x)\n"
)


@pytest.mark.parametrize(
    ("body", "name", "expected"),
    [
        ("findings.append('f1')", "findings", ["f1"]),
        ("index['k'] = 'v'", "index", {"k": "v"}),
        ("remember('s1')", "seen", ["s1"]),
    ],
    ids=["list-append", "dict-setitem", "through-a-notebook-function"],
)
def test_in_place_mutation_is_stored_and_restored(
    ip: Any, log: list[str], body: str, name: str, expected: Any
) -> None:
    source = f"%%step mutate\n_log.append('mutate')\n{body}\n"
    ok(ip, SETUP)
    ok(ip, source)
    rec = record("mutate#1")
    assert rec is not None and name in rec["saved"]
    restart(ip, "findings", "index", "Notes", "notes", "seen", "remember")
    ok(ip, SETUP)  # the notebook's setup cells run again after a restart
    ok(ip, source)
    assert log == ["mutate"]
    assert ip.user_ns[name] == expected


def test_attribute_set_on_an_earlier_object_is_stored_and_restored(ip: Any, log: list[str]) -> None:
    source = "%%step note\n_log.append('note')\nnotes.text = 'written'\n"
    ok(ip, SETUP)
    ok(ip, source)
    restart(ip, "findings", "index", "Notes", "notes", "seen", "remember")
    ok(ip, SETUP)
    ok(ip, source)
    assert log == ["note"]
    assert ip.user_ns["notes"].text == "written"


def test_later_step_sees_the_mutated_value_after_replay(ip: Any, log: list[str]) -> None:
    first = "%%step collect\n_log.append('collect')\nfindings.append('f1')\n"
    second = "%%step count\n_log.append('count')\nn = len(findings)\n"
    ok(ip, SETUP)
    ok(ip, first)
    ok(ip, second)
    assert ip.user_ns["n"] == 1
    restart(ip, "findings", "index", "Notes", "notes", "seen", "remember", "n")
    ok(ip, SETUP)
    ok(ip, first)
    ok(ip, second)
    assert log == ["collect", "count"]  # both replayed: count's input matches the restored list
    assert ip.user_ns["findings"] == ["f1"] and ip.user_ns["n"] == 1


def test_imports_and_functions_made_in_a_step_come_back(ip: Any, log: list[str]) -> None:
    source = (
        "%%step tools\n_log.append('tools')\nimport json as js\nfrom os import path\n"
        "def dump(x):\n    return js.dumps(x)\n"
    )
    ok(ip, source)
    restart(ip, "js", "path", "dump")
    ok(ip, source)
    assert log == ["tools"]
    assert ip.user_ns["js"].__name__ == "json" and ip.user_ns["path"].__name__ == "posixpath"
    assert ok(ip, "dump([1])").result == "[1]"


def test_function_made_in_a_step_uses_the_notebook_globals_after_replay(
    ip: Any, log: list[str]
) -> None:
    source = "%%step tools\n_log.append('tools')\ndef add(x):\n    findings.append(x)\n"
    ok(ip, "findings = []")
    ok(ip, source)
    restart(ip, "findings", "add")
    ok(ip, "findings = []")
    ok(ip, source)
    ok(ip, "add('f1')")
    assert ip.user_ns["findings"] == ["f1"]


# -- what makes a step execute again ----------------------------------------------------------


def test_comment_only_edit_replays(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, PLAN)
    edited = PLAN.replace("plan = ['a', 'b']", "# the plan\nplan = [ 'a','b' ]  # two items\n")
    restart(ip, "plan")
    capsys.readouterr()
    ok(ip, edited)
    assert log == ["plan"]
    assert REPLAYED in capsys.readouterr().out


def test_code_edit_executes_again_and_says_why(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, PLAN)
    capsys.readouterr()
    ok(ip, PLAN.replace("['a', 'b']", "['a', 'b', 'c']"))
    assert log == ["plan", "plan"]
    assert ip.user_ns["plan"] == ["a", "b", "c"]
    out = capsys.readouterr().out
    assert "▶ step 'plan' runs again: source changed\n" in out
    assert REPLAYED not in out


def test_changed_input_executes_the_step_and_its_dependant(
    ip: Any, log: list[str], capsys: Any
) -> None:
    plan = "%%step plan\n_log.append('plan')\nplan = goal.upper()\n"
    summary = "%%step summary\n_log.append('summary')\nsummary = plan + '!'\n"
    other = "%%step other\n_log.append('other')\nother = 42\n"
    ok(ip, "goal = 'cats'")
    for source in (plan, summary, other):
        ok(ip, source)
    capsys.readouterr()
    ok(ip, "goal = 'dogs'")
    for source in (plan, summary, other):
        ok(ip, source)
    assert log == ["plan", "summary", "other", "plan", "summary"]
    assert ip.user_ns["summary"] == "DOGS!"
    out = capsys.readouterr().out
    assert "▶ step 'plan' runs again: input `goal` changed\n" in out
    assert "▶ step 'summary' runs again: input `plan` changed\n" in out
    assert f"{REPLAYED} 'other'" in out


def test_rerun_flag_executes_again(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, PLAN)
    capsys.readouterr()
    ok(ip, PLAN.replace("%%step plan", "%%step plan --rerun"))
    assert log == ["plan", "plan"]
    assert "runs again: --rerun" in capsys.readouterr().out


# -- failures ---------------------------------------------------------------------------------


def test_failing_cell_stores_nothing_and_shows_a_normal_traceback(
    ip: Any, log: list[str], capsys: Any
) -> None:
    source = "%%step fetch\n_log.append('fetch')\n\npage = 'x'\nvalue = undefined_name + 1\n"
    result = cell(ip, source)
    assert isinstance(result.error_in_exec, NameError)
    assert "undefined_name" in str(result.error_in_exec)
    out = capsys.readouterr().out
    assert "----> 5 value = undefined_name + 1" in out  # the cell's own line numbers
    assert "_magics.py" not in out and "_engine.py" not in out
    assert record("fetch#1") is None
    ok(ip, source.replace("undefined_name + 1", "len(page)"))
    assert log == ["fetch", "fetch"]
    rec = record("fetch#1")
    assert rec is not None and "value" in rec["saved"]


def test_keyboard_interrupt_commits_nothing(ip: Any, log: list[str]) -> None:
    source = "%%step slow\n_log.append('slow')\npartial = 1\nraise KeyboardInterrupt\n"
    result = cell(ip, source)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert record("slow#1") is None
    ok(ip, source.replace("raise KeyboardInterrupt", "done = True"))
    assert log == ["slow", "slow"]
    assert record("slow#1") is not None


def test_syntax_error_in_a_step_is_reported_by_ipython(ip: Any) -> None:
    result = cell(ip, "%%step broken\nx = (\n")
    assert isinstance(result.error_before_exec or result.error_in_exec, SyntaxError)
    assert record("broken#1") is None


def test_tampered_value_is_never_loaded_on_replay(ip: Any, log: list[str], tmp_path: Any) -> None:
    source = "%%step plan\n_log.append('plan')\nplan = [1]\n"
    ok(ip, source)
    boom = tmp_path / "boom"
    bomb = pickle.dumps(_Bomb(boom))
    _store.open_store()._put("blob/default/plan#1/plan", bomb)
    restart(ip, "plan")
    result = cell(ip, source)
    assert isinstance(result.error_in_exec, StoreError)
    assert "not signed" in str(result.error_in_exec) and "--rerun" in str(result.error_in_exec)
    assert not boom.exists()
    assert "plan" not in ip.user_ns and log == ["plan"]
    ok(ip, source.replace("%%step plan", "%%step plan --rerun"))
    assert ip.user_ns["plan"] == [1] and log == ["plan", "plan"]


class _Bomb:
    """Creates a file when unpickled."""

    def __init__(self, path: Any) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (type(self.path).touch, (self.path,))


# -- values that cannot be stored ----------------------------------------------------------------


def test_unpicklable_value_completes_with_a_warning_and_fails_clearly_after_restart(
    ip: Any, log: list[str], capsys: Any
) -> None:
    source = "%%step connect\n_log.append('connect')\nimport threading\nclient = threading.Lock()\nn = 3\n"
    ok(ip, source)
    err = capsys.readouterr().err
    assert "step 'connect' completed" in err and "client" in err and "lock" in err
    restart(ip, "client", "n", "threading")
    ok(ip, source)
    assert log == ["connect"]
    assert ip.user_ns["n"] == 3
    assert "not restored: client" in capsys.readouterr().out
    result = cell(ip, "client.acquire()")
    assert isinstance(result.error_in_exec, UnrestoredValueError)
    message = str(result.error_in_exec)
    assert "'client'" in message and "step 'connect'" in message and "--rerun" in message


def test_strict_makes_an_unpicklable_value_an_error(ip: Any, log: list[str], capsys: Any) -> None:
    source = "%%step connect --strict\n_log.append('connect')\nimport threading\nclient = threading.Lock()\n"
    result = cell(ip, source)
    message = str(result.error_in_exec)
    assert "client" in message and "cannot be stored" in message and "--strict" in message
    assert record("connect#1") is None


def test_strict_error_is_raised_as_the_cells_error(ip: Any) -> None:
    source = "%%step connect --strict\nimport threading\nclient = threading.Lock()\n"
    result = cell(ip, source)
    assert not result.success
    assert isinstance(result.error_in_exec, StepError)
    assert record("connect#1") is None


def test_save_and_exclude(ip: Any, log: list[str]) -> None:
    ok(ip, "%%step keep --save a\n_log.append('keep')\na = 1\nb = 2\n")
    ok(ip, "%%step drop --exclude d\n_log.append('drop')\nc = 3\nd = 4\n")
    assert record("keep#1")["saved"] == ["a"]  # type: ignore[index]
    assert record("drop#1")["saved"] == ["c"]  # type: ignore[index]
    restart(ip, "a", "b", "c", "d")
    ok(ip, "%%step keep --save a\n_log.append('keep')\na = 1\nb = 2\n")
    ok(ip, "%%step drop --exclude d\n_log.append('drop')\nc = 3\nd = 4\n")
    assert log == ["keep", "drop"]
    assert ip.user_ns["a"] == 1 and ip.user_ns["c"] == 3
    assert "b" not in ip.user_ns and "d" not in ip.user_ns


# -- the cell behaves like an ordinary cell ----------------------------------------------------


def test_top_level_await(ip: Any, log: list[str]) -> None:
    source = "%%step wait\nimport asyncio\n_log.append('wait')\nawait asyncio.sleep(0)\nwaited = 'yes'\nwaited\n"
    result = ok(ip, source)
    assert ip.user_ns["waited"] == "yes" and result.result == "yes"
    restart(ip, "waited", "asyncio")
    result = ok(ip, source)
    assert log == ["wait"] and ip.user_ns["waited"] == "yes" and result.result == "yes"


def test_retries_run_the_body_again(ip: Any, log: list[str]) -> None:
    source = (
        "%%step flaky --retries 2\n_log.append('flaky')\n"
        "if len(_log) < 2:\n    raise ConnectionError('try again')\nfine = True\n"
    )
    ok(ip, source)
    assert log == ["flaky", "flaky"]
    assert record("flaky#1")["attempts"] == 2  # type: ignore[index]


def test_retries_keep_the_last_expression_value(ip: Any, log: list[str]) -> None:
    source = "%%step retry --retries 1 --timeout 30\n_log.append('retry')\nv = 5\nv * 2\n"
    assert ok(ip, source).result == 10
    restart(ip, "v")
    assert ok(ip, source).result == 10
    assert log == ["retry"] and ip.user_ns["v"] == 5


def test_timeout_stops_the_body(ip: Any) -> None:
    result = cell(ip, "%%step slow --timeout 0.2\nimport time\ntime.sleep(5)\n")
    assert isinstance(result.error_in_exec, TimeoutError)
    assert record("slow#1") is None


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("%%step plan --bogus", "unrecognized arguments: --bogus"),
        ("%%step", "required: name"),
        ("%%step plan --retries many", "invalid int value"),
        ("%%step 'a/b'", "not valid"),
    ],
)
def test_bad_step_header_is_a_step_error_with_usage(
    ip: Any, log: list[str], header: str, expected: str
) -> None:
    result = cell(ip, f"{header}\n_log.append('x')\n")
    assert isinstance(result.error_in_exec, StepError)
    assert expected in str(result.error_in_exec)
    if "not valid" not in expected:
        assert "usage: %%step" in str(result.error_in_exec)
    assert log == []  # the body did not run


def test_same_name_in_two_cells_is_an_error(ip: Any, log: list[str]) -> None:
    ok(ip, "%%step plan\n_log.append('one')\nx = 1\n", cell_id="cell-1")
    result = cell(ip, "%%step plan\n_log.append('two')\ny = 2\n", cell_id="cell-2")
    assert isinstance(result.error_in_exec, StepError)
    assert "already used by another cell" in str(result.error_in_exec)
    assert log == ["one"]
    ok(ip, "%%step plan\n_log.append('one')\nx = 1\n", cell_id="cell-1")  # the same cell again


def test_help(ip: Any, capsys: Any) -> None:
    ok(ip, "%%step --help\nnot_run = 1\n")
    out = capsys.readouterr().out
    assert "usage: %%step" in out and "--rerun" in out and "--exclude" in out
    assert "not_run" not in ip.user_ns
    ok(ip, "%nbagent --help")
    out = capsys.readouterr().out
    for command in ("start", "status", "runs", "reset", "cap", "stop", "resume"):
        assert command in out


# -- %nbagent --------------------------------------------------------------------------------


def test_start_status_runs_and_reset(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, "%nbagent start research-1 --cap-usd 2 --max-steps 50 --no-dashboard")
    assert "opened run 'research-1'" in capsys.readouterr().out
    ok(ip, "%%step plan\n_log.append('plan')\nplan = 1\n")
    ok(ip, "%%step act\n_log.append('act')\nact = 2\n")
    status = ok(ip, "%nbagent status").result
    text = str(status)
    assert "research-1" in text and "$2.00" in text and "2/50" in text
    assert "plan#1" in text and "act#1" in text
    capsys.readouterr()
    ok(ip, "%nbagent runs")
    assert "* research-1" in capsys.readouterr().out
    ok(ip, "%nbagent reset plan")
    out = capsys.readouterr().out
    assert "dropped 1 step record" in out and "plan#1" in out
    ok(ip, "%%step plan\n_log.append('plan')\nplan = 1\n")
    ok(ip, "%%step act\n_log.append('act')\nact = 2\n")
    assert log == ["plan", "act", "plan"]
    result = cell(ip, "%nbagent reset nothing")
    assert isinstance(result.error_in_exec, StepError)
    result = cell(ip, "%nbagent reset")
    assert isinstance(result.error_in_exec, StepError)
    ok(ip, "%nbagent reset --all")
    assert "dropped 2 step records" in capsys.readouterr().out
    restart(ip, "plan", "act")
    ok(ip, "%nbagent start research-1 --no-dashboard")
    assert "0 completed steps" in capsys.readouterr().out


def test_resume_a_run_after_restart(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, "%nbagent start r1 --no-dashboard")
    ok(ip, "%%step plan\n_log.append('plan')\nplan = 1\n")
    restart(ip, "plan")
    capsys.readouterr()
    ok(ip, "%nbagent start r1 --no-dashboard")
    assert "resumed run 'r1' · 1 completed step" in capsys.readouterr().out
    ok(ip, "%%step plan\n_log.append('plan')\nplan = 1\n")
    assert log == ["plan"]
    assert record("plan#1", run="r1") is not None


def test_step_cap(ip: Any, log: list[str]) -> None:
    ok(ip, "%nbagent start r --max-steps 2 --no-dashboard")
    ok(ip, "%%step a\n_log.append('a')\na = 1\n")
    ok(ip, "%%step b\n_log.append('b')\nb = 1\n")
    ok(ip, "%%step a\n_log.append('a')\na = 1\n")  # a replay is free
    result = cell(ip, "%%step c\n_log.append('c')\nc = 1\n")
    assert isinstance(result.error_in_exec, StepCapExceeded)
    assert "max_steps=2" in str(result.error_in_exec)
    assert log == ["a", "b"]
    assert record("c#1", run="r") is None
    ok(ip, "%nbagent cap --steps 3")
    ok(ip, "%%step c\n_log.append('c')\nc = 1\n")
    assert log == ["a", "b", "c"]


def test_stop_and_resume(ip: Any, log: list[str], capsys: Any) -> None:
    ok(ip, "%nbagent start r --no-dashboard")
    ok(ip, "%%step a\n_log.append('a')\na = 1\n")
    ok(ip, "%nbagent stop the key leaked")
    result = cell(ip, "%%step b\n_log.append('b')\nb = 1\n")
    assert isinstance(result.error_in_exec, RunStopped)
    assert "the key leaked" in str(result.error_in_exec)
    ok(ip, "%%step a\n_log.append('a')\na = 1\n")  # replays still work while stopped
    assert "STOPPED" in str(ok(ip, "%nbagent status").result)
    ok(ip, "%nbagent resume")
    ok(ip, "%%step b\n_log.append('b')\nb = 1\n")
    assert log == ["a", "b"]


def test_default_run_without_start(ip: Any) -> None:
    ok(ip, "%%step plan\nplan = 1\n")
    assert nbagent.current_run().name == "default"  # type: ignore[union-attr]


def test_idempotency_key_inside_a_step_cell(ip: Any) -> None:
    ok(ip, "%nbagent start r --no-dashboard")
    ok(ip, "%%step pay\nimport nbagent\nkey = nbagent.idempotency_key()\n")
    assert ip.user_ns["key"] == "run:r:step:pay:1"


# -- the Python API ------------------------------------------------------------------------------


def test_python_step_in_a_loop_gets_one_record_per_call(tmp_path: Any) -> None:
    calls: list[int] = []
    run = nbagent.Run("py-1", store=tmp_path / "s", max_steps=50)

    @run.step("fetch")
    def fetch(i: int) -> dict[str, Any]:
        calls.append(i)
        return {"i": i, "key": nbagent.idempotency_key()}

    results = [fetch(i) for i in range(3)]
    assert calls == [0, 1, 2]
    assert [r["key"] for r in results] == [f"run:py-1:step:fetch:{n}" for n in (1, 2, 3)]
    assert run.steps() == ["fetch#1", "fetch#2", "fetch#3"]
    assert nbagent.current_run() is run
    status = run.status()
    assert status.steps_executed == 3 and len(status.steps) == 3 and status.max_steps == 50

    again = nbagent.Run("py-1", store=tmp_path / "s")  # a new process
    fetch2 = again.step("fetch")(fetch.__wrapped__)
    assert [fetch2(i) for i in range(3)] == results
    assert calls == [0, 1, 2]  # replayed, not called
    assert again.steps_executed == 3
    assert again.max_steps == 50  # caps are kept by the store


def test_python_step_changed_arguments_execute_again(tmp_path: Any) -> None:
    calls: list[int] = []
    run = nbagent.Run("py-2", store=tmp_path / "s")

    @run.step("square")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(3) == 9
    again = nbagent.Run("py-2", store=tmp_path / "s")
    square2 = again.step("square")(square.__wrapped__)
    assert square2(4) == 16
    assert calls == [3, 4]


def test_python_step_replay_prints_recorded_output(tmp_path: Any, capsys: Any) -> None:
    run = nbagent.Run("py-3", store=tmp_path / "s")

    calls: list[int] = []

    def hello() -> str:
        calls.append(1)
        print("hello from the step")
        return "hi"

    assert run.step("hello")(hello)() == "hi"
    assert "hello from the step" in capsys.readouterr().out
    again = nbagent.Run("py-3", store=tmp_path / "s")
    assert again.step("hello")(hello)() == "hi"
    assert calls == [1]
    out = capsys.readouterr().out
    assert f"{REPLAYED} 'hello'" in out and "hello from the step" in out


def test_python_step_failure_stores_nothing(tmp_path: Any) -> None:
    run = nbagent.Run("py-4", store=tmp_path / "s")

    @run.step("boom")
    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        boom()
    assert run.steps() == []


def test_idempotency_key_outside_a_step_is_an_error() -> None:
    with pytest.raises(nbagent.NbagentError, match="inside a step"):
        nbagent.idempotency_key()


def test_current_run_without_a_run_is_an_error() -> None:
    with pytest.raises(nbagent.NbagentError, match="no nbagent run is open"):
        nbagent.current_run()
    assert nbagent.current_run(required=False) is None


def test_step_names_with_control_characters_are_refused(ip: Any) -> None:
    result = cell(ip, "%%step 'a\x00b'\nx = 1\n")
    assert isinstance(result.error_in_exec, StepError)
    assert "printable" in str(result.error_in_exec)
    with pytest.raises(StepError, match="printable"):
        nbagent.Run("tab\there")


def test_text_status_line_prints_the_summary_without_hooks_or_timers(
    ip: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBAGENT_WIDGETS", "0")
    hooks = len(ip.events.callbacks["post_run_cell"])

    def timers() -> int:  # the store's checkpoint thread is not the status line's
        return sum(t.name != "nbagent-checkpoint" for t in threading.enumerate())

    threads = timers()
    ok(ip, "%%step quiet\n_seen = len(get_ipython().events.callbacks['post_run_cell'])\n")
    assert ip.user_ns["_seen"] == hooks  # no hook per step: %%step finishes the line itself
    assert cell(ip, "%%step loud\nraise ValueError('nope')\n").error_in_exec is not None
    assert len(ip.events.callbacks["post_run_cell"]) == hooks
    assert timers() == threads
    out = capsys.readouterr().out
    assert "✓ step 'quiet' done · 1 attempt · " in out and " · 0 LLM calls · $0.00\n" in out
    assert "✗ step 'loud' failed · 1 attempt · " in out and "ValueError: nope\n" in out
