# Lesson 04: observability. Source of notebooks/04-observability.ipynb (tools/build_lessons.py).

# %% [markdown]
# # Lesson 4 · Observability: every prompt, every token, every call
#
# **What you will see** (15 minutes)
#
# * A small agent that plans, calls a **tool**, and writes an answer — and the **trace table**
#   nbagent kept while it ran: one row per LLM call with its prompt, reply, tokens and cost, one
#   row per tool call with its arguments and result, one row per step.
# * The same trace as **plots** (spend against the cap, latency, tokens per step).
# * The trace leaving the notebook: as **JSON Lines** for any log pipeline, and as
#   **OpenTelemetry spans** with the standard GenAI attribute names that tracing back-ends
#   (Jaeger, Honeycomb, Datadog, Langfuse, ...) understand.
#
# > *Observability: every tool call, every prompt, every token logged.* When an agent misbehaves
# > at 3 AM, "what did it send, what came back, what did it cost" must be a query, not a guess.
#
# Nothing here is extra work for the agent: the trace is a by-product of calling the model
# through nbagent's client and of marking tools with `@nbagent.tool`.

# %% [markdown]
# ## 1. A run, a client and a tool
#
# `@nbagent.tool` turns an ordinary function into a **traced tool**: each call inside a run adds a
# trace row, and `.openai_tool` is the JSON schema the model needs (built from the signature and
# the docstring). The "search" here is a tiny offline index, so the lesson needs no network.

# %%
%load_ext nbagent
%nbagent start observability --cap-usd 0.50 --max-steps 20

# %%
import json

import nbagent

client = nbagent.default_client()
GOAL = "crash recovery in long-running LLM agents"

DOCS = {
    "crash": "On restart, completed steps return their recorded results instead of running.",
    "recovery": "Engines persist each step's result before starting the next step.",
    "side effect": "Side effects carry a key derived from workflow state: a retry is a no-op.",
}


@nbagent.tool
def search_docs(query: str, limit: int = 2) -> list[str]:
    """Search the engineering notes.

    Args:
        query: words to look for.
        limit: how many notes to return.
    """
    hits = [text for key, text in DOCS.items() if key in query.lower()]
    return hits[:limit]


print(json.dumps(search_docs.openai_tool, indent=2))

# %% [markdown]
# ## 2. The agent: plan, look something up, answer
#
# Three steps. In `lookup` the model is asked to call `search_docs` (`tool_choice="required"`);
# the step runs the call it asked for with `search_docs.call_json(...)`, which validates the
# model's arguments against the schema before the function runs.

# %%
%%step plan
reply = client.chat.completions.create(
    model=client.nbagent_model,
    max_tokens=200,
    messages=[{"role": "user", "content": f"Break this goal into 3 sub-questions, one per line.\nGoal: {GOAL}"}],
)
plan = [line.split(". ", 1)[-1] for line in reply.choices[0].message.content.splitlines()]
print("\n".join(plan))

# %%
%%step lookup
reply = client.chat.completions.create(
    model=client.nbagent_model,
    max_tokens=200,
    messages=[{"role": "user", "content": f"Search the notes for: {plan[0]}"}],
    tools=[search_docs.openai_tool],
    tool_choice="required",
)
call = reply.choices[0].message.tool_calls[0]
notes = search_docs.call_json(call.function.arguments)
print(f"the model called {call.function.name}({call.function.arguments})")
print(f"-> {len(notes)} notes")

# %%
%%step answer
reply = client.chat.completions.create(
    model=client.nbagent_model,
    max_tokens=300,
    messages=[{"role": "user", "content": f"Summarize for an engineer: {GOAL}\nNotes: {notes}"}],
)
answer = reply.choices[0].message.content
print(answer)

# %% [markdown]
# ## 3. The trace table
#
# `run.trace()` is a pandas DataFrame: one row per event, newest last. The `kind` column says
# what a row is — `llm` (one attempt of an LLM call), `tool`, `step` (a step starting, finishing,
# replaying), `cap`, `alert`, `effect`. Here are the columns you reach for first:

# %%
run = nbagent.current_run()
trace = run.trace()
print(len(trace), "rows; columns:", ", ".join(trace.columns))
trace[["step", "kind", "name", "status", "model", "input_tokens", "output_tokens", "cost_usd"]].convert_dtypes()

# %% [markdown]
# Every **prompt** and every **reply** is in the row of its call: `request` is the JSON body that
# was sent, `response` the JSON body that came back. "What exactly did we send?" has an answer:

# %%
first_llm = trace[trace.kind == "llm"].iloc[0]
print("REQUEST:", first_llm.request)
sent_back = json.loads(first_llm.response)
print("REPLY  :", sent_back["choices"][0]["message"]["content"][:120], "...")
print("USAGE  :", sent_back["usage"])

# %% [markdown]
# The **tool call** sits in the same trace, in the step that made it, with its arguments and its
# result:

# %%
tool_row = trace[trace.kind == "tool"].iloc[0]
print(tool_row.step, tool_row["name"], tool_row.status)
print("arguments:", tool_row.request)
print("result   :", tool_row.response)

# %% [markdown]
# Questions about the run are now one line of pandas. Tokens and cost per step:

# %%
calls = trace[trace.kind == "llm"]
calls.groupby("step", sort=False)[["input_tokens", "output_tokens", "cost_usd"]].sum().convert_dtypes()

# %% [markdown]
# In a notebook, `%nbagent trace --last N` gives the last rows of the same table (it also has
# timestamps and latencies, which we leave out here because they change on every run):

# %%
recent = %nbagent trace --last 4
recent[["step", "kind", "name", "status"]]

# %% [markdown]
# ## 4. Plots
#
# `%nbagent plot spend | latency | tokens` draws the run from its trace — so it works just as
# well for a run that finished yesterday or resumed after a crash. Spend is drawn against the cap
# line; each step is shaded.

# %%
%nbagent plot spend

# %%
%nbagent plot tokens

# %% [markdown]
# `%nbagent plot latency` shows how long each call took, by step (try it). The figures are
# ordinary matplotlib `Figure` objects: save one with `fig.savefig("spend.png")`.
#
# The **dashboard** under `%nbagent start` at the top of this notebook is the live view of the
# same data: in JupyterLab it updated while the steps ran (spend against the cap, each step, each
# call). Show it again anywhere with `%nbagent dashboard`; on GitHub you see its text summary as
# it was when it was displayed.

# %% [markdown]
# ## 5. Leaving the notebook: JSON Lines
#
# `nbagent.export_jsonl(run, path)` writes one JSON object per trace row — the format every log
# shipper (Vector, Fluent Bit, `jq`) reads. From a terminal: `nbagent trace RUN --format jsonl`.

# %%
import tempfile
from pathlib import Path

out = Path(tempfile.mkdtemp()) / "observability.jsonl"
nbagent.export_jsonl(run, out)
lines = out.read_text().splitlines()
print(len(lines), "lines, one per trace row")
row = json.loads(lines[1])
print({k: row[k] for k in ("run", "step", "kind", "model", "input_tokens", "output_tokens")})

# %% [markdown]
# ## 6. Leaving the notebook: OpenTelemetry
#
# `nbagent.export_otel(run, tracer_provider=...)` turns the trace into **OpenTelemetry spans**:
# one span for the run, one per step, one per LLM call and tool call, with the original
# timestamps. In production you would give it a provider with an OTLP exporter pointed at your
# collector; here an **in-memory exporter** lets us look at the spans.

# %%
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
nbagent.export_otel(run, tracer_provider=provider)

spans = exporter.get_finished_spans()


def print_tree(parent=None, indent=""):
    children = [s for s in spans if (s.parent and s.parent.span_id) == parent]
    for span in sorted(children, key=lambda s: s.start_time):
        print(indent + span.name)
        print_tree(span.context.span_id, indent + "  ")


print_tree()

# %% [markdown]
# The LLM spans carry the **GenAI semantic-convention** attributes (`gen_ai.*`), so a tracing
# back-end can chart tokens by model and errors by type without knowing anything about nbagent;
# nbagent adds its own (`nbagent.*`: run, step, attempt, cost).

# %%
chat = next(s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat")
for key in sorted(chat.attributes):
    if key.startswith("gen_ai.") or key == "nbagent.step":
        print(f"{key:40} {chat.attributes[key]}")
print(f"{'nbagent.cost_usd':40} {nbagent.format_usd(chat.attributes['nbagent.cost_usd'])}")

# %% [markdown]
# ## Self-check
#
# The answers are filled in so the notebook runs top to bottom. Cover them, decide for yourself,
# then compare — or change one to a wrong letter and run the cell to see the check explain why.
#
# 1. How many rows of kind `tool` does this run's trace have?
#    (a) none — tool calls are not LLM calls  (b) one, in the step `lookup`  (c) three
# 2. Which column answers "what exactly did we send the model?"
#    (a) `request`  (b) `model`  (c) `status`
# 3. How should AI output about observability — or anything else — be treated?
#    (a) as correct, it came from a large model
#    (b) as a claim to verify: the trace shows what was sent and returned, so check it there
# 4. Which OpenTelemetry attribute holds the number of output tokens of an LLM span?
#    (a) `gen_ai.usage.output_tokens`  (b) `nbagent.tokens`  (c) `llm.tokens.out`

# %%
answers = {1: "b", 2: "a", 3: "b", 4: "a"}  # <- your answers

tools = trace[trace.kind == "tool"]
assert answers[1] == "b" and list(tools.step) == ["lookup#1"], (
    "Q1: @nbagent.tool calls are traced like LLM calls, in the step that made them."
)
assert answers[2] == "a" and GOAL in first_llm.request, (
    "Q2: the request column holds the prompt that was sent."
)
assert answers[3] == "b", "Q3: verify — the trace is the record of what really happened."
assert answers[4] == "a" and "gen_ai.usage.output_tokens" in chat.attributes, (
    "Q4: the GenAI semantic conventions name it gen_ai.usage.output_tokens."
)
print("All correct.")
