"""Shared pieces of the reliability suite: an agent program, kill points, invariant checks.

The agent is a small program of durable steps with LLM calls (the simulated LLM behind a
transport that appends every request's idempotency key to a file, so several processes
share one request count) and side effects (``nbagent.once`` charging a file-backed
``FakePayments``), under a cost cap. The same program exists twice: a Python script
through ``@run.step`` and a notebook of ``%%step`` cells.

Kill points (``REL_KILL=kind:n``: SIGKILL this process at the n-th event of that kind)::

    llm     the request reached the provider (it is billed), the reply is lost
    ledger  inside the transaction that settles a call and writes its ledger entry
    effect  the charge was made, nbagent has not recorded its outcome yet
    body    a checkpoint inside a step body (after its LLM calls)
    commit  before a step's entry is appended to the step log, or inside a transaction
            that writes step records (a step's commit, or the step log moving into SQLite)

Every kill appends ``kind:n`` to ``REL_KILLED`` first, so the test knows where it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache

KINDS = ("llm", "ledger", "effect", "body", "commit")

#: A fake API key: the security tests grep the disk for it.
SECRET_KEY = "sk-reliability-SECRET-0123456789abcdef"

CAP_USD = 0.05

PRELUDE = r'''
import json, os, sys
import httpx2
import nbagent
from nbagent import _steplog, _store
from nbagent._client import openai_client
from nbagent._simulator import SimulatedLLM

_E = os.environ
_KILL_KIND, _, _KILL_N = _E.get("REL_KILL", "").partition(":")
_SEEN = {}


def point(kind):
    """A kill point: SIGKILL this process at the REL_KILL-th event of its kind."""
    _SEEN[kind] = _SEEN.get(kind, 0) + 1
    if kind == _KILL_KIND and _SEEN[kind] == int(_KILL_N):
        with open(_E["REL_KILLED"], "a") as f:
            f.write(f"{kind}:{_KILL_N}\n")
        os.kill(os.getpid(), 9)


class Counting(httpx2.BaseTransport):
    """The simulated provider; every request that reaches it is counted (billed)."""

    def __init__(self):
        self.sim = SimulatedLLM()

    def handle_request(self, request):
        request.read()
        with open(_E["REL_COUNTS"], "a") as f:
            f.write(request.headers.get("idempotency-key", "?") + "\n")
        point("llm")
        return self.sim.handle_request(request)


_set_record = _store.Store.set_record
_put_many = _store.Store._put_many


def set_record(self, kind, key, value):
    if kind == "llm":
        point("ledger")
    return _set_record(self, kind, key, value)


def put_many(self, items, *args, **kwargs):
    if any(key.startswith("step/") for key in items):  # a step's commit writes its record
        point("commit")
    return _put_many(self, items, *args, **kwargs)


_append = _steplog.StepLog.append


def append(self, rows):
    if any(key.startswith("step/") for key in rows):  # a step's commit (not a settlement)
        point("commit")  # before its entry is in the log
    return _append(self, rows)


_store.Store.set_record = set_record
_store.Store._put_many = put_many
_steplog.StepLog.append = append

client = openai_client(
    api_key=_E.get("REL_API_KEY", "sk-test-key-0000"),
    base_url="https://sim.invalid/v1",
    http_client=httpx2.Client(transport=Counting()),
)
payments = nbagent.FakePayments(path=_E["REL_PAYMENTS"])


def ask(question, max_tokens=40):
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": question}],
    )
    return reply.choices[0].message.content


def charge(key, cents, customer):
    made = payments.charge(cents, "usd", customer, idempotency_key=key)
    point("effect")
    return made.id


def entered():
    """Log that a step body starts executing (not replaying)."""
    with open(_E["REL_EXEC"], "a") as f:
        f.write(_E.get("REL_ATTEMPT", "0") + " " + nbagent.current_step().step_id + "\n")
'''

SCRIPT = (
    PRELUDE
    + r"""
run = nbagent.Run("agent", max_cost_usd=float(_E["REL_CAP"]))


@run.step("plan")
def plan(goal):
    entered()
    items = [ask(f"Question {i} about {goal}?") for i in range(3)]
    point("body")
    return items


@run.step("research")
def research(item):
    entered()
    first = ask(f"Research: {item}")
    point("body")
    return [first, ask(f"Check: {first}")]


@run.step("pay")
def pay(n):
    entered()
    ids = [nbagent.once("charge", charge, 100 + i, f"cust-{i}") for i in range(n)]
    point("body")
    return ids


@run.step("report")
def report(found, ids):
    entered()
    text = ask("Report: " + " | ".join(f[0] for f in found))
    receipt = nbagent.once("email", charge, 1, "mailer")
    point("body")
    return {"report": text, "receipt": receipt, "ids": ids}


items = plan("durable agents")
found = [research(item) for item in items]
ids = pay(2)
final = report(found, ids)
print("RESULT " + json.dumps({"items": items, "found": found, "ids": ids, "final": final}))
"""
)

#: The same program as notebook cells (``%%step``): setup, steps, and a final print.
NOTEBOOK_CELLS = [
    "%load_ext nbagent",
    "%nbagent start agent --no-dashboard --cap-usd {cap}",
    PRELUDE,
    '%%step plan\nentered()\nitems = [ask(f"Question {i} about durable agents?") for i in range(3)]\npoint("body")',
    '%%step research\nentered()\nfound = []\nfor item in items:\n    first = ask(f"Research: {item}")\n    point("body")\n    found.append([first, ask(f"Check: {first}")])',
    '%%step pay\nentered()\nids = [nbagent.once("charge", charge, 100 + i, f"cust-{i}") for i in range(2)]\npoint("body")',
    '%%step report\nentered()\ntext = ask("Report: " + " | ".join(f[0] for f in found))\nreceipt = nbagent.once("email", charge, 1, "mailer")\npoint("body")\nfinal = {"report": text, "receipt": receipt, "ids": ids}',
    'print("RESULT " + json.dumps({"items": items, "found": found, "ids": ids, "final": final}))',
]

#: Distinct LLM calls and effects of one complete run of the program.
N_CALLS = 3 + 3 * 2 + 1
N_CHARGES = 3


@dataclass
class World:
    """The files of one agent world: a store, a key folder, and the fake outside world."""

    root: Path
    attempts: int = 0
    spend: list[int] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def env(self, kill: str = "", cap: float = CAP_USD) -> dict[str, str]:
        return {
            **os.environ,
            "NBAGENT_DIR": str(self.store),
            "NBAGENT_KEY_DIR": str(self.keys),
            "REL_COUNTS": str(self.root / "counts.txt"),
            "REL_PAYMENTS": str(self.root / "payments.json"),
            "REL_EXEC": str(self.root / "exec.txt"),
            "REL_KILLED": str(self.root / "killed.txt"),
            "REL_KILL": kill,
            "REL_CAP": repr(cap),
            "REL_ATTEMPT": str(self.attempts),
            "PYTHONHASHSEED": "0",
        }

    # -- what the outside world saw
    def requests(self) -> list[str]:
        p = self.root / "counts.txt"
        return p.read_text().split() if p.exists() else []

    def executions(self, attempt: int | None = None) -> list[str]:
        p = self.root / "exec.txt"
        rows = [line.split() for line in p.read_text().splitlines()] if p.exists() else []
        return [s for a, s in rows if attempt is None or int(a) == attempt]

    def killed(self) -> list[str]:
        p = self.root / "killed.txt"
        return p.read_text().split() if p.exists() else []

    def charges(self) -> list[Any]:
        import nbagent

        return nbagent.FakePayments(path=self.root / "payments.json").charges

    # -- what the store says (read without nbagent's caches: plain diskcache)
    def snapshot(self) -> dict[str, Any]:
        with diskcache.Cache(str(self.store)):  # opens (and checks) the database
            pass
        rows = dict(records(self.store))
        return {
            "spend": int(rows.get("ctr/agent/spend_nusd", 0)),
            "reserved": int(rows.get("ctr/agent/reserved_nusd", 0)),
            "done": sorted(k.split("/", 2)[2] for k in rows if k.startswith("step/agent/")),
        }


def records(store: Path) -> list[tuple[str, Any]]:
    """The rows of the store's ``records`` table (format 4), read with sqlite3 alone."""
    con = sqlite3.connect(store / "cache.db")
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchall():
            return []
        return con.execute("SELECT key, value FROM records").fetchall()
    finally:
        con.close()


def run_script(world: World, script: Path, kill: str = "", cap: float = CAP_USD) -> Any:
    world.attempts += 1
    return subprocess.run(
        [sys.executable, str(script)],
        env=world.env(kill, cap),
        capture_output=True,
        text=True,
        timeout=120,
    )


def result_of(stdout: str) -> Any:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in {stdout!r}")


def check_attempt(world: World, before: dict[str, Any], cap: float = CAP_USD) -> dict[str, Any]:
    """Invariants after one attempt (killed or not); returns the new snapshot."""
    after = world.snapshot()  # the store always opens
    # a completed step never re-executes
    again = set(world.executions(world.attempts)) & set(before["done"])
    assert not again, f"completed steps executed again in attempt {world.attempts}: {again}"
    assert set(before["done"]) <= set(after["done"]), "a completed step record was lost"
    # spend never decreases and never exceeds the cap
    assert after["spend"] >= before["spend"], (before, after)
    assert after["spend"] <= round(cap * 1e9), after
    assert after["spend"] + after["reserved"] <= round(cap * 1e9), after
    return after


def check_outside_world(world: World) -> None:
    """No effect twice; no paid call paid again (except one in flight at a kill)."""
    charges = world.charges()
    keys = [c.idempotency_key for c in charges]
    assert len(keys) == len(set(keys)) == N_CHARGES, charges
    requests = world.requests()
    in_flight = sum(k.split(":")[0] in ("llm", "ledger") for k in world.killed())
    assert len(set(requests)) == N_CALLS, sorted(set(requests))
    assert len(requests) == N_CALLS + in_flight, (requests, world.killed())
    for key in set(requests):  # two kills in flight on the same call: it is sent 3 times
        assert requests.count(key) <= 1 + in_flight, f"call {key} sent {requests.count(key)} times"


# -- notebooks in real kernels -------------------------------------------------------


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by ``env`` (a kernel inherits the environment it starts in)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def notebook(sources: list[str]) -> Any:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    for i, c in enumerate(nb.cells):
        c.id = f"cell-{i}"
    return nb


def run_notebook(nb: Any, kernel: str, cwd: Path, env: dict[str, str]) -> tuple[Any, bool]:
    """Run every cell in a fresh kernel; (notebook, died). A cell error fails the test."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    async def go() -> bool:
        client = NotebookClient(
            nb,
            kernel_name=kernel,
            timeout=60,
            startup_timeout=60,
            resources={"metadata": {"path": str(cwd)}},
        )
        async with client.async_setup_kernel():
            for i, c in enumerate(nb.cells):
                try:
                    await client.async_execute_cell(c, i)
                except DeadKernelError:
                    return True
                errors = [o for o in c.outputs if o.output_type == "error"]
                assert not errors, f"cell {i} failed: {errors[0].ename}: {errors[0].evalue}"
        return False

    with environ(env):
        died = asyncio.run(go())
    return nb, died


def stdout_of(cell: Any) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
