"""Quickstart: a research agent as durable steps on a cost-capped run.

    python -m nbagent demo                  # headless, with terminal progress
    python nbagent/examples/quickstart.py   # the same agent, as plain Python

plan -> research each sub-question -> synthesize. Each step is checkpointed
on disk: stop the agent (Ctrl-C, kill -9) and start it again, and the
completed steps replay from disk instead of calling the model again.
"""

from __future__ import annotations

import json

import nbagent

#: the research goal (a topic; the planner turns it into sub-questions)
GOAL = "crash recovery in long-running LLM agents"
RUN_NAME = "quickstart"
#: seconds each simulated model call takes, so there is time to interrupt the run
THINK_S = 0.3

run = nbagent.Run(RUN_NAME, max_cost_usd=0.50, max_steps=20, max_llm_calls=20)

#: the traced openai client: the real model with OPENAI_API_KEY, else the simulated LLM
#: (offline, priced as if real). Every call is reserved against the $0.50 cap, traced with its
#: tokens and cost, retried by policy, and answered from the ledger if a crashed step re-runs.
client = nbagent.default_client(run)
if getattr(client, "nbagent_sim", None) is not None:
    client.nbagent_sim.latency_s = THINK_S


def ask_llm(prompt: str) -> str:
    """One chat completion; ``max_tokens`` bounds the cost reserved against the cap."""
    response = client.chat.completions.create(
        model=client.nbagent_model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=300,
    )
    return response.choices[0].message.content or ""


@run.step("plan")
def plan(goal: str) -> list[str]:
    """Split the goal into sub-questions."""
    reply = ask_llm(f"Break this goal into 3 sub-questions, one per line.\nGoal: {goal}")
    return [line.split(". ", 1)[-1] for line in reply.splitlines() if line.strip()]


@run.step("research", retries=2, timeout=60)
def research(question: str) -> str:
    """Answer one sub-question (one step per question: a crash loses at most one)."""
    return ask_llm(f"Answer briefly, citing a source.\nQuestion: {question}")


@run.step("synthesize")
def synthesize(goal: str, findings: list[dict[str, str]]) -> str:
    """Write one cited answer from the findings."""
    return ask_llm(f"Write a cited final report.\nGoal: {goal}\nFindings: {json.dumps(findings)}")


def main() -> str:
    questions = plan(GOAL)
    findings = [{"question": q, "answer": research(q)} for q in questions]
    report = synthesize(GOAL, findings)
    print(report)
    return report


if __name__ == "__main__":
    main()
