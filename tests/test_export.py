"""``nbagent export``: golden module text, determinism, durable runs of the exported module."""

from __future__ import annotations

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

from nbagent._cli import run_program
from nbagent._export import ExportError, export_notebook, indent_code

SETUP = """\
%load_ext nbagent
%matplotlib inline
!pip install nothing-at-all
import os
from pathlib import Path

GOAL = "why is the sky blue"
N = 3
LOG = Path(os.environ.get("AGENT_LOG", "executions.log"))


def ask_llm(prompt):
    return f"answer to {prompt}"


def executed(step):
    with LOG.open("a") as f:
        f.write(step + "\\n")"""

PLAN = """\
%%step plan --retries 2 --timeout 30
executed("plan")
plan = [f"{GOAL} (part {i})" for i in range(N)]
findings = []  # research appends here
print("planned", len(plan))"""

RESEARCH = """\
%%step research
executed("research")
for q in plan:
    findings.append(ask_llm(q))"""

REPORT = """\
%%step report --save report
executed("report")
report = "\\n".join(findings)"""

GOLDEN = '''\
"""Research agent

Plans, researches and writes a report.

Exported from research.ipynb by `nbagent export`. Each `%%step` cell is a durable step:
run this module again after a crash and completed steps replay from disk.
"""

import nbagent

# dropped: %load_ext nbagent (notebook-only)
# dropped: %matplotlib inline (notebook-only)
# dropped: !pip install nothing-at-all (notebook-only)
import os
from pathlib import Path

GOAL = "why is the sky blue"
N = 3
LOG = Path(os.environ.get("AGENT_LOG", "executions.log"))


def ask_llm(prompt):
    return f"answer to {prompt}"


def executed(step):
    with LOG.open("a") as f:
        f.write(step + "\\n")

run = nbagent.Run("research-1", max_cost_usd=1.5, max_steps=20, max_llm_calls=30)


@nbagent.cell_step(run, "plan", retries=2, timeout=30)
def plan_step():
    """Plan

    Split the goal into sub-questions.
    """
    global findings, plan
    executed("plan")
    plan = [f"{GOAL} (part {i})" for i in range(N)]
    findings = []  # research appends here
    print("planned", len(plan))


@nbagent.cell_step(run, "research")
def research():
    global q
    executed("research")
    for q in plan:
        findings.append(ask_llm(q))


@nbagent.cell_step(run, "report", save=["report"])
def report_step():
    """Write the report from the findings."""
    global report
    executed("report")
    report = "\\n".join(findings)


def main():
    plan_step()
    research()
    report_step()

    # dropped: a %%bash cell (notebook-only)

    # dropped: %%time (notebook-only)
    print(report)
    print(run.status())


if __name__ == "__main__":
    main()
'''


def research_notebook(*cells: Any) -> Any:
    nb = new_notebook()
    nb.cells = list(cells) or [
        new_markdown_cell("# Research agent\n\nPlans, researches and writes a report."),
        new_code_cell(SETUP),
        new_code_cell("%nbagent start research-1 --cap-usd 1.50 --max-steps 20 --max-llm-calls 30"),
        new_markdown_cell("## Plan\nSplit the goal into sub-questions."),
        new_code_cell(PLAN),
        new_code_cell(RESEARCH),
        new_markdown_cell("Write the report from the findings."),
        new_code_cell(REPORT),
        new_code_cell("%%bash\necho hello"),
        new_code_cell("%%time\nprint(report)\n%nbagent status"),
    ]
    return nb


def write(nb: Any, path: Path) -> Path:
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    return write(research_notebook(), tmp_path / "research.ipynb")


# -- the module text -----------------------------------------------------------------------


def test_export_reads_like_hand_written_code(notebook: Path) -> None:
    assert export_notebook(notebook) == GOLDEN


def test_reexport_is_byte_identical_even_after_the_notebook_ran(
    notebook: Path, tmp_path: Path
) -> None:
    first = export_notebook(notebook)
    assert export_notebook(notebook) == first
    nb = nbformat.read(notebook, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.execution_count = i + 7
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"out {i}\n")]
    ran = write(nb, tmp_path / "elsewhere.ipynb")
    assert export_notebook(ran) == first.replace("research.ipynb", "elsewhere.ipynb")


def test_step_name_that_is_also_a_variable_gets_a_distinct_function_name(tmp_path: Path) -> None:
    nb = research_notebook(
        new_code_cell("%%step plan\nplan = [1, 2]"),
        new_code_cell("%%step double-it\nplan = plan * 2"),
    )
    module = export_notebook(write(nb, tmp_path / "x.ipynb"))
    assert "def plan_step():\n    global plan\n    plan = [1, 2]" in module
    assert '@nbagent.cell_step(run, "double-it")\ndef double_it():' in module
    assert 'run = nbagent.Run("x")' in module  # no %nbagent start: the notebook's name


def test_top_level_await_makes_an_async_step(tmp_path: Path) -> None:
    nb = research_notebook(
        new_code_cell("import asyncio"),
        new_code_cell("%%step wait\nawait asyncio.sleep(0)\ndone = True"),
    )
    module = export_notebook(write(nb, tmp_path / "a.ipynb"))
    assert "async def wait():\n    global done\n    await asyncio.sleep(0)" in module


def test_multiline_strings_are_not_reindented() -> None:
    code = 'text = """a\n  b\nc"""\nif text:\n    x = 1'
    assert indent_code(code) == '    text = """a\n  b\nc"""\n    if text:\n        x = 1'


# -- bad input -----------------------------------------------------------------------------


def test_notebook_without_steps_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    path = write(research_notebook(new_code_cell("x = 1")), tmp_path / "plain.ipynb")
    with pytest.raises(ExportError, match=r"no `%%step` cells.*`%%step NAME` as their first line"):
        export_notebook(path)


def test_syntax_error_names_the_cell_and_its_line(tmp_path: Path) -> None:
    nb = research_notebook(
        new_markdown_cell("intro"),
        new_code_cell("x = 1"),
        new_code_cell("%%step plan\ny = 2\nz = (3 +\n"),
    )
    with pytest.raises(
        ExportError, match=r"(?s)cell 3 \(step 'plan'\), line 3: .*z = \(3 \+\nFix the cell"
    ):
        export_notebook(write(nb, tmp_path / "bad.ipynb"))


def test_syntax_error_in_a_setup_cell(tmp_path: Path) -> None:
    nb = research_notebook(
        new_code_cell("%matplotlib inline\nx = = 1"), new_code_cell("%%step s\n1")
    )
    with pytest.raises(ExportError, match=r"^cell 1, line 2: invalid syntax"):
        export_notebook(write(nb, tmp_path / "bad.ipynb"))


def test_a_file_that_is_not_a_notebook(tmp_path: Path) -> None:
    path = tmp_path / "agent.ipynb"
    path.write_text("print('hello')\n")
    with pytest.raises(ExportError, match=r"is not a Jupyter notebook .*Pass an .ipynb file"):
        export_notebook(path)
    with pytest.raises(ExportError, match="no such file"):
        export_notebook(tmp_path / "missing.ipynb")


def test_duplicate_step_names(tmp_path: Path) -> None:
    nb = research_notebook(new_code_cell("%%step a\nx = 1"), new_code_cell("%%step a\ny = 1"))
    with pytest.raises(ExportError, match=r"cell 2: step name 'a' is already used by cell 1"):
        export_notebook(write(nb, tmp_path / "dup.ipynb"))


def test_a_step_cell_repeated_unchanged_is_a_replay_and_the_run_line_has_its_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The quickstart lesson's shape: `%nbagent start` before `import nbagent`, and the
    `plan` cell shown again to demonstrate a replay."""
    nb = new_notebook()
    nb.cells = [
        new_code_cell("%load_ext nbagent\n%nbagent start again --cap-usd 1"),
        new_code_cell("import nbagent\n\nGOAL = 'x'"),
        new_code_cell("%%step plan\nplan = [GOAL]\nprint(plan)"),
        new_markdown_cell("Run the same cell again: a replay."),
        new_code_cell("%%step plan\nplan = [GOAL]\nprint(plan)"),
    ]
    path = write(nb, tmp_path / "again.ipynb")
    source = export_notebook(path)
    assert source.index("import nbagent\n") < source.index('nbagent.Run("again"')
    assert source.count("@nbagent.cell_step") == 1
    assert "# (cell 5 repeats step 'plan' unchanged: in the notebook, a replay from disk)" in source
    assert "Run the same cell again" not in source
    monkeypatch.chdir(tmp_path)
    assert run_program(str(path)) == 0
    assert "['x']" in capsys.readouterr().out
    nb.cells[4] = new_code_cell("%%step plan --retries 1\nplan = [GOAL]\nprint(plan)")
    with pytest.raises(ExportError, match=r"cell 5: step name 'plan' is already used by cell 3"):
        export_notebook(write(nb, path))


def test_bad_step_options_and_captured_shell_output(tmp_path: Path) -> None:
    nb = research_notebook(new_code_cell("%%step a --retries many\nx = 1"))
    with pytest.raises(ExportError, match=r"cell 1: cannot read `%%step a --retries many`"):
        export_notebook(write(nb, tmp_path / "opts.ipynb"))
    nb = research_notebook(new_code_cell("%%step a\nfiles = !ls\nx = 1"))
    with pytest.raises(ExportError, match=r"cell 1 \(step 'a'\), line 2: `files = !ls` captures"):
        export_notebook(write(nb, tmp_path / "bang.ipynb"))


# -- running the exported module -------------------------------------------------------------


def executions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_exported_module_replays_completed_steps(
    notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    log = tmp_path / "executions.log"
    monkeypatch.setenv("AGENT_LOG", str(log))
    assert run_program(str(notebook)) == 0
    first = capsys.readouterr().out
    assert executions(log) == ["plan", "research", "report"]
    assert "why is the sky blue (part 2)" in first and "planned 3" in first

    assert run_program(str(notebook)) == 0
    second = capsys.readouterr().out
    assert executions(log) == ["plan", "research", "report"]  # nothing ran again
    assert second.count("↺ replayed step") == 3
    assert "answer to why is the sky blue (part 2)" in second  # findings and report restored


def test_a_changed_constant_reruns_only_the_steps_that_read_it(
    notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    log = tmp_path / "executions.log"
    monkeypatch.setenv("AGENT_LOG", str(log))
    assert run_program(str(notebook)) == 0
    assert run_program(str(notebook), params={"N": "2"}) == 0
    out = capsys.readouterr().out
    assert "▶ plan (runs again: input `N` changed)" in out
    # plan changed `plan` and `findings`, so research and report are downstream of it
    assert executions(log) == ["plan", "research", "report"] * 2


def test_a_run_started_in_the_notebook_resumes_in_the_exported_module(
    ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    log = tmp_path / "executions.log"
    monkeypatch.setenv("AGENT_LOG", str(log))
    nb = research_notebook()
    path = write(nb, tmp_path / "research.ipynb")
    for cell in nb.cells[:8]:
        if cell.cell_type == "code":
            code = "\n".join(
                line for line in cell.source.splitlines() if not line.startswith(("%mat", "!"))
            )
            assert ip.run_cell(code).success
    assert executions(log) == ["plan", "research", "report"]
    capsys.readouterr()
    assert run_program(str(path)) == 0
    assert executions(log) == ["plan", "research", "report"]
    assert capsys.readouterr().out.count("↺ replayed step") == 3


def _agent(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An exported agent whose middle step writes a marker, then sleeps the first time."""
    slow = """\
%%step research
executed("research")
if not MARKER.exists():
    MARKER.write_text("in research")
    time.sleep(60)
findings = [ask_llm(q) for q in plan]"""
    nb = research_notebook(
        new_code_cell(SETUP.replace("import os", "import os\nimport time")),
        new_code_cell('MARKER = Path(os.environ["AGENT_MARKER"])'),
        new_code_cell("%nbagent start crashy --cap-usd 1"),
        new_code_cell(PLAN),
        new_code_cell(slow),
        new_code_cell(REPORT),
        new_code_cell("print(report)"),
    )
    agent = tmp_path / "agent.py"
    agent.write_text(export_notebook(write(nb, tmp_path / "crashy.ipynb")))
    env = {
        **os.environ,
        "AGENT_LOG": str(tmp_path / "executions.log"),
        "AGENT_MARKER": str(tmp_path / "marker"),
        "NBAGENT_DIR": str(tmp_path / "store"),
        "NBAGENT_KEY_DIR": str(tmp_path / "keys"),
    }
    return agent, env


@pytest.mark.slow
def test_python_agent_py_runs(tmp_path: Path) -> None:
    agent, env = _agent(tmp_path)
    (tmp_path / "marker").write_text("no sleep")
    done = subprocess.run(
        [sys.executable, str(agent)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "answer to why is the sky blue (part 0)" in done.stdout
    assert executions(tmp_path / "executions.log") == ["plan", "research", "report"]


@pytest.mark.slow
def test_sigkill_mid_step_then_rerun_executes_only_the_unfinished_steps(tmp_path: Path) -> None:
    agent, env = _agent(tmp_path)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, str(agent)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = tmp_path / "executions.log"
    assert executions(log) == ["plan", "research"]

    again = subprocess.run(
        [sys.executable, str(agent)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    # plan completed before the kill: replayed; research was interrupted: runs again
    assert executions(log) == ["plan", "research", "research", "report"]
    assert "↺ replayed step 'plan'" in again.stdout
    assert "answer to why is the sky blue (part 2)" in again.stdout

    third = subprocess.run(
        [sys.executable, "-m", "nbagent", "run", str(agent)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0, third.stderr
    assert executions(log) == ["plan", "research", "research", "report"]
    assert third.stdout.count("↺ replayed step") == 3
