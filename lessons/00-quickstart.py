# Lesson 00: the quickstart. Source of notebooks/00-quickstart.ipynb (tools/build_lessons.py).

# %% [markdown]
# # Lesson 0 · Quickstart: a research agent that survives
#
# **What you will see in the next 10 minutes**
#
# * A small research agent — *plan → research each sub-question → synthesize* — written as three
#   notebook cells. Each cell starts with `%%step NAME`, which makes it a **durable step**.
# * A live **dashboard** above the steps: spend against a hard cost cap, steps against a step cap,
#   every LLM call as it happens.
# * A step **replayed**: run a finished step again and it comes back from disk in milliseconds —
#   same variables, same printed output, no new LLM call, $0.
#
# A prototype agent and a production agent use the same LLM. What differs is everything around
# it:
#
# | Requirement | What it means | Lesson |
# |---|---|---|
# | Durable state | Every step is persisted. The process can die and resume. | 1 |
# | Idempotent steps | Re-running a step is safe — no duplicate actions. | 2 |
# | Retries with backoff | Transient failures retry; permanent failures surface. | 3 |
# | Observability | Every tool call, every prompt, every token logged. | 4 |
# | Cost + step caps | Hard ceilings prevent runaway loops and bills. | 5 |
#
# This lesson touches all five; the next ones take them one at a time.

# %% [markdown]
# ## 1. Open a run
#
# A **run** is one execution of the agent, stored on disk (in `.nbagent/` beside this notebook).
# `--cap-usd` and `--max-steps` are hard ceilings: a call that *could* push spend over the cap is
# refused before it is sent. Run the cell: in JupyterLab you get a live dashboard; in a plain
# terminal (or on GitHub) you see its text summary.

# %%
%load_ext nbagent
%nbagent start quickstart --cap-usd 0.50 --max-steps 20

# %% [markdown]
# ## 2. The LLM
#
# `nbagent.default_client()` is the official `openai` client with nbagent wrapped around its HTTP
# transport: every call is traced, priced, checked against the cap, retried by policy and never
# paid twice. Without an `OPENAI_API_KEY` it talks to nbagent's **simulated LLM** — offline, free,
# deterministic, and priced as if it were `gpt-4o-mini` — and says so once. With a key, the same
# cells call the real model, still under the $0.50 cap.
#
# The client lives in an ordinary cell, *outside* the steps: a network client cannot be saved to
# disk, so it is rebuilt by re-running this cell, while the steps' results are what gets saved.

# %%
import json

import nbagent

client = nbagent.default_client()
GOAL = "crash recovery in long-running LLM agents"  # the same agent as `make demo`


def ask_llm(prompt: str) -> str:
    """One chat completion; max_tokens bounds the cost nbagent reserves against the cap."""
    response = client.chat.completions.create(
        model=client.nbagent_model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=300,
    )
    return response.choices[0].message.content

# %% [markdown]
# ## 3. The agent, as three durable steps
#
# **Step 1 — plan.** Break the goal into sub-questions. While a step runs, a status line under
# the cell shows its attempt, time, LLM calls and cost. When the cell ends, nbagent stores the
# variables it created (`reply`, `plan`) and its output, and the status line becomes a one-line
# summary (`✓ step 'plan' done · ...`).

# %%
%%step plan
reply = ask_llm(f"Break this goal into 3 sub-questions, one per line.\nGoal: {GOAL}")
plan = [line.split(". ", 1)[-1] for line in reply.splitlines() if line.strip()]
plan

# %% [markdown]
# **Step 2 — research.** One LLM call per sub-question. `--retries 2 --timeout 60` asks nbagent to
# re-run the body up to twice if it fails, and to stop it after 60 seconds. (The LLM client
# already retries transient errors on its own — lesson 3.)

# %%
%%step research --retries 2 --timeout 60
findings = []
for question in plan:
    answer = ask_llm(f"Answer briefly, citing a source.\nQuestion: {question}")
    findings.append({"question": question, "answer": answer})
    print(f"• {question}\n  {answer}\n")

# %% [markdown]
# **Step 3 — synthesize.** Write one cited answer from the findings.

# %%
%%step synthesize
report = ask_llm(f"Write a cited final report.\nGoal: {GOAL}\nFindings: {json.dumps(findings)}")
print(report)

# %% [markdown]
# ## 4. Run a step again: replay
#
# Below is the `plan` cell once more, exactly as above — what you get when you press
# Shift+Enter on it a second time. Its source and its inputs (`GOAL`, `ask_llm`) are unchanged,
# so nbagent does not call the model: it restores `plan` from disk, shows the recorded output and
# marks the step as **replayed**. Scroll up and re-run any step cell yourself: same thing.
#
# This is what makes a crash cheap (lesson 1): after a kernel restart, *Run All* replays every
# finished step and only the unfinished ones run. (To start this lesson from scratch, run
# `%nbagent reset --all` in a new cell: it forgets the run's steps.)

# %%
%%step plan
reply = ask_llm(f"Break this goal into 3 sub-questions, one per line.\nGoal: {GOAL}")
plan = [line.split(". ", 1)[-1] for line in reply.splitlines() if line.strip()]
plan

# %% [markdown]
# ## 5. What happened: status and trace
#
# `%nbagent status` summarises the run; `run.trace()` is a pandas DataFrame with one row per LLM
# call (lesson 4 digs in). The simulated model reports token counts like the real API, and
# nbagent prices them with the model's published rates.

# %%
%nbagent status

# %%
run = nbagent.current_run()
trace = run.trace()
calls = trace[trace.kind == "llm"].astype({"input_tokens": int, "output_tokens": int})
calls[["step", "model", "input_tokens", "output_tokens", "cost_usd", "status"]]

# %% [markdown]
# Five LLM calls: 1 plan + 3 research + 1 synthesize. The second `plan` cell added none — it was a
# replay. The simulator counts what actually reached the (simulated) server:

# %%
sim = getattr(client, "nbagent_sim", None)  # None with a real OPENAI_API_KEY
print("requests the LLM server received:", sim.request_count if sim else "(real model)")
print("LLM calls in the run:", run.llm_calls, "· spend:", nbagent.format_usd(run.spend_usd))

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom. Cover them, decide for yourself,
# then compare — or change one to a wrong letter and run the cell to see the check explain why.
#
# 1. The second `%%step plan` cell above: how many requests did it send to the LLM?
#    (a) one, the same prompt again  (b) none — it replayed from disk  (c) one, but it was free
# 2. What is the main idea of "production agent patterns"?
#    (a) a bigger model  (b) everything *around* the LLM: durable state, idempotency, retries,
#    observability, caps  (c) a better prompt
# 3. Why is the `client` made in an ordinary cell and not inside a step?
#    (a) it cannot be saved to disk, so it is rebuilt by re-running its cell
#    (b) steps cannot call the LLM  (c) it makes the step faster

# %%
answers = {1: "b", 2: "b", 3: "a"}  # <- your answers

# The check: question 1 is verified against what really happened in this run: the `plan` step
# made one LLM call, and the second `plan` cell added none.
plan_calls = run.trace().query("kind == 'llm' and step == 'plan#1' and status == 'ok'")
assert answers[1] == "b" and len(plan_calls) == 1, (
    "Q1: a replayed step restores its variables and output from disk; it sends nothing."
)
assert answers[2] == "b", "Q2: same LLM in prototype and production; the difference is around it."
assert answers[3] == "a", "Q3: network clients, locks and files cannot be pickled: keep them out."
print("All correct.")
