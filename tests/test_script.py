"""``nbagent.cell_step``: the ``%%step`` rules applied to a module's globals."""

from __future__ import annotations

import linecache
from pathlib import Path
from typing import Any

import pytest

from nbagent import UnsavedValueWarning, cell_step
from nbagent._engine import Run


@pytest.fixture(autouse=True)
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "executions.log"
    monkeypatch.setenv("SCRIPT_LOG", str(path))
    return path


def executions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def load(source: str, name: str = "<agent>") -> dict[str, Any]:
    """Execute module source as a fresh ``__main__``, like a new ``python agent.py``."""
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, name, "exec", dont_inherit=True), namespace)
    return namespace


AGENT = '''\
import os

import nbagent

LOG = os.environ["SCRIPT_LOG"]
findings = ["seed"]
config = {"depth": 1}
run = nbagent.Run("script-run")


@nbagent.cell_step(run, "research")
def research():
    """Docstrings do not count in the fingerprint."""
    global answer, scratch
    with open(LOG, "a") as log:
        log.write("research\\n")
    answer = f"depth {config['depth']}"
    findings.append(answer)  # mutated in place: stored
    scratch = 1
    del scratch
'''


def test_commit_then_replay_restores_bound_and_mutated_globals(log: Path, capsys: Any) -> None:
    first = load(AGENT)
    first["research"]()
    assert executions(log) == ["research"]
    assert first["findings"] == ["seed", "depth 1"]
    assert "scratch" not in first

    second = load(AGENT)
    second["research"]()
    assert executions(log) == ["research"]  # not executed again
    assert second["answer"] == "depth 1"
    assert second["findings"] == ["seed", "depth 1"]
    assert "↺ replayed step 'research' from disk" in capsys.readouterr().out


def test_comment_and_docstring_edits_replay_code_edits_execute(log: Path) -> None:
    load(AGENT)["research"]()
    edited = AGENT.replace('"""Docstrings do not count', '"""Edited docs; comments neither')
    edited = edited.replace("# mutated in place: stored", "# another comment")
    again = load(edited)
    again["research"]()
    assert executions(log) == ["research"]
    changed = load(AGENT.replace("depth {", "level {"))
    changed["research"]()
    assert executions(log) == ["research"] * 2 and changed["answer"] == "level 1"


def test_a_changed_input_reexecutes_and_says_why(log: Path) -> None:
    load(AGENT)["research"]()
    module = load(AGENT.replace('{"depth": 1}', '{"depth": 2}'))
    events: list[dict[str, Any]] = []
    module["run"].subscribe(events.append)
    module["research"]()
    assert executions(log) == ["research"] * 2
    started = [e for e in events if e["type"] == "step_started"]
    assert started[0]["reason"] == "input `config` changed"


def test_failure_stores_nothing() -> None:
    source = AGENT.replace("    scratch = 1", "    1 / 0")
    module = load(source)
    with pytest.raises(ZeroDivisionError):
        module["research"]()
    assert module["run"].steps() == []


def test_save_exclude_and_unsaveable_values() -> None:
    run = Run("options-run")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    body = "global kept, dropped\nkept = 1\ndropped = 2"
    cell_step(run, "opts", save=["kept"])(_in(namespace, body))()
    record = run.store.get_step(run.name, "opts#1")
    assert record is not None and record["saved"] == ["kept"]

    body = "global lock\nimport threading\nlock = threading.Lock()"
    with pytest.warns(UnsavedValueWarning, match="lock"):
        cell_step(run, "lock", exclude=["threading"])(_in(namespace, body))()
    assert namespace["lock"] is not None


def _in(namespace: dict[str, Any], body: str) -> Any:
    """A function with ``body`` whose globals are ``namespace``, with retrievable source."""
    source = "def step():\n" + "".join(f"    {line}\n" for line in body.splitlines())
    name = f"<step {abs(hash(source))}>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    exec(compile(source, name, "exec", dont_inherit=True), namespace)
    return namespace.pop("step")
