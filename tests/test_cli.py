"""The ``nbagent`` command: export, run (progress, exit codes, resume), runs/show/trace/gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from nbagent import Run
from nbagent._cli import main
from nbagent._export import export_notebook

SETUP = """\
from pathlib import Path

GOAL = "why is the sky blue"
ROUNDS = 2
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()


def executed(step):
    with (HERE / "executions.log").open("a") as f:
        f.write(step + "\\n")"""


def make_notebook(
    folder: Path, *steps: str, start: str = "%nbagent start cli-run --cap-usd 1"
) -> Path:
    nb = new_notebook()
    nb.cells = [new_code_cell(SETUP), new_code_cell(start), *map(new_code_cell, steps)]
    path = folder / "agent.ipynb"
    nbformat.write(nb, path)
    return path


PLAN = '%%step plan\nexecuted("plan")\nplan = [GOAL + "?"] * ROUNDS'
ANSWER = '%%step answer\nexecuted("answer")\nanswer = " ".join(plan)\nprint(answer)'


def executions(folder: Path) -> list[str]:
    log = folder / "executions.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder of the notebook; the store is the conftest's NBAGENT_DIR."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")
    return work


# -- help and export -----------------------------------------------------------------------


def test_help_lists_the_commands(capsys: Any) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: nbagent" in out
    for command in ("export", "run", "demo", "runs", "show", "trace", "gc"):
        assert command in out
    assert main(["run", "--help"]) == 0
    assert "-p KEY=VALUE replaces the value of a module-level constant" in " ".join(
        capsys.readouterr().out.split()
    )


def test_usage_errors_exit_2(capsys: Any) -> None:
    assert main([]) == 2
    assert main(["gc", "--older-than", "soon"]) == 2
    assert "not an age" in capsys.readouterr().err


def test_export_to_a_file_and_to_stdout(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, ANSWER)
    assert main(["export", str(nb), "-o", "agent.py"]) == 0
    assert (folder / "agent.py").read_text() == export_notebook(nb)
    assert main(["export", str(nb)]) == 0
    assert capsys.readouterr().out == export_notebook(nb)


def test_export_bad_input_names_the_fix_and_exits_2(folder: Path, capsys: Any) -> None:
    plain = make_notebook(folder)
    assert main(["export", str(plain)]) == 2
    assert "has no `%%step` cells" in capsys.readouterr().err
    (folder / "notes.ipynb").write_text("{not json")
    assert main(["export", "notes.ipynb"]) == 2
    assert "is not a Jupyter notebook" in capsys.readouterr().err
    bad = make_notebook(folder, "%%step plan\nplan = [", start="x = 1")
    assert main(["export", str(bad)]) == 2
    assert "cell 3 (step 'plan'), line 2:" in capsys.readouterr().err


# -- run -----------------------------------------------------------------------------------


def test_run_shows_progress_and_a_second_run_replays(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, ANSWER)
    assert main(["run", str(nb)]) == 0
    out = capsys.readouterr().out
    assert "▶ plan\n✓ plan " in out
    assert "· 0 calls · $0.00 · spend $0.00 / $1.00" in out
    assert "why is the sky blue? why is the sky blue?" in out
    assert "run 'cli-run': 2 steps stored (2 executed, 0 replayed now)" in out

    assert main(["run", str(nb)]) == 0
    out = capsys.readouterr().out
    assert executions(folder) == ["plan", "answer"]
    assert "↺ replayed step 'plan' from disk" in out and "▶" not in out
    assert "why is the sky blue? why is the sky blue?" in out  # recorded output shown again


def test_run_parameters_and_run_name(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, ANSWER)
    assert main(["run", str(nb)]) == 0
    assert main(["run", str(nb), "-p", "ROUNDS=3", "-p", "GOAL=what is rain"]) == 0
    out = capsys.readouterr().out
    assert "▶ plan (runs again: inputs `GOAL`, `ROUNDS` changed)" in out
    assert "what is rain? what is rain? what is rain?" in out
    assert main(["run", str(nb), "--run", "second"]) == 0
    assert "run 'second': 2 steps stored" in capsys.readouterr().out
    assert main(["runs"]) == 0
    listed = capsys.readouterr().out
    assert "cli-run" in listed and "second" in listed


def test_run_bad_parameters_and_files_exit_2(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN)
    assert main(["run", str(nb), "-p", "NOPE=1"]) == 2
    assert "no module-level constant 'NOPE' to override (constants: GOAL, ROUNDS)" in (
        capsys.readouterr().err
    )
    assert main(["run", str(nb), "-p", "ROUNDS=many"]) == 2
    assert "ROUNDS is a int; give a Python literal like 2" in capsys.readouterr().err
    assert main(["run", "missing.ipynb"]) == 2
    (folder / "notes.txt").write_text("hi")
    assert main(["run", "notes.txt"]) == 2
    assert "expected a .ipynb notebook or a .py module" in capsys.readouterr().err


def test_a_failed_step_exits_1_with_the_reason_and_its_traceback(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, '%%step boom\nraise ValueError("no answer")')
    assert main(["run", str(nb)]) == 1
    captured = capsys.readouterr()
    assert "✗ boom failed: ValueError: no answer" in captured.out
    assert 'raise ValueError("no answer")' in captured.err  # the module's own line
    assert "nbagent/_cli.py" not in captured.err


def test_a_cap_exits_3_and_a_stopped_run_exits_4(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, ANSWER, start="%nbagent start capped --max-steps 1")
    assert main(["run", str(nb)]) == 3
    out = capsys.readouterr().out
    assert "⛔ cap steps: refused" in out and "✗ stopped by a cap: step cap reached" in out

    Run("paused", max_cost_usd=1).stop("paused by the on-call engineer")
    nb = make_notebook(folder, PLAN, start="%nbagent start paused")
    assert main(["run", str(nb)]) == 4
    assert "paused by the on-call engineer" in capsys.readouterr().out


def test_ctrl_c_exits_130_and_leaves_the_run_resumable(folder: Path, capsys: Any) -> None:
    interrupt = (
        '%%step answer\nexecuted("answer")\n'
        'if (HERE / "interrupt").exists():\n    raise KeyboardInterrupt\nanswer = plan[0]'
    )
    (folder / "interrupt").touch()
    nb = make_notebook(folder, PLAN, interrupt)
    assert main(["run", str(nb)]) == 130
    assert "interrupted — the run is resumable" in capsys.readouterr().out
    (folder / "interrupt").unlink()
    assert main(["run", str(nb)]) == 0
    assert executions(folder) == ["plan", "answer", "answer"]


def test_a_retried_step_prints_when_the_next_attempt_starts(folder: Path, capsys: Any) -> None:
    flaky = (
        "%%step flaky --retries 2\n"
        'executed("flaky")\n'
        'if len((HERE / "executions.log").read_text().split()) < 2:\n'
        '    raise ConnectionError("reset by peer")\n'
        "ok = True"
    )
    nb = make_notebook(folder, flaky)
    assert main(["run", str(nb)]) == 0
    out = capsys.readouterr().out
    assert "↻ flaky attempt 1 failed (ConnectionError: reset by peer); attempt 2 in 0 s" in out
    assert "✓ flaky" in out
    assert executions(folder) == ["flaky", "flaky"]


def test_run_a_python_module(folder: Path, capsys: Any) -> None:
    (folder / "agent.py").write_text(
        "import nbagent\n\n"
        "run = nbagent.Run('py-run', max_cost_usd=2)\n\n"
        "@run.step('double')\n"
        "def double(x):\n"
        "    return 2 * x\n\n"
        "if __name__ == '__main__':\n"
        "    print('result', double(21))\n"
    )
    assert main(["run", "agent.py"]) == 0
    out = capsys.readouterr().out
    assert "▶ double\n✓ double" in out and "result 42" in out
    assert main(["run", "agent.py", "--run", "py-run-2"]) == 0
    assert "run 'py-run-2'" in capsys.readouterr().out


def test_progress_follows_a_run_opened_inside_main(folder: Path, capsys: Any) -> None:
    (folder / "agent.py").write_text(
        "import nbagent\n\n"
        "def main():\n"
        "    run = nbagent.Run('inner-run')\n"
        "    double = run.step('double')(lambda x: 2 * x)\n"
        "    print('result', double(21))\n\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    assert main(["run", "agent.py"]) == 0
    out = capsys.readouterr().out
    assert "▶ double" in out and "✓ double" in out and "result 42" in out


# -- runs, show, trace, gc ---------------------------------------------------------------------


def test_runs_show_and_trace(folder: Path, capsys: Any) -> None:
    assert main(["runs", "--store", str(folder / "nowhere")]) == 2
    assert "no nbagent store at" in capsys.readouterr().err
    nb = make_notebook(folder, PLAN, ANSWER)
    assert main(["run", str(nb)]) == 0
    capsys.readouterr()

    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["RUN", "STEPS", "LLM", "CALLS", "SPEND", "CAP"] + [
        "LAST",
        "ACTIVITY",
        "STATUS",
    ]
    assert out.splitlines()[1].split()[:5] == ["cli-run", "2", "0", "$0.00", "$1.00"]

    assert main(["show", "cli-run"]) == 0
    out = capsys.readouterr().out
    assert "spend $0.00 / $1.00" in out and "plan#1" in out and "answer#1" in out
    assert main(["show", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err

    assert main(["trace", "cli-run"]) == 0
    assert "plan#1" in capsys.readouterr().out
    assert main(["trace", "cli-run", "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0].startswith("seq,ts,run,step,kind,name")
    assert any(",plan#1,step,plan," in line for line in csv_lines)
    assert main(["trace", "cli-run", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == ["plan#1", "answer#1"]
    assert main(["trace", "cli-run", "--format", "jsonl", "--last", "1", "-o", "t.jsonl"]) == 0
    assert json.loads((folder / "t.jsonl").read_text())["step"] == "answer#1"


def test_gc_drops_only_runs_older_than_the_age(folder: Path, capsys: Any) -> None:
    nb = make_notebook(folder, PLAN, ANSWER)
    assert main(["run", str(nb)]) == 0
    capsys.readouterr()
    assert main(["gc", "--older-than", "1d"]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert main(["gc", "--older-than", "0s", "--dry-run"]) == 0
    assert "would drop run 'cli-run'" in capsys.readouterr().out
    assert main(["runs"]) == 0
    assert "cli-run" in capsys.readouterr().out

    assert main(["gc", "--older-than", "0s"]) == 0
    assert "dropped run 'cli-run': last activity" in capsys.readouterr().out
    assert main(["runs"]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert main(["trace", "cli-run"]) == 2
    assert main(["run", str(nb)]) == 0  # a dropped run starts over
    assert executions(folder) == ["plan", "answer", "plan", "answer"]


# -- engines -----------------------------------------------------------------------------------


def test_engine_choice_errors_name_the_fix(
    folder: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine and database checks (runs on DBOS: tests/test_cli_dbos.py)."""
    nb = make_notebook(folder, PLAN)
    monkeypatch.delenv("NBAGENT_DB_URL", raising=False)
    assert main(["run", str(nb), "--engine", "dbos"]) == 2
    assert "the dbos engine needs a database: pass --db URL" in capsys.readouterr().err
    monkeypatch.setenv("NBAGENT_ENGINE", "dbos")
    assert main(["runs"]) == 2
    monkeypatch.setenv("NBAGENT_ENGINE", "temporal")
    assert main(["runs"]) == 2
    assert "is not an engine" in capsys.readouterr().err
    monkeypatch.delenv("NBAGENT_ENGINE")
    assert main(["run", str(nb), "--engine", "embedded", "--db", "postgresql://h/x"]) == 2
    assert "--db URL is for --engine dbos" in capsys.readouterr().err
    assert main(["run", str(nb), "--db", "mysql://u:pw@h/x"]) == 2
    assert "neither a PostgreSQL nor a SQLite URL" in capsys.readouterr().err
    assert main(["runs", "--db", "postgresql://h/x", "--store", "s"]) == 2
    assert "Leave out --store" in capsys.readouterr().err
    assert executions(folder) == []


# -- subprocesses ------------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "NBAGENT_DIR": str(tmp_path / "store"),
        "NBAGENT_KEY_DIR": str(tmp_path / "keys"),
    }


@pytest.mark.slow
def test_python_m_nbagent_help(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nbagent", "--help"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    assert "usage: nbagent" in done.stdout and "export" in done.stdout


@pytest.mark.slow
def test_demo_runs_then_replays(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "nbagent", "demo", "--store", str(tmp_path / "demo")]
    env = {k: v for k, v in _env(tmp_path).items() if k != "OPENAI_API_KEY"}  # the simulator
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "✓ plan" in first.stdout and "✓ synthesize" in first.stdout
    # the quickstart agent calls the simulated LLM through nbagent's client: real, capped spend
    assert 'Summary for "crash recovery in long-running LLM agents"' in first.stdout
    assert "5 LLM calls · spend $0.00028 / $0.50" in first.stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("↺ replayed step") == 5 and "▶" not in second.stdout
