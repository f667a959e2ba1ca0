"""``NBAGENT_SIM_LATENCY_S``: the default simulated client takes its time (lesson 6 crashes a
headless run mid-step with it)."""

from __future__ import annotations

import pytest

import nbagent


def test_sim_latency_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("NBAGENT_SIM_LATENCY_S", "0.25")
    assert nbagent.default_client().nbagent_sim.latency_s == 0.25
    assert nbagent.default_client(latency_s=0).nbagent_sim.latency_s == 0  # an explicit value wins
    monkeypatch.setenv("NBAGENT_SIM_LATENCY_S", "soon")
    with pytest.raises(nbagent.NbagentError, match="NBAGENT_SIM_LATENCY_S='soon'"):
        nbagent.default_client()
    monkeypatch.delenv("NBAGENT_SIM_LATENCY_S")
    assert nbagent.default_client().nbagent_sim.latency_s == 0
