"""The retry table is overridden per run, per client and per call (innermost wins)."""

from __future__ import annotations

import openai
import pytest

import nbagent
from nbagent import SimulatedLLM, simulated_client


@pytest.fixture(autouse=True)
def no_backoff_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")


def ask(client: object) -> object:
    return client.chat.completions.create(  # type: ignore[attr-defined]
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )


def test_the_table_retries_a_timeout_three_times() -> None:
    nbagent.Run("layers")
    sim = SimulatedLLM(faults=["timeout"] * 3)
    ask(simulated_client(sim=sim))
    assert sim.request_count == 4


def test_a_run_override_applies_to_its_calls() -> None:
    nbagent.Run("layers", retry_policy={"timeout": {"retries": 1}})
    sim = SimulatedLLM(faults=["timeout"] * 3)
    with pytest.raises(openai.APITimeoutError):
        ask(simulated_client(sim=sim))
    assert sim.request_count == 2


def test_a_client_override_beats_the_run_and_a_block_beats_both() -> None:
    nbagent.Run("layers", retry_policy={"timeout": {"retries": 0}})
    sim = SimulatedLLM(faults=["timeout"] * 2)
    client = simulated_client(sim=sim, policy={"timeout": {"retries": 2}})
    ask(client)  # the client allows 2 retries: two timeouts, then the answer
    assert sim.request_count == 3

    sim.fail_next("timeout", times=2)
    with nbagent.retry_policy({"timeout": {"retries": 1}}), pytest.raises(openai.APITimeoutError):
        ask(client)  # only for the calls inside the block
    assert sim.request_count == 5
    sim.reset()
    sim.fail_next("timeout", times=2)
    ask(client)  # outside the block the client's policy holds again
    assert sim.request_count == 3


def test_a_bad_override_is_refused_before_any_call() -> None:
    with pytest.raises(nbagent.NbagentError), nbagent.retry_policy({"timeout": 3}):  # type: ignore[dict-item]
        pass
