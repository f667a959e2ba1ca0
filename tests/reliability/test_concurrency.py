"""Two processes and two kernels on one run and store: a step runs once; the last dollar once.

Races are made deterministic with gate files (a process waits until the test creates one),
plus one free-for-all race of several processes started together.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from relkit import environ, notebook, stdout_of

import nbagent

pytestmark = pytest.mark.slow

RACE = r"""
import os, sys, time
from pathlib import Path
import nbagent
from nbagent import _store

_tag, _gates = sys.argv[1], Path(sys.argv[2])
_wait_before_lock = len(sys.argv) > 3


def _wait_for(name, timeout=60):
    deadline = time.monotonic() + timeout
    while not (_gates / name).exists():
        assert time.monotonic() < deadline, f"{_tag}: {name} never came"
        time.sleep(0.01)


if _wait_before_lock:  # decided "execute", then is slow to take the lock
    begin_step = _store.Store.begin_step

    def slow_begin(self, run, step_id):
        (_gates / f"{_tag}-decided").touch()
        _wait_for("a-done")
        return begin_step(self, run, step_id)

    _store.Store.begin_step = slow_begin

run = nbagent.Run("race")


@run.step("slow")
def slow():
    with open(_gates / "exec.txt", "a") as f:
        f.write(_tag + "\n")
    (_gates / f"{_tag}-entered").touch()
    if (_gates / "hold").exists():
        _wait_for("release")
    time.sleep(float(os.environ.get("RACE_SLEEP", "0")))
    return 42


try:
    print("RESULT", slow(), flush=True)
except nbagent.StepLockedError as e:
    print("LOCKED", e, flush=True)
(_gates / f"{_tag}-done").touch()
"""


def wait_for(path: Path, proc: Any = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.01)


@pytest.fixture
def race(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "race.py"
    script.write_text(RACE)
    gates = tmp_path / "gates"
    gates.mkdir()
    return script, gates


def start(script: Path, gates: Path, tag: str, *extra: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), tag, str(gates), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def executions(gates: Path) -> list[str]:
    p = gates / "exec.txt"
    return p.read_text().split() if p.exists() else []


def test_second_process_is_refused_while_the_first_executes_then_replays(
    race: tuple[Path, Path],
) -> None:
    script, gates = race
    (gates / "hold").touch()
    a = start(script, gates, "a")
    wait_for(gates / "a-entered", a)
    b = subprocess.run(
        [sys.executable, str(script), "b", str(gates)], capture_output=True, text=True, timeout=60
    )
    assert b.returncode == 0, b.stderr
    assert b.stdout.startswith("LOCKED"), b.stdout
    assert "is being executed by process" in b.stdout and str(a.pid) in b.stdout
    (gates / "release").touch()
    out, err = a.communicate(timeout=60)
    assert out.strip() == "RESULT 42", err
    c = subprocess.run(
        [sys.executable, str(script), "c", str(gates)], capture_output=True, text=True, timeout=60
    )
    assert "RESULT 42" in c.stdout and "replayed step 'slow'" in c.stdout, c.stdout + c.stderr
    assert executions(gates) == ["a"]


def test_process_that_decided_to_execute_replays_when_another_committed_first(
    race: tuple[Path, Path],
) -> None:
    """B finds no record and decides to execute; before B takes the lock, A commits.

    B must see A's record once it holds the lock and replay it, not execute the step again.
    """
    script, gates = race
    (gates / "hold").touch()
    a = start(script, gates, "a")
    wait_for(gates / "a-entered", a)
    b = start(script, gates, "b", "slow-lock")
    wait_for(gates / "b-decided", b)
    (gates / "release").touch()
    out_a, err_a = a.communicate(timeout=60)
    assert out_a.strip() == "RESULT 42", err_a
    out_b, err_b = b.communicate(timeout=60)
    assert "RESULT 42" in out_b, err_b
    assert executions(gates) == ["a"], "the step executed twice"


def test_processes_started_together_execute_the_step_once(race: tuple[Path, Path]) -> None:
    script, gates = race
    procs = [start(script, gates, t, RACE_SLEEP="0.5") for t in ("p1", "p2", "p3")]
    outs = [p.communicate(timeout=60) for p in procs]
    for out, err in outs:
        assert out.startswith(("RESULT 42", "LOCKED", "↺ replayed step")), (out, err)
    assert len(executions(gates)) == 1, executions(gates)


MANY = r"""
import os, random, sys, time
from pathlib import Path
import nbagent

tag, folder, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
run = nbagent.Run("many", store=folder / "store")
names = [f"s{i}" for i in range(steps)]
random.Random(tag).shuffle(names)
for name in names:
    while True:
        try:
            ex = run.begin(name, 1, "the same source", {})
        except nbagent.StepLockedError:
            time.sleep(0.0005)  # the other process is executing it: it will be a replay
            continue
        break
    if ex.replay:
        assert ex.load_value("by") is not None
        ex.replayed()
        continue
    with open(folder / "exec.txt", "a") as f:  # one write per line: O_APPEND, whole lines
        f.write(f"{name} {tag}\n")
    ex.commit({"by": tag}, outputs=[], result=None)
print("DONE", run.steps_executed, flush=True)
"""


def test_processes_racing_through_many_steps_execute_each_once(tmp_path: Path) -> None:
    """Three processes run the same 120 steps of one run, each in its own random order:
    every step runs once, and every later begin replays it (a process that knows the run
    begins steps without a read until another process commits; see Store.begin_step)."""
    script = tmp_path / "many.py"
    script.write_text(MANY)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), tag, str(tmp_path), "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p1", "p2", "p3")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("DONE"), (out, err)
    lines = (tmp_path / "exec.txt").read_text().splitlines()
    ran = [line.split()[0] for line in lines]
    twice = [line for line in lines if ran.count(line.split()[0]) > 1]
    assert sorted(ran) == sorted(f"s{i}" for i in range(120)), f"ran twice or never: {twice}"
    assert nbagent.Run("many", store=tmp_path / "store").steps_executed == 120


# -- two kernels -----------------------------------------------------------------------------

KERNEL_CELLS = [
    "%load_ext nbagent",
    "%nbagent start race --no-dashboard",
    "import os, time\nfrom pathlib import Path\nGATES = Path(os.environ['RACE_GATES'])",
    "%%step slow\n"
    "with open(GATES / 'exec.txt', 'a') as f:\n"
    "    f.write(os.environ['RACE_TAG'] + '\\n')\n"
    "(GATES / (os.environ['RACE_TAG'] + '-entered')).touch()\n"
    "while not (GATES / 'release').exists():\n"
    "    time.sleep(0.01)\n"
    "answer = 42\n"
    "print('answer', answer)",
    "print('RESULT', answer)",
]


def test_two_kernels_race_for_one_step(tmp_path: Path, kernelspec: str) -> None:
    from nbclient import NotebookClient

    gates = tmp_path / "gates"
    gates.mkdir()
    work = tmp_path / "work"
    work.mkdir()

    def client(nb: Any) -> NotebookClient:
        return NotebookClient(
            nb,
            kernel_name=kernelspec,
            timeout=60,
            allow_errors=True,
            resources={"metadata": {"path": str(work)}},
        )

    def errors(cell: Any) -> list[str]:
        return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]

    async def go() -> tuple[Any, Any]:
        nb_a, nb_b = notebook(KERNEL_CELLS), notebook(KERNEL_CELLS)
        with environ({**os.environ, "RACE_GATES": str(gates), "RACE_TAG": "a"}):
            ca = client(nb_a)
            async with ca.async_setup_kernel():
                for i in range(3):
                    await ca.async_execute_cell(nb_a.cells[i], i)
                step_a = asyncio.ensure_future(ca.async_execute_cell(nb_a.cells[3], 3))
                deadline = time.monotonic() + 60
                while not (gates / "a-entered").exists():
                    assert time.monotonic() < deadline and not step_a.done()
                    await asyncio.sleep(0.02)
                with environ({**os.environ, "RACE_TAG": "b"}):
                    cb = client(nb_b)
                    async with cb.async_setup_kernel():
                        for i in range(4):
                            await cb.async_execute_cell(nb_b.cells[i], i)
                        locked = errors(nb_b.cells[3])
                        assert locked and locked[0].startswith("StepLockedError"), locked
                        (gates / "release").touch()
                        await step_a
                        await ca.async_execute_cell(nb_a.cells[4], 4)
                        await cb.async_execute_cell(nb_b.cells[3], 3)  # runs the cell again
                        await cb.async_execute_cell(nb_b.cells[4], 4)
        return nb_a, nb_b

    nb_a, nb_b = asyncio.run(go())
    assert not errors(nb_a.cells[3]) and not errors(nb_b.cells[3])
    assert stdout_of(nb_a.cells[4]) == stdout_of(nb_b.cells[4]) == "RESULT 42\n"
    replay = [
        o.data.get("text/plain", "")
        for o in nb_b.cells[3].outputs
        if o.output_type == "display_data"
    ]
    assert any("replayed step 'slow'" in t for t in replay), nb_b.cells[3].outputs
    assert (gates / "exec.txt").read_text().split() == ["a"]


# -- the last dollar -------------------------------------------------------------------------

LAST_DOLLAR = r"""
import sys, time, httpx2, nbagent
from pathlib import Path
from nbagent._client import openai_client
from nbagent._simulator import SimulatedLLM

gates, cap = Path(sys.argv[1]), float(sys.argv[2])

class Slow(httpx2.BaseTransport):
    def handle_request(self, request):
        with open(gates / "requests.txt", "a") as f:
            f.write("x\n")
        time.sleep(1.0)  # the call stays in flight, holding its reservation
        return SimulatedLLM().handle_request(request)

client = openai_client(api_key="sk-test-0000000000", base_url="https://sim.invalid/v1",
                       http_client=httpx2.Client(transport=Slow()))
run = nbagent.Run("dollar", max_cost_usd=cap)
while not (gates / "go").exists():
    time.sleep(0.001)
try:
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=1000,
        messages=[{"role": "user", "content": "the last dollar"}])
    print("OK")
except nbagent.CostCapExceeded as e:
    print("CAP", e)
"""


def test_processes_racing_for_the_last_dollar_make_one_call(tmp_path: Path) -> None:
    from nbagent._client import prompt_bound
    from nbagent._pricing import PriceBook

    book = PriceBook()
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "the last dollar"}],
    }
    worst = book.worst_case("gpt-4o-mini", prompt_bound("chat", body, book), 1000)
    cap = worst * 1.5  # one call fits, two do not
    script = tmp_path / "dollar.py"
    script.write_text(LAST_DOLLAR)
    gates = tmp_path / "gates"
    gates.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(gates), repr(cap)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(2.0)  # all three are waiting at the gate
    (gates / "go").touch()
    outs = [p.communicate(timeout=60) for p in procs]
    words = sorted(out.split()[0] if out else err[-500:] for out, err in outs)
    assert words == ["CAP", "CAP", "OK"], outs
    assert (gates / "requests.txt").read_text().count("x") == 1
    import nbagent

    run = nbagent.Run("dollar")
    assert 0 < run.spend_usd <= cap and run.reserved_usd == 0
