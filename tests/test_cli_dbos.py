"""``nbagent run/runs/show/trace --engine dbos --db URL``: an exported notebook on DBOS.

The runs go through ``python -m nbagent`` in subprocesses (DBOS is one
instance per process, and a crash test needs a process to kill) against a
real PostgreSQL server that the tests start (tests/pg_fixture.py).
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from pg_fixture import pg_server, pg_url  # noqa: F401 - fixtures

from nbagent._cli import main

ROOT = Path(__file__).resolve().parents[1]

SETUP = """\
import os
import time
from pathlib import Path

import nbagent

HERE = Path(os.environ["AGENT_OUT"])
client = nbagent.simulated_client()


def executed(what):
    with (HERE / "executions.log").open("a") as f:
        f.write(what + "\\n")"""

PLAN = """\
%%step plan
executed("plan")
reply = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Split into 2 sub-questions: why is the sky blue?"}],
)
plan = reply.choices[0].message.content.splitlines()
print(len(plan), "questions")"""

# the step the test kills: its side effect happens, then it waits for the kill
CHARGE = """\
%%step charge
executed("charge")
receipt = nbagent.once("email", lambda key: executed("email") or key)
(HERE / "marker").touch()
if not (HERE / "resume").exists():
    time.sleep(120)"""

ANSWER = """\
%%step answer
executed("answer")
reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Answer: " + plan[0]}]
)
answer = reply.choices[0].message.content
print("ANSWER", answer.splitlines()[0])"""


def make_notebook(folder: Path, *steps: str, start: str) -> Path:
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell("# A research agent on DBOS"),
        new_code_cell(SETUP),
        new_code_cell(f"%load_ext nbagent\n{start}"),
        *map(new_code_cell, steps),
    ]
    path = folder / "agent.ipynb"
    nbformat.write(nb, path)
    return path


def executions(folder: Path) -> list[str]:
    log = folder / "executions.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("AGENT_OUT", str(work))
    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")
    monkeypatch.delenv("NBAGENT_ENGINE", raising=False)
    monkeypatch.delenv("NBAGENT_DB_URL", raising=False)
    return work


def nbagent_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbagent", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sql(url: str, query: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def _counter(url: str, run: str, name: str) -> int:
    from nbagent._pgstore import PgStore

    store = PgStore(url)
    try:
        return store.counter(run, name)
    finally:
        store.close()


# -- no server needed ----------------------------------------------------------------------


def test_an_unreachable_database_exits_2_naming_the_url_and_the_fix(
    folder: Path, capsys: Any
) -> None:
    nb = make_notebook(folder, PLAN, start="%nbagent start cli-dbos --cap-usd 1")
    url = "postgresql://agent:s3cret-pw@127.0.0.1:1/agents"
    for argv in (
        ["run", str(nb), "--engine", "dbos", "--db", url],
        ["runs", "--db", url],
        ["show", "cli-dbos", "--engine", "dbos", "--db", url],
        ["trace", "cli-dbos", "--db", url],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot connect to the PostgreSQL database at" in err, err
        assert "agent:***@127.0.0.1:1/agents" in err and "s3cret-pw" not in err
        assert "--db URL or NBAGENT_DB_URL" in err
    assert executions(folder) == []


def test_the_dbos_extra_missing_exits_2_naming_the_install_command(
    folder: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = make_notebook(folder, PLAN, start="%nbagent start cli-dbos --cap-usd 1")
    real_import = builtins.__import__

    def no_dbos(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "dbos" or name.startswith("dbos."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dbos)
    monkeypatch.setenv("NBAGENT_ENGINE", "dbos")
    monkeypatch.setenv("NBAGENT_DB_URL", "sqlite:///runs.sqlite")
    assert main(["run", str(nb)]) == 2
    err = capsys.readouterr().err
    assert "running on DBOS needs the DBOS extra" in err
    assert "pip install 'nbagent[dbos]'" in err
    assert executions(folder) == []


# -- on PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_step_then_rerun_executes_only_unfinished_steps(
    folder: Path,
    pg_url: str,  # noqa: F811
    capsys: Any,
) -> None:
    nb = make_notebook(folder, PLAN, CHARGE, ANSWER, start="%nbagent start cli-dbos --cap-usd 1")
    assert main(["export", str(nb), "-o", "agent.py"]) == 0
    command = [sys.executable, "-m", "nbagent", "run", "agent.py", "--engine", "dbos"]
    first = subprocess.Popen(
        [*command, "--db", pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 90
    while not (folder / "marker").exists():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "the step 'charge' never started"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert executions(folder) == ["plan", "charge", "email"]
    spend_before = _counter(pg_url, "cli-dbos", "spend_nusd")
    assert spend_before > 0  # the plan's LLM call, paid before the crash
    status = "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'nbagent:cli-dbos'"
    assert _sql(pg_url, status) == [("PENDING",)]

    # the same command again (the URL from the environment this time): DBOS recovers the run
    (folder / "resume").touch()
    second = nbagent_cli("run", "agent.py", "--engine", "dbos", env={"NBAGENT_DB_URL": pg_url})
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert "workflow nbagent:cli-dbos of run 'cli-dbos' did not finish; DBOS recovers it" in out
    assert "↺ replayed step 'plan' from disk" in out and "▶ plan" not in out
    assert "▶ charge" in out and "▶ answer" in out and "ANSWER " in out
    assert "run 'cli-dbos': 3 steps stored (2 executed, 1 replayed now) · 2 LLM calls" in out
    # only the unfinished steps executed; the email (nbagent.once) was not sent again
    assert executions(folder) == ["plan", "charge", "email", "charge", "answer"]
    # spend was not reset: the plan's call plus the answer's
    spend_after = _counter(pg_url, "cli-dbos", "spend_nusd")
    assert spend_after > spend_before
    assert _counter(pg_url, "cli-dbos", "llm_calls") == 2
    # one workflow, recovered (not a new one), its steps recorded by DBOS
    rows = _sql(pg_url, "SELECT workflow_uuid, status FROM dbos.workflow_status ORDER BY 1")
    assert rows == [("nbagent:cli-dbos", "SUCCESS")]
    steps = _sql(
        pg_url,
        "SELECT function_name FROM dbos.operation_outputs "
        "WHERE workflow_uuid = 'nbagent:cli-dbos' ORDER BY function_id",
    )
    assert [s[0] for s in steps] == ["plan", "charge", "answer"]

    # runs, show and trace read the run from the database
    assert main(["runs", "--db", pg_url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:3] == ["cli-dbos", "3", "2"]
    assert main(["show", "cli-dbos", "--db", pg_url]) == 0
    shown = capsys.readouterr().out
    assert "plan#1" in shown and "charge#1" in shown and "answer#1" in shown
    assert main(["trace", "cli-dbos", "--db", pg_url, "--format", "jsonl"]) == 0
    rows_ = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    llm = [r for r in rows_ if r["kind"] == "llm"]
    assert [r["step"] for r in llm] == ["plan#1", "answer#1"]
    effects = [(r["name"], r["status"]) for r in rows_ if r["kind"] == "effect"]
    assert effects == [("email", "ok"), ("email", "replayed")]
    assert main(["trace", "cli-dbos", "--db", pg_url]) == 0
    assert "charge#1" in capsys.readouterr().out

    # a finished run run again: a new workflow generation, every step replayed
    third = nbagent_cli("run", "agent.py", "--db", pg_url)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "ran before (workflow nbagent:cli-dbos, SUCCESS)" in third.stdout
    assert third.stdout.count("↺ replayed step") == 3 and "▶" not in third.stdout
    assert executions(folder) == ["plan", "charge", "email", "charge", "answer"]
    assert _counter(pg_url, "cli-dbos", "spend_nusd") == spend_after


@pytest.mark.slow
def test_exit_codes_on_dbos_a_failed_step_a_cap_and_a_notebook_run_directly(
    folder: Path,
    pg_url: str,  # noqa: F811
) -> None:
    env = {"NBAGENT_ENGINE": "dbos", "NBAGENT_DB_URL": pg_url}
    boom = '%%step boom\nexecuted("boom")\nraise ValueError("no answer")'
    nb = make_notebook(folder, PLAN, boom, start="%nbagent start failing --cap-usd 1")
    failed = nbagent_cli("run", str(nb), env=env)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "✗ boom failed: ValueError: no answer" in failed.stdout
    assert 'raise ValueError("no answer")' in failed.stderr  # the notebook's own line

    nb = make_notebook(folder, PLAN, ANSWER, start="%nbagent start capped --max-steps 1")
    capped = nbagent_cli("run", str(nb), env=env)
    assert capped.returncode == 3, capped.stderr[-3000:]
    assert "⛔ cap steps: refused" in capped.stdout
    assert "✗ stopped by a cap: step cap reached" in capped.stdout
    assert executions(folder) == ["plan", "boom", "plan"]
    rows = _sql(pg_url, "SELECT workflow_uuid, status FROM dbos.workflow_status ORDER BY 1")
    assert rows == [("nbagent:capped", "ERROR"), ("nbagent:failing", "ERROR")]


def test_a_program_without_one_module_level_run_is_refused_on_dbos(
    folder: Path, capsys: Any
) -> None:
    """Checked before anything runs on the database (a SQLite file: no server needed)."""
    (folder / "two.py").write_text(
        "import nbagent\n\n"
        "a = nbagent.Run('a')\n"
        "b = nbagent.Run('b')\n\n"
        "if __name__ == '__main__':\n"
        "    print('never')\n"
    )
    code = main(["run", "two.py", "--db", "sqlite:///runs.sqlite"])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "opens 2 ('a', 'b')" in captured.err
    assert "never" not in captured.out


def test_from_nbagent_import_run_also_runs_on_dbos_on_sqlite(folder: Path) -> None:
    """``from nbagent import Run`` (not only ``nbagent.Run``) makes the run's steps DBOS steps."""
    import sqlite3

    (folder / "agent.py").write_text(
        "from nbagent import Run\n\n"
        "run = Run('imported', max_cost_usd=1)\n\n\n"
        "@run.step('double')\n"
        "def double(x):\n"
        "    return 2 * x\n\n\n"
        "if __name__ == '__main__':\n"
        "    print('result', double(21), type(run).__name__)\n"
    )
    done = nbagent_cli("run", "agent.py", "--db", "sqlite:///runs.sqlite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "result 42 DbosRun" in done.stdout
    with sqlite3.connect(folder / "runs.sqlite") as db:
        steps = db.execute("SELECT workflow_uuid, function_name FROM operation_outputs").fetchall()
    assert steps == [("nbagent:imported", "double")]
