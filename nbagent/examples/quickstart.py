"""Quickstart: a research agent as durable steps on a cost-capped run.

    python -m nbagent demo                  # headless, with terminal progress
    python nbagent/examples/quickstart.py   # the same agent, as plain Python

plan -> research each sub-question -> synthesize. Each step is checkpointed
on disk: stop the agent (Ctrl-C, kill -9) and start it again, and the
completed steps replay from disk instead of calling the model again.
"""

from __future__ import annotations

import hashlib
import time

import nbagent

GOAL = "How do durable execution engines let long-running agents survive crashes?"
RUN_NAME = "quickstart"
#: seconds each simulated model call takes, so there is time to interrupt the run
THINK_S = 0.3

run = nbagent.Run(RUN_NAME, max_cost_usd=0.50, max_steps=20, max_llm_calls=20)


def ask_llm(prompt: str) -> str:
    """A deterministic stand-in for the model: the same prompt gives the same text.

    TODO(llm client): replace the body with a real call through nbagent's client
    (``nbagent.simulated_client()`` offline, ``nbagent.openai_client()`` with
    OPENAI_API_KEY), which reserves the worst-case cost against the run's cap,
    records tokens and cost in the trace, and never repeats a recorded call.
    """
    time.sleep(THINK_S)
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    if prompt.startswith("Split"):
        return "\n".join(
            [
                "What state must a step checkpoint to be replayable?",
                "How does an engine tell a finished step from an interrupted one?",
                "What keeps a side effect from happening twice after a crash?",
            ]
        )
    if prompt.startswith("Answer"):
        return f"A short answer, grounded in the sources ({digest})."
    return f"Report: durable agents checkpoint each step and replay what finished ({digest})."


@run.step("plan")
def plan(goal: str) -> list[str]:
    """Split the goal into sub-questions."""
    return ask_llm(f"Split into 3 sub-questions, one a line: {goal}").splitlines()


@run.step("research", retries=2, timeout=60)
def research(question: str) -> str:
    """Answer one sub-question (one step per question: a crash loses at most one)."""
    return ask_llm(f"Answer briefly: {question}")


@run.step("synthesize")
def synthesize(goal: str, findings: list[str]) -> str:
    """Write the report from the findings."""
    notes = "\n".join(f"- {finding}" for finding in findings)
    return ask_llm(f"Write a report on {goal!r} from these notes:\n{notes}")


def main() -> str:
    questions = plan(GOAL)
    findings = [research(question) for question in questions]
    report = synthesize(GOAL, findings)
    print(report)
    return report


if __name__ == "__main__":
    main()
