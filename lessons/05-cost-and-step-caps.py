# Lesson 05: cost and step caps. Source of notebooks/05-cost-and-step-caps.ipynb (tools/build_lessons.py).

# %% [markdown]
# # Lesson 5 · Cost and step caps: hard ceilings
#
# **What you will see** (15 minutes)
#
# * A **runaway loop** — an agent that never decides it is done — stopped by the **step cap**
#   with a `StepCapExceeded` error that says *possible loop*; and a loop *inside* one step stopped
#   by the **LLM-call cap**.
# * An **expensive call refused before it is sent**: the cost cap checks what a call *could* cost
#   before it leaves, so the simulated LLM's request counter does not move.
# * Spend that **never ends above the cap**, however many calls try.
# * **Raising a cap on purpose** — a deliberate, recorded decision, visible in the trace.
#
# > *Non-negotiable ceilings. Cheaper to fail a task than to let a loop burn $400 of Opus calls
# > at 3 AM.*

# %% [markdown]
# ## 1. The ceilings in the lesson, and in nbagent
#
# The lesson's loop counts steps and dollars by hand:
#
# ```js
# const MAX_STEPS = 50; const MAX_COST_USD = 2.00;
# while (!isDone(state)) {
#   if (++stepCount > MAX_STEPS) throw new Error('Step cap exceeded — possible loop.');
#   const { result, usage } = await runOneStep(state);
#   costUsd += usage.inputTokens * 3/1_000_000 + usage.outputTokens * 15/1_000_000;
#   if (costUsd > MAX_COST_USD) throw new Error(`Cost cap exceeded: $${costUsd.toFixed(2)}`);
#   state = applyResult(state, result);
# }
# ```
#
# In nbagent the caps belong to the **run**, not to a loop variable: they are stored with it,
# so they survive a crash and hold across processes; every step and every LLM call is checked
# against them. The same program:
#
# ```python
# MAX_STEPS = 50
# MAX_COST_USD = 2.00
# run = nbagent.Run("research", max_steps=MAX_STEPS, max_cost_usd=MAX_COST_USD)
#
# @run.step("one-step")
# def run_one_step(state): ...          # LLM calls priced from the model's real rates
#
# while not is_done(state):
#     state = run_one_step(state)       # StepCapExceeded / CostCapExceeded stop the loop
# ```
#
# One difference matters: the lesson's loop checks the cost **after** the call, so the call
# that crosses the cap has already run and been paid for. nbagent checks **before**: it reserves
# the worst case a call could cost (its prompt, plus `max_tokens` at the output price) and
# refuses the call if that could cross the cap.
#
# This notebook's run gets a deliberately tiny cost cap: one US cent.

# %%
%load_ext nbagent
%nbagent start caps --cap-usd 0.01 --max-steps 20

# %%
import nbagent

client = nbagent.default_client()
sim = getattr(client, "nbagent_sim", None)  # the simulated LLM (None with a real OPENAI_API_KEY)


def requests_sent():
    """How many requests reached the (simulated) LLM server so far."""
    return sim.request_count if sim else "(real model: see your provider's dashboard)"


def ask_llm(prompt, max_tokens=200, model=None):
    response = client.chat.completions.create(
        model=model or client.nbagent_model,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": prompt}],
    )
    return response.choices[0].message.content

# %% [markdown]
# ## 2. A runaway loop, stopped by the step cap
#
# The agent below loops until the model says `FINAL ANSWER`. This model never does — the classic
# runaway. It runs in a run of its own (made with the Python API) with `max_steps=8`. Each pass
# through the loop is one step; the ninth is refused before it runs.

# %%
loop_run = nbagent.Run("runaway-loop", max_steps=8, max_cost_usd=0.50, activate=False)


@loop_run.step("think")
def think(state):
    thought = ask_llm(f"Goal: book a table for two. Notes so far: {len(state)}. Next action?")
    return state + [thought]


def is_done(state):
    return bool(state) and "FINAL ANSWER" in state[-1]


state = []
try:
    while not is_done(state):
        state = think(state)
except nbagent.StepCapExceeded as e:
    print(f"{type(e).__name__}: {e}")
print("steps executed:", len(state), "· spend:", nbagent.format_usd(loop_run.spend_usd))

# %% [markdown]
# Eight thoughts were paid for; the ninth step never ran. The refusal is in the run's trace, so
# the on-call engineer finds it in the morning:

# %%
t = loop_run.trace()
t[t.kind == "cap"][["step", "name", "status"]]

# %% [markdown]
# ## 3. A loop *inside* a step: the LLM-call cap
#
# A step cap cannot see a loop that stays inside one step — a tool-calling agent that keeps
# asking the model, say. `max_llm_calls` can: it caps the number of LLM calls of the run.

# %%
inner_run = nbagent.Run("inner-loop", max_llm_calls=5, max_cost_usd=0.50, activate=False)


@inner_run.step("agent")
def agent():
    replies = []
    while True:  # the bug: no exit condition
        replies.append(ask_llm("Is the task done yet?"))


try:
    agent()
except nbagent.StepCapExceeded as e:
    print(f"{type(e).__name__}: {e}")
print("LLM calls made:", inner_run.llm_calls)

# %% [markdown]
# ## 4. An expensive call, refused before it is made
#
# Back to this notebook's run, capped at $0.01. A small call first — a few hundredths of a cent:

# %%
print(ask_llm("Summarize durable execution in one sentence.", model="gpt-4o")[:100], "...")
run = nbagent.current_run()
print("spend:", nbagent.format_usd(run.spend_usd), "of", nbagent.format_usd(run.max_cost_usd))
print("requests sent:", requests_sent())

# %% [markdown]
# Now a call that *could* cost 16 cents: `max_tokens=16000` on `gpt-4o` (output at $10 per
# million tokens). It might use far less — but nobody knows until it is paid for, so nbagent
# refuses it **before sending**:

# %%
before = requests_sent()
try:
    ask_llm("Write a 50-page book about durable execution.", max_tokens=16000, model="gpt-4o")
except nbagent.CostCapExceeded as e:
    print(f"{type(e).__name__}: {e}")
print("requests sent before:", before, "· after:", requests_sent())
sent_by_refused_call = requests_sent() - before if sim else 0

# %% [markdown]
# The request count did not move: the call never left the notebook. The refusal is also an
# **alert** (logged, in the trace, on the dashboard).
#
# ## 5. Spend never ends above the cap
#
# Keep calling until the cap says no. Each call first reserves its worst case (here
# `max_tokens=100` on `gpt-4o`: about a tenth of a cent); the first call whose worst case no
# longer fits under $0.01 is refused, so spend stays under the cap — by construction, not by
# luck.

# %%
calls = 0
try:
    while True:
        ask_llm("Give me one more idea about agent reliability.", max_tokens=100, model="gpt-4o")
        calls += 1
except nbagent.CostCapExceeded as e:
    print("refused after", calls, "calls:", str(e).split(", so")[0])
print("spend:", nbagent.format_usd(run.spend_usd), "≤ cap", nbagent.format_usd(run.max_cost_usd))
assert run.spend_usd <= run.max_cost_usd

# %% [markdown]
# The spend plot shows the staircase of calls stopping under the cap line:

# %%
%nbagent plot spend

# %% [markdown]
# ## 6. Raising a cap on purpose
#
# Sometimes the expensive call is the point. Raise the cap — on purpose, with a command that is
# **recorded in the trace** with the old and new values — then make the call. (In Python:
# `run.set_cap(usd=0.25)`.)

# %%
%nbagent cap --usd 0.25

# %%
before = requests_sent()
book = ask_llm("Write a 50-page book about durable execution.", max_tokens=16000, model="gpt-4o")
print("requests sent before:", before, "· after:", requests_sent())
print("spend:", nbagent.format_usd(run.spend_usd), "of", nbagent.format_usd(run.max_cost_usd))

# %% [markdown]
# The call was sent, and it cost far less than the 16 cents reserved for it: once the real usage
# came back, the reservation was replaced by the real price. The cap is on what a call *could*
# cost; spend is what it *did* cost.
#
# The trace keeps every cap decision: the cap set when the run was opened, each refusal, and the
# raise.

# %%
import json

trace = run.trace()
for _, row in trace[trace.kind == "cap"].iterrows():
    detail = json.loads(row.detail) if isinstance(row.detail, str) else {}  # JSON text
    if row.status == "changed":
        print(f"cap changed   usd {detail['old']['usd']} -> {detail['new']['usd']}")
    else:
        print(f"{row['name']} refused: {row.error.split(', so')[0]}")

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom. Cover them, decide for yourself,
# then compare — or change one to a wrong letter and run the cell to see the check explain why.
#
# 1. How many requests did the refused 16-cent call send to the LLM?
#    (a) one — it was refused when the bill came  (b) none — it was refused before sending
# 2. A loop of LLM calls inside **one** step never ends. Which cap stops it?
#    (a) `max_steps`  (b) `max_llm_calls` (or the cost cap, eventually)
# 3. Why is it cheaper to fail a task than to let it run?
#    (a) a failed task can be retried after a look; a runaway loop bills every minute until
#    someone notices  (b) failed tasks are free to retry automatically
# 4. What did `%nbagent cap --usd 0.25` leave behind?
#    (a) nothing, it only changed a setting  (b) a `cap` row in the trace with old and new caps

# %%
answers = {1: "b", 2: "b", 3: "a", 4: "b"}  # <- your answers

assert answers[1] == "b" and sent_by_refused_call == 0, (
    "Q1: the cost cap reserves the worst case before sending; a refused call never leaves."
)
assert answers[2] == "b" and inner_run.llm_calls == 5, (
    "Q2: max_steps counts step executions; a loop inside one step is caught by max_llm_calls."
)
assert answers[3] == "a", "Q3: a failed task costs a retry; a runaway loop costs until 3 AM ends."
changes = trace.query("kind == 'cap' and status == 'changed'")
assert answers[4] == "b" and json.loads(changes.detail.iloc[-1])["new"]["usd"] == 0.25, (
    "Q4: raising a cap is an explicit, recorded decision: look at the trace."
)
print("All correct.")
