# Lesson 01: durable state. Source of notebooks/01-durable-state.ipynb (tools/build_lessons.py).

# %% [markdown]
# # Lesson 1 · Durable state: checkpoint after every step
#
# **What you will see** (15 minutes)
#
# * A kernel killed in the middle of an agent — the notebook equivalent of a machine losing
#   power — and the agent picking up where it died: finished steps **replay** from disk, the
#   interrupted step runs again, and the LLM calls it had already paid for are **not sent again**.
# * The counts that prove it: how many times each step's code ran, how many requests reached the
#   LLM, with and without nbagent.
# * What a checkpoint contains: variables a step creates, lists it changes in place, and what
#   happens to values that cannot be saved (a lock, a network client).
#
# > *Agents that run longer than a few seconds shouldn't live in memory. Checkpoint after every
# > step.* In a prototype a crash is fine — you rerun. In production a crash means a user's order
# > never got placed and a $4 LLM call got burned. Durable state makes a crash cheap.

# %% [markdown]
# ## 1. A run and three steps
#
# The same research agent as the quickstart, in a run of its own. `findings` is made in an
# ordinary cell and the `research` step **appends** to it: nbagent notices the in-place change and
# stores the new list with the step.

# %%
%load_ext nbagent
%nbagent start durable-state --cap-usd 0.50 --max-steps 20

# %%
import nbagent

client = nbagent.default_client()
GOAL = "crash recovery in long-running LLM agents"


def ask_llm(prompt: str) -> str:
    response = client.chat.completions.create(
        model=client.nbagent_model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=300,
    )
    return response.choices[0].message.content


findings = []

# %%
%%step plan
reply = ask_llm(f"Break this goal into 3 sub-questions, one per line.\nGoal: {GOAL}")
plan = [line.split(". ", 1)[-1] for line in reply.splitlines() if line.strip()]
print("\n".join(plan))

# %%
%%step research
for question in plan:
    findings.append({"question": question, "answer": ask_llm(f"Answer briefly.\nQuestion: {question}")})
print(len(findings), "findings")

# %% [markdown]
# ## 2. Kill the kernel (on purpose)
#
# The next cell kills this notebook's kernel with `SIGKILL` — no cleanup, no `finally`, exactly
# like an out-of-memory kill or a pulled plug. It is skipped when the lessons are tested
# (`NBVAL_SKIP`), and it only kills the first time you run it, so *Run All* works afterwards.
#
# **Try it:**
# 1. Run the cell. JupyterLab says the kernel died; click **Restart** (or *Kernel → Restart*).
# 2. Run every cell from the top again (*Run → Run All Cells*).
# 3. Watch the `plan` and `research` cells print `↺ replayed step ... from disk` instead of
#    calling the model, and `%nbagent status` below still show the spend from before the crash.

# %%
# NBVAL_SKIP
# (this cell kills the kernel: the tests skip it)
import os
import pathlib
import signal
import tempfile

marker = pathlib.Path(tempfile.gettempdir()) / "nbagent-lesson-01-killed-once"
if not marker.exists():
    marker.touch()
    print("Killing the kernel now: restart it, then run all cells again.", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
print("The kernel was killed once already; delete", marker, "to do it again.")

# %%
%%step synthesize
report = ask_llm(f"Write a cited final report.\nGoal: {GOAL}\nFindings: {findings}")
print(report)

# %%
%nbagent status

# %% [markdown]
# ## 3. The same crash, measured
#
# A crash you cause by hand is convincing; a crash you can count is better. The next cells write
# a small agent notebook, run it headless in a **fresh kernel** (with `nbclient`, the library
# behind `jupyter nbconvert --execute`), and make that kernel kill itself with `SIGKILL` in the
# middle of its `research` step — after the second of three LLM answers. Then they run the same
# notebook again in another fresh kernel, on the same store.
#
# The agent logs every time a step's code starts (`ran.log`) and every request that reaches the
# simulated LLM (`requests.log`), in files that survive the crash.

# %%
import subprocess
import tempfile
from pathlib import Path

import nbclient
import nbformat
from nbformat.v4 import new_code_cell, new_notebook

work = Path(tempfile.mkdtemp(prefix="lesson01-"))

AGENT_CELLS = [
    f"%load_ext nbagent\n%nbagent start crash-demo --store {work / 'store'}",
    # a simulated LLM that writes every request it receives to requests.log
    """import os, signal, threading
from pathlib import Path
import nbagent
log = Path("requests.log")
def count_request(request):
    log.open("a").write("request\\n")
    return None  # None: the simulator's usual reply
client = nbagent.simulated_client(replies=count_request)
def ask_llm(prompt):
    r = client.chat.completions.create(model="gpt-4o-mini", max_tokens=300,
                                       messages=[{"role": "user", "content": prompt}])
    return r.choices[0].message.content
def ran(step):
    Path("ran.log").open("a").write(step + "\\n")
findings = []""",
    """%%step plan
ran("plan")
plan = ask_llm("Break this goal into 3 sub-questions, one per line.\\nGoal: crash recovery").splitlines()
lock = threading.Lock()  # a value that cannot be saved""",
    """%%step research
ran("research")
for question in plan:
    findings.append(ask_llm(f"Answer briefly.\\nQuestion: {question}"))
    if len(findings) == 2 and not Path("crashed-once").exists():
        Path("crashed-once").touch()
        os.kill(os.getpid(), signal.SIGKILL)  # the power goes out after the 2nd answer""",
    """%%step synthesize
ran("synthesize")
report = ask_llm(f"Write a final report.\\nGoal: crash recovery\\nFindings: {findings}")""",
    """try:
    with lock:
        pass
except NameError as error:
    print(type(error).__name__ + ":", error)""",
]


def run_agent(label: str) -> None:
    """Run the agent notebook in a fresh kernel; print what each cell printed."""
    nb = new_notebook(cells=[new_code_cell(source) for source in AGENT_CELLS])
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(work)}}
    )
    print(f"--- {label}")
    try:
        client.execute(stderr=subprocess.DEVNULL)  # (hide the kernel's start-up log)
    except nbclient.exceptions.DeadKernelError:
        print("    ✗ the kernel died (SIGKILL)")
    for cell in nb.cells[2:]:
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            for line in text.splitlines():
                if not line.startswith(("nbagent step", "⚠")):
                    print("   ", line)
    ran = Path(work, "ran.log").read_text().split() if Path(work, "ran.log").exists() else []
    requests = len(Path(work, "requests.log").read_text().split())
    print(f"    step bodies started so far: {ran}; LLM requests so far: {requests}")


run_agent("run 1: killed in the middle of 'research'")

# %%
run_agent("run 2: the same notebook, a fresh kernel, the same store")

# %% [markdown]
# Read the two runs:
#
# * **Run 1** executed `plan` (1 request) and died inside `research` after 2 requests.
# * **Run 2** *replayed* `plan` — its code did not start again, no request. `research` had not
#   finished, so it ran again from its first line; but its first two LLM calls had been answered
#   in run 1 and recorded in nbagent's call ledger, so they were served from disk: only the third
#   question went to the model. Then `synthesize` ran.
# * Total: **5 requests for 5 distinct LLM calls**. A prototype that simply reruns from the top
#   would have sent 1 + 2 + 1 + 3 + 1 = **8**, paying twice for three of them.
# * The `lock` made by `plan` could not be saved (a lock cannot be pickled). nbagent warned when
#   the step finished, and after the crash it does not pretend: using `lock` raises an error that
#   names the step that made it. Make such values in an ordinary cell (like `client` above), or
#   in the step that uses them.

# %%
ran = Path(work, "ran.log").read_text().split()
requests = len(Path(work, "requests.log").read_text().split())
print({step: ran.count(step) for step in ("plan", "research", "synthesize")}, "·", requests, "requests")

# %% [markdown]
# ## 4. What a checkpoint holds
#
# When a step cell succeeds, nbagent stores (and on replay restores):
#
# | | Stored? |
# |---|---|
# | Variables the cell binds (`plan = ...`, `reply = ...`) | yes |
# | Earlier variables the cell changes in place (`findings.append(...)`) | yes |
# | Modules the cell imports, functions and classes it defines | yes (re-bound on replay) |
# | What the cell printed and its last expression | yes — shown again on replay |
# | Values that cannot be pickled (locks, clients, open files, generators) | no — named in a warning |
# | Anything, if the cell **fails** | no — a failed step stores nothing and runs again next time |
#
# Try the in-place rule here: reset `findings` to the empty list it was before `research` ran,
# then run `research` again. Its inputs (`plan`, `findings == []`) are what they were, so it
# replays — and the replay puts back the list *with* the three findings.

# %%
findings = []

# %%
%%step research
for question in plan:
    findings.append({"question": question, "answer": ask_llm(f"Answer briefly.\nQuestion: {question}")})
print(len(findings), "findings")

# %%
len(findings)

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom; decide for yourself first, then
# compare. The cell checks them against the measured runs above.
#
# 1. In run 2, how many times did the code of `plan` start? (a number)
# 2. In run 2, how many requests reached the LLM? (a number)
# 3. Name one way to verify a claim that an agent is durable.
#    (a) ask the model whether it is durable  (b) kill the process mid-step, re-run, and count the
#    requests and step executions  (c) read the README

# %%
answers = {1: 0, 2: 2, 3: "b"}  # <- your answers

requests_in_run_2 = requests - 3  # run 1 sent 3 requests before it died
assert answers[1] == ran.count("plan") - 1, "Q1: a finished step replays: its code does not run."
assert answers[2] == requests_in_run_2, (
    "Q2: research's first two calls came from the ledger; only the 3rd and synthesize were sent."
)
assert answers[3] == "b", "Q3: verify durability by crashing it on purpose and counting."
print("All correct.")
