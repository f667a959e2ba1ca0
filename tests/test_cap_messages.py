"""Wording of cap refusals and alerts as learners see them (lesson 5)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import nbagent


def test_llm_call_cap_message_reads_as_one_sentence() -> None:
    run = nbagent.Run("calls", max_llm_calls=0)
    with pytest.raises(nbagent.StepCapExceeded) as err:
        run.reserve(0.001, what="this gpt-4o-mini call")
    assert "possible loop: this gpt-4o-mini call was not sent." in str(err.value)


def test_an_alert_outside_a_step_names_no_step(caplog: Any) -> None:
    run = nbagent.Run("alerts")
    with caplog.at_level(logging.WARNING, logger="nbagent"):
        run.alert("cap", "refused")
    assert "nbagent alert [cap] run alerts: refused" in caplog.text
    assert "step None" not in caplog.text
