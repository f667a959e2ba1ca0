# Lesson 02: idempotent steps. Source of notebooks/02-idempotent-steps.ipynb (tools/build_lessons.py).

# %% [markdown]
# # Lesson 2 · Idempotent steps: no double billing
#
# **What you will see** (15 minutes)
#
# * A customer charged **twice** for one order: the payment went through, the response was lost,
#   the code retried. The most common side-effect bug in agents.
# * The fix payment APIs already offer: an **idempotency key**. Same key on retry → the service
#   returns the original charge instead of making a new one.
# * Keys **derived from workflow state** (`nbagent.idempotency_key()`): the same on every retry,
#   every re-run and after a crash — unlike a random UUID made inside the step.
# * The **window between acting and recording**, and how `nbagent.once` / `@nbagent.effect` plus
#   the service's key close it.
#
# > *Any step that touches the outside world (send email, charge card, create ticket) needs an
# > idempotency key. When the step retries, the external system recognizes the key and doesn't
# > duplicate the action.*
#
# Everything here runs against `nbagent.FakePayments`, a small in-process fake of Stripe's charge
# endpoint that honours idempotency keys the way Stripe does.

# %%
%load_ext nbagent
%nbagent start checkout --max-steps 20

# %%
import nbagent

ORDER = {"task_id": "order-1042", "customer": "cus_42", "amount_cents": 5000}

# %% [markdown]
# ## 1. The double charge
#
# `FakePayments(fail_after_charge_once=True)` makes the charge, then "loses the connection"
# before the answer arrives — the classic failure. The caller cannot tell whether the card was
# charged, so it does what every retry loop does: tries again.

# %%
payments = nbagent.FakePayments(fail_after_charge_once=True)


def charge_with_retry(**key):
    for attempt in (1, 2):
        try:
            return payments.charge(ORDER["amount_cents"], "usd", ORDER["customer"], **key)
        except ConnectionError as error:
            print(f"attempt {attempt}: {error}\n")


charge_with_retry()  # no idempotency key
for charge in payments.charges:
    print(charge.id, charge.amount, charge.currency, charge.customer)
print(f"total charged: ${payments.total_charged('cus_42') / 100:.2f} for one $50.00 order")

# %% [markdown]
# ## 2. The same retry with an idempotency key
#
# The lesson's Stripe example builds the key from the task and the step:
# `task:${taskId}:step:${stepName}`. Retried with the same key, the service recognises the
# request and answers with the charge it already made.

# %%
payments = nbagent.FakePayments(fail_after_charge_once=True)
key = f"task:{ORDER['task_id']}:step:charge"
charge = charge_with_retry(idempotency_key=key)
print(f"returned: {charge.id} · charges made: {len(payments.charges)} · "
      f"total: ${payments.total_charged('cus_42') / 100:.2f}")

# %% [markdown]
# A key only works if it is **the same on every attempt**. A key made fresh inside the step —
# `uuid.uuid4()`, a timestamp — is different on the retry, and the service sees a new charge.
# And reusing a key for a *different* charge is refused, as Stripe refuses it:

# %%
try:
    payments.charge(9900, "usd", "cus_42", idempotency_key=key)
except Exception as error:
    print(type(error).__name__ + ":", error)

# %% [markdown]
# ## 3. Keys derived from workflow state
#
# Inside a step, `nbagent.idempotency_key(label)` derives the key from the run, the step's name
# and its occurrence: `run:checkout:step:charge:1:card`. Nothing random, nothing stored by you —
# the same key on every retry, on a re-run after a kernel restart, in another process.
#
# The step below charges through the flaky service with `--retries 2`: attempt 1 loses the
# response, nbagent retries the body, attempt 2 sends the same key and gets the same charge.

# %%
payments = nbagent.FakePayments(fail_after_charge_once=True)

# %%
%%step charge --retries 2
key = nbagent.idempotency_key("card")
print(f"attempt {nbagent.current_step().attempt} · idempotency key: {key}")
try:
    charge = payments.charge(ORDER["amount_cents"], "usd", ORDER["customer"], idempotency_key=key)
except ConnectionError as error:
    print("  ✗", error)
    raise  # the step fails this attempt; --retries runs it again
print("  charged:", charge.id)

# %%
print(f"charges made: {len(payments.charges)} · total: ${payments.total_charged('cus_42') / 100:.2f}")

# %% [markdown]
# Run the step cell again and it **replays**: the recorded output comes back, nothing is sent to
# the payments service at all. Force it to execute with `--rerun` — as you would after changing
# the code — and the key is still the same, so the service still charges only once:

# %%
%%step charge --retries 2 --rerun
key = nbagent.idempotency_key("card")
print(f"attempt {nbagent.current_step().attempt} · idempotency key: {key}")
try:
    charge = payments.charge(ORDER["amount_cents"], "usd", ORDER["customer"], idempotency_key=key)
except ConnectionError as error:
    print("  ✗", error)
    raise  # the step fails this attempt; --retries runs it again
print("  charged:", charge.id)

# %%
print(f"charges made: {len(payments.charges)} · total: ${payments.total_charged('cus_42') / 100:.2f}")

# %% [markdown]
# ## 4. The window between acting and recording
#
# Durable steps record their outcome *after* the body finishes. So there is always a window:
# the charge went through, then the process died before the step was recorded. On the re-run,
# the step executes again and charges again — unless the service recognises the key.
#
# `nbagent.once(label, fn, ...)` (or the decorator `@nbagent.effect`) narrows the window and
# makes it visible. It calls `fn(key, ...)` at most once per key and records the outcome on its
# own, right after the call — so a step that fails *later* (a timeout in the next LLM call) gets
# the recorded charge back on its retry without calling the service. And because `fn` receives
# the key, it passes it on: if the process dies inside the window, the service de-duplicates.
#
# Here is the window, measured. A tiny agent in plain Python (`nbagent.Run` and `@run.step`, the
# same engine as `%%step`) charges through `@nbagent.effect`, with the fake service's state in a
# file so it survives processes. The first process is killed with `SIGKILL` right after the
# charge is made — inside the window. The second process re-runs the agent.

# %%
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

work = Path(tempfile.mkdtemp(prefix="lesson02-"))
agent = work / "checkout_agent.py"
agent.write_text(textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import nbagent

    run = nbagent.Run("checkout", store=Path(sys.argv[1]) / "store")
    payments = nbagent.FakePayments(Path(sys.argv[1]) / "payments.json")

    @nbagent.effect("card")
    def charge_card(key, amount_cents, customer):
        charge = payments.charge(amount_cents, "usd", customer, idempotency_key=key)
        if not Path(sys.argv[1], "crashed-once").exists():
            Path(sys.argv[1], "crashed-once").touch()
            os.kill(os.getpid(), signal.SIGKILL)  # charged, but not recorded yet
        return charge.id

    @run.step("charge")
    def charge(order):
        return charge_card(order["amount_cents"], order["customer"])

    print("charge id:", charge({"amount_cents": 5000, "customer": "cus_42"}))
'''))

for attempt in (1, 2):
    done = subprocess.run([sys.executable, str(agent), str(work)], capture_output=True, text=True)
    outcome = "killed by SIGKILL" if done.returncode == -9 else f"exit code {done.returncode}"
    printed = done.stdout.strip()
    print(f"process {attempt}: {outcome}" + (f" · it printed: {printed}" if printed else ""))

state = nbagent.FakePayments(work / "payments.json")
print(f"charges made: {len(state.charges)} · total: ${state.total_charged('cus_42') / 100:.2f}")

# the agent's trace, read from its store: one row per call of the effect
agent_run = nbagent.Run("checkout", store=work / "store", activate=False)
effects = agent_run.trace().query("kind == 'effect'")
effects[["step", "name", "status", "idempotency_key", "detail"]]

# %% [markdown]
# One charge. The first process died inside the window: the charge existed, nothing was
# recorded. The second process executed the step again, `once` found a `started` record without
# a `done` — the trace row says `after_crash_window: true` — and called the service again **with
# the same key**; the service answered with the original charge. Without the key, that re-run
# would have been the second $50.
#
# Before you rely on a key, check that the API you call honours one (Stripe's `idempotency_key`,
# an `Idempotency-Key` header) and for how long it remembers it (Stripe: 24 hours). Where an API
# has none, record the action with `nbagent.once` and keep the window small. nbagent's own LLM
# client sends an `Idempotency-Key` header on every request, derived the same way.

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom; decide for yourself first, then
# compare. The cell checks them against what happened above.
#
# 1. Retried without a key after a lost response, how many charges does one order make? (number)
# 2. Which key survives a retry, a re-run and a crash?
#    (a) `str(uuid.uuid4())` made in the step  (b) `nbagent.idempotency_key("card")`
#    (c) the current time
# 3. A step re-runs with `--rerun` and charges with the same derived key. Total charged for the
#    order, in USD? (number)

# %%
answers = {1: 2, 2: "b", 3: 50}  # <- your answers

naive = nbagent.FakePayments(fail_after_charge_once=True)
for _ in (1, 2):
    try:
        naive.charge(5000, "usd", "cus_42")
        break
    except ConnectionError:
        pass
assert answers[1] == len(naive.charges), "Q1: the first charge went through; the retry is a new one."
assert answers[2] == "b", "Q2: derived from run, step and label: the same on every execution."
assert answers[3] == payments.total_charged("cus_42") / 100, "Q3: same key, same charge: $50 once."
print("All correct.")
