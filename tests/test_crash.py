"""The acceptance test of durable steps, with real kernels (nbclient).

A small agent notebook runs; the kernel is SIGKILLed inside a step; a fresh
kernel re-runs every cell. Completed steps must replay (not execute: each
step appends its name to a side-effect file), the interrupted step must run
again, and variables and printed output must equal a clean run's, including
an in-place mutation of an earlier list.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernels import install_kernelspec
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

pytestmark = pytest.mark.slow

KERNEL = "nbagent-test-venv"
MARKER = "↺ replayed step"
STATUS = re.compile(r"^(✓|▶|↺) step '")

SETUP = """\
import json, os, time
LOG = os.environ["NBAGENT_TEST_LOG"]
HANG = os.environ["NBAGENT_TEST_HANG"]
ENTERED = os.environ["NBAGENT_TEST_ENTERED"]

def effect(name):
    with open(LOG, "a") as f:
        f.write(name + "\\n")

findings = []
"""

PLAN = """\
%%step plan
effect("plan")
plan = ["alpha", "beta", "gamma"]
print("plan:", plan)
"""

RESEARCH = """\
%%step research
effect("research")
for topic in plan:
    findings.append(topic.upper())  # in place: `findings` was made by a setup cell
print("found", len(findings))
"""

SLOW = """\
%%step summarize
effect("summarize")
if os.path.exists(HANG):  # the first run hangs here until the test kills the kernel
    with open(ENTERED, "w") as f:
        f.write("entered")
    time.sleep(30)
summary = f"{len(findings)} findings: {', '.join(findings)}"
print(summary)
summary
"""

REPORT = """\
%%step report
effect("report")
report = {"summary": summary, "n": len(findings)}
print("report ready")
"""

FINAL = (
    'print(json.dumps({"plan": plan, "findings": findings, "summary": summary, "report": report}))'
)

STEP_CELLS = {3: "plan", 4: "research", 5: "summarize", 6: "report"}


def make_notebook(plan: str = PLAN, research: str = RESEARCH) -> Any:
    cells = [
        "%load_ext nbagent",
        "%nbagent start crash-test --no-dashboard",
        SETUP,
        plan,
        research,
        SLOW,
        REPORT,
        FINAL,
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    for i, c in enumerate(nb.cells):
        c.id = f"cell-{i}"
    return nb


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A kernelspec for this interpreter, and the files the notebook's steps use."""
    install_kernelspec(tmp_path, monkeypatch, KERNEL, "nbagent tests")
    files = {
        "log": tmp_path / "effects.log",
        "hang": tmp_path / "hang",
        "entered": tmp_path / "entered",
        "work": tmp_path / "work",
    }
    files["work"].mkdir()
    monkeypatch.setenv("NBAGENT_TEST_LOG", str(files["log"]))
    monkeypatch.setenv("NBAGENT_TEST_HANG", str(files["hang"]))
    monkeypatch.setenv("NBAGENT_TEST_ENTERED", str(files["entered"]))
    return files


def use_store(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv("NBAGENT_DIR", str(path))


def client_for(nb: Any, work: Path) -> NotebookClient:
    return NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=60,
        startup_timeout=60,
        resources={"metadata": {"path": str(work)}},
    )


async def run_all(nb: Any, work: Path) -> Any:
    client = client_for(nb, work)
    async with client.async_setup_kernel():
        for i, c in enumerate(nb.cells):
            await client.async_execute_cell(c, i)
            errors = [o for o in c.outputs if o.output_type == "error"]
            assert not errors, f"cell {i} failed: {errors[0].ename}: {errors[0].evalue}"
    return nb


async def run_until_killed(nb: Any, work: Path, kill_in: int, entered: Path) -> None:
    """Run cells in order; SIGKILL the kernel once cell ``kill_in`` signals it is inside."""
    client = client_for(nb, work)
    async with client.async_setup_kernel():
        for i, c in enumerate(nb.cells[:kill_in]):
            await client.async_execute_cell(c, i)
        task = asyncio.ensure_future(client.async_execute_cell(nb.cells[kill_in], kill_in))
        deadline = time.monotonic() + 30
        while not entered.exists():
            assert time.monotonic() < deadline, "the slow step never started"
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)
        os.kill(client.km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        with pytest.raises(DeadKernelError):
            await task


def stdout_of(c: Any) -> str:
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def user_stdout(c: Any) -> str:
    """What the cell's own code printed: without nbagent's status lines (they carry timings)."""
    return "".join(
        line for line in stdout_of(c).splitlines(keepends=True) if not STATUS.match(line)
    )


def results_of(c: Any) -> list[str]:
    return [o.data["text/plain"] for o in c.outputs if o.output_type == "execute_result"]


def replayed(c: Any) -> bool:
    return any(
        o.output_type == "display_data" and MARKER in o.data.get("text/plain", "")
        for o in c.outputs
    )


def effects(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_sigkill_inside_a_step_then_rerun_replays_completed_steps(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a clean run in its own store: the reference
    use_store(monkeypatch, tmp_path / "clean-store")
    clean = asyncio.run(run_all(make_notebook(), env["work"]))
    assert effects(env["log"]) == ["plan", "research", "summarize", "report"]
    env["log"].unlink()

    # the crash: the kernel dies inside `summarize`
    use_store(monkeypatch, tmp_path / "store")
    env["hang"].touch()
    asyncio.run(run_until_killed(make_notebook(), env["work"], 5, env["entered"]))
    assert effects(env["log"]) == ["plan", "research", "summarize"]
    env["hang"].unlink()

    # a fresh kernel re-runs every cell
    rerun = asyncio.run(run_all(make_notebook(), env["work"]))
    assert effects(env["log"]) == ["plan", "research", "summarize", "summarize", "report"]
    assert "resumed run 'crash-test' · 2 completed steps" in stdout_of(rerun.cells[1])
    assert json.loads(stdout_of(rerun.cells[7])) == json.loads(stdout_of(clean.cells[7]))
    final = json.loads(stdout_of(rerun.cells[7]))
    assert final["findings"] == ["ALPHA", "BETA", "GAMMA"]  # the in-place mutation came back
    for i, name in STEP_CELLS.items():
        assert user_stdout(rerun.cells[i]) == user_stdout(clean.cells[i]), name
        assert results_of(rerun.cells[i]) == results_of(clean.cells[i]), name
        assert replayed(rerun.cells[i]) == (name in ("plan", "research")), name
        assert not replayed(clean.cells[i])
    assert results_of(rerun.cells[5]) == ["'3 findings: ALPHA, BETA, GAMMA'"]
    assert user_stdout(clean.cells[4]) == "found 3\n"

    # and once more: everything replays, nothing executes, the same output
    again = asyncio.run(run_all(make_notebook(), env["work"]))
    assert effects(env["log"]) == ["plan", "research", "summarize", "summarize", "report"]
    assert stdout_of(again.cells[7]) == stdout_of(clean.cells[7])
    for i, name in STEP_CELLS.items():
        assert replayed(again.cells[i]), name
        assert user_stdout(again.cells[i]) == user_stdout(clean.cells[i]), name
        assert results_of(again.cells[i]) == results_of(clean.cells[i]), name


def test_edits_in_a_new_kernel(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_store(monkeypatch, tmp_path / "store")
    asyncio.run(run_all(make_notebook(), env["work"]))
    assert effects(env["log"]) == ["plan", "research", "summarize", "report"]

    # comment-only and spacing edits: everything replays
    commented = PLAN.replace('effect("plan")', '# make the plan\neffect( "plan" )  # counted')
    nb = asyncio.run(run_all(make_notebook(plan=commented), env["work"]))
    assert effects(env["log"]) == ["plan", "research", "summarize", "report"]
    assert all(replayed(nb.cells[i]) for i in STEP_CELLS)

    # a code edit: that step and the steps whose inputs it changes execute again
    edited = RESEARCH.replace("topic.upper()", "topic.title()")
    nb = asyncio.run(run_all(make_notebook(plan=commented, research=edited), env["work"]))
    assert effects(env["log"])[4:] == ["research", "summarize", "report"]
    assert replayed(nb.cells[3]) and not any(replayed(nb.cells[i]) for i in (4, 5, 6))
    assert "▶ step 'research' runs again: source changed" in stdout_of(nb.cells[4])
    assert "▶ step 'summarize' runs again: input `findings` changed" in stdout_of(nb.cells[5])
    assert "▶ step 'report' runs again: inputs `findings`, `summary` changed" in stdout_of(
        nb.cells[6]
    )
    final = json.loads(stdout_of(nb.cells[7]))
    assert final["findings"] == ["Alpha", "Beta", "Gamma"]
    assert final["report"] == {"summary": "3 findings: Alpha, Beta, Gamma", "n": 3}
