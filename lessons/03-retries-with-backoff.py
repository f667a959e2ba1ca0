# Lesson 03: retries with backoff. Source of notebooks/03-retries-with-backoff.ipynb.

# %% [markdown]
# # Lesson 3 · Retries with backoff: transient failures retry, permanent ones surface
#
# **What you will see** (15-20 minutes)
#
# * Every row of the error table below, triggered on purpose by the simulated LLM's fault
#   injection, and what nbagent did about it — attempt by attempt, with the wait before each
#   retry (**1 s, 5 s, 30 s**) — in the run's trace.
# * A **circuit breaker** opening after five rate-limited calls in a row, so the sixth call fails
#   fast without hammering the provider.
# * Why a `400` and an authentication failure are **never** retried — and how an auth failure
#   stops the whole run until you `%nbagent resume` it.
# * Step-level retries: `%%step NAME --retries N` for code that is not an LLM call.
#
# | Error type | Policy |
# |---|---|
# | Network timeout | Retry 3x with exponential backoff (1s, 5s, 30s). |
# | Rate limit (429) | Retry after Retry-After header; circuit-break after 5 attempts. |
# | 5xx server error | Retry 3x; alert on repeated 503. |
# | Tool schema mismatch | One retry with error fed back to model. |
# | 4xx client error | Do NOT retry — it'll fail the same way. |
# | Auth failure | Do NOT retry — alert, stop. |
#
# This table *is* nbagent's default retry policy for LLM calls.

# %% [markdown]
# ## Setup
#
# Faults cannot be injected into a real provider, so this lesson always uses the simulator
# (`nbagent.simulated_client()`), even with an `OPENAI_API_KEY`. `client.nbagent_sim` is the
# simulated server: `sim.fail_next(kind, times=n)` makes its next `n` requests fail with `kind`.
#
# Real backoff waits add up to a minute per demo. `NBAGENT_TIME_SCALE` multiplies every backoff
# *sleep* (not what the trace records): here 0.01, so 30 s of waiting takes 0.3 s.

# %%
import os

os.environ.setdefault("NBAGENT_TIME_SCALE", "0.01")  # sleeps 100x shorter; the trace is unchanged

%load_ext nbagent
%nbagent start retries --cap-usd 0.50 --max-steps 20

# %%
import pandas as pd

import nbagent

pd.set_option("display.max_colwidth", 70)
client = nbagent.simulated_client()
sim = client.nbagent_sim
run = nbagent.current_run()
COLUMNS = ["kind", "attempt", "status", "error", "wait_s"]


def ask(question="What is exponential backoff?", **extra):
    """One LLM call; prints the answer or the error the caller finally sees."""
    try:
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"Answer briefly.\nQuestion: {question}"}],
            max_tokens=60,
            **extra,
        )
        message = reply.choices[0].message
        if message.tool_calls:
            call = message.tool_calls[0].function
            print(f"✓ the caller got a tool call: {call.name}({call.arguments})")
        else:
            print("✓ the caller got an answer:", message.content[:60], "…")
        return reply
    except Exception as error:
        print(f"✗ the caller got {type(error).__name__}: {error}")


def attempts_since(mark):
    """The trace rows recorded after `mark` (a row count): one per attempt of an LLM call."""
    rows = run.trace().iloc[mark:]
    return rows[rows.kind == "llm"][COLUMNS].astype({"attempt": "Int64"})


def mark():
    return len(run.trace())

# %% [markdown]
# ## 1. Network timeout: retry 3x with backoff 1 s, 5 s, 30 s
#
# Three timeouts in a row, then the server answers. The caller sees only the answer; the trace
# shows four attempts and the waits before attempts 2, 3 and 4.

# %%
m = mark()
sim.fail_next("timeout", times=3)
ask()
attempts_since(m)

# %% [markdown]
# Four timeouts in a row: after the third retry nbagent gives up and the caller gets openai's own
# `APITimeoutError` — a transient failure that did not go away must surface, not loop forever.
# A dropped connection (`"connection"`) follows the same rule.

# %%
m = mark()
sim.fail_next("timeout", times=4)
ask()
attempts_since(m)

# %% [markdown]
# ## 2. 5xx server error: retry 3x; alert on repeated 503
#
# Two `503 Service Unavailable` answers in a row: retried with the same backoff, and an alert
# is raised — a provider outage is something a human should hear about even when retries cope.
# Alerts are printed (to stderr), recorded in the trace (`run.alerts()`) and shown on the
# dashboard; `run.on_alert(hook)` sends them wherever your pager listens.

# %%
m = mark()
sim.fail_next("unavailable", times=2)
ask()
attempts_since(m)

# %% [markdown]
# ## 3. Tool schema mismatch: one retry, with the error fed back to the model
#
# The model calls a tool with arguments that break the tool's JSON schema. Retrying the same
# request would likely get the same mistake, so nbagent re-sends it **once** with the
# validation error added as the tool's reply — the model gets a chance to correct itself.

# %%
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
m = mark()
sim.fail_next("bad_tool_args")
ask("What is the weather in Paris for 3 days?", tools=[WEATHER_TOOL], tool_choice="required")
attempts_since(m)

# %% [markdown]
# ## 4. 4xx client error: do NOT retry
#
# A `400 Bad Request` means the request itself is wrong (a bad parameter, a prompt too long).
# Sending it again fails the same way and can cost money, so it surfaces at once: one attempt.

# %%
m = mark()
sim.fail_next("bad_request")
ask()
attempts_since(m)

# %% [markdown]
# ## 5. Auth failure: do NOT retry — alert, stop
#
# A `401` (bad or revoked key) will not fix itself either, and every agent sharing the key will
# hit it. nbagent raises it at once, records an alert and **stops the run**: the next LLM call or
# step raises `RunStopped` before anything is sent — no point burning through the queue.

# %%
m = mark()
sim.fail_next("auth")
ask()
attempts_since(m)

# %%
before = sim.request_count
ask()  # the run is stopped: nothing is sent
print("requests sent while stopped:", sim.request_count - before)

# %% [markdown]
# Fix the cause (rotate the key, restart the kernel with the new one), then let the run go on:

# %%
%nbagent resume

# %%
reply = ask()

# %% [markdown]
# ## 6. Rate limit (429): wait what the server asks; circuit-break after 5 attempts
#
# A `429 Too Many Requests` carries a `Retry-After` header; nbagent waits exactly that (here
# 2 s) instead of its own backoff.

# %%
m = mark()
sim.fail_next("rate_limit", times=2, retry_after_s=2)
ask()
attempts_since(m)

# %% [markdown]
# Five 429s in a row from the same endpoint: nbagent stops retrying after the fifth attempt and
# **opens the circuit** for that endpoint. For the next 30 seconds every call to it fails fast
# with `CircuitOpenError` — nothing is sent, so a struggling provider gets room to recover and
# your agent does not queue up minutes of doomed retries. After the cool-down one trial call is
# let through; if it succeeds the circuit closes.
#
# (A second client on another endpoint keeps its own breaker, so this demo gets one of its own.)

# %%
limited = nbagent.simulated_client(base_url="https://rate-limited.nbagent.invalid/v1")
m = mark()
limited.nbagent_sim.fail_next("rate_limit", times=5, retry_after_s=1)
try:
    limited.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
except Exception as error:
    print(f"call 1 ✗ {type(error).__name__}: {error}")
sent = limited.nbagent_sim.request_count
try:
    limited.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
except Exception as error:
    print(f"call 2 ✗ {type(error).__name__}: {error}")
print("requests call 2 sent:", limited.nbagent_sim.request_count - sent)
attempts_since(m)

# %% [markdown]
# ## 7. Step-level retries: `%%step NAME --retries N`
#
# The LLM client's policy covers LLM calls. A step body can fail for other reasons — a flaky
# scraper, a database that restarts. `--retries N` re-runs the *whole body* up to N more times
# with the same backoff, classifying the error the same way: a `ConnectionError` is retried,
# but a `NameError` (a bug) or a 4xx is not.
#
# (LLM calls made by an attempt that later fails are not paid twice: the retry gets them from
# nbagent's call ledger, as after a crash in lesson 1.)

# %%
flaky_failures = 2


def fetch_sources():
    """A scraper that fails twice, then works."""
    global flaky_failures
    if flaky_failures:
        flaky_failures -= 1
        raise ConnectionError("connection reset by peer (simulated flaky site)")
    return ["https://example.org/durable-execution", "https://example.org/backoff"]

# %%
%%step sources --retries 3
print("attempt", nbagent.current_step().attempt)
sources = fetch_sources()
print(sources)

# %%
step_rows = run.trace().query("step == 'sources#1'")
step_rows[COLUMNS].astype({"attempt": "Int64"})

# %% [markdown]
# A bug is not retried: it would fail the same way every time, and the sooner you see it the
# better. Here it is with the plain-Python form of a step (`@run.step(name, retries=N)`, the same
# engine as `%%step`), so the error can be caught and printed; a `%%step buggy --retries 3` cell
# would raise the same `NameError` after its first attempt.

# %%
@run.step("buggy", retries=3)
def buggy():
    print("attempt", nbagent.current_step().attempt)
    return undefined_helper()  # a typo'd name: a bug, not a transient failure


try:
    buggy()
except NameError as error:
    print(f"✗ {type(error).__name__}: {error}")

# %% [markdown]
# ## 8. Everything in one place
#
# `%nbagent dashboard` shows the run: spend, steps and its alerts. In JupyterLab the dashboard
# also lists every call with its status and a countdown while a retry waits; its text summary
# (what you see on GitHub) ends with the last alert.

# %%
%nbagent dashboard

# %%
trace = run.trace()
trace[trace.kind == "llm"].groupby("status").size().rename("LLM call attempts")

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom; decide for yourself first, then
# compare. The cell checks them against the trace above.
#
# 1. Three timeouts then a success: how many seconds did the policy wait in total? (number)
# 2. A `400 Bad Request`: how many attempts? (number)
# 3. Why must an auth failure not be retried?
#    (a) retries are too slow  (b) it fails the same way every time and every agent sharing the
#    key hits it: alert a human and stop  (c) the provider forbids retries
# 4. How many attempts did the `buggy` step make? (number)

# %%
answers = {1: 36, 2: 1, 3: "b", 4: 1}  # <- your answers

trace = run.trace()
llm = trace[trace.kind == "llm"]
first_timeouts = llm.iloc[:4]  # section 1: 3 timeouts + the success
assert answers[1] == first_timeouts.wait_s.fillna(0).sum(), "Q1: 1 + 5 + 30 seconds."
assert answers[2] == 1, "Q2: a 4xx fails the same way on every attempt: it is not retried."
assert answers[3] == "b", "Q3: permanent, shared by every caller: alert, stop, fix, resume."
buggy_attempts = trace.query("step == 'buggy#1' and kind == 'step'").attempt.max()
assert answers[4] == buggy_attempts, "Q4: a NameError is a bug: surfaced after the 1st attempt."
print("All correct.")
