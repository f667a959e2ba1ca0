"""The fake payments service: idempotency keys like Stripe's, fault injection, persistence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nbagent._errors import NbagentError
from nbagent._payments import Charge, FakePayments, IdempotencyError, PaymentError
from nbagent._retry import call_with_policy, step_policy


def test_same_key_same_params_returns_same_charge() -> None:
    pay = FakePayments(clock=lambda: 123.0)
    a = pay.charge(500, "usd", "cus_1", idempotency_key="order-1")
    b = pay.charge(500, "USD", "cus_1", idempotency_key="order-1")
    assert a == b
    assert a == Charge("ch_000001", 500, "usd", "cus_1", 123.0, "order-1")
    assert len(pay.charges) == 1
    assert pay.total_charged() == 500


def test_no_key_always_charges() -> None:
    pay = FakePayments()
    pay.charge(500, "usd", "cus_1")
    pay.charge(500, "usd", "cus_1")
    assert [c.id for c in pay.charges] == ["ch_000001", "ch_000002"]
    assert pay.total_charged("cus_1") == 1000
    assert pay.total_charged("cus_2") == 0


def test_key_reused_with_other_params_is_an_error() -> None:
    pay = FakePayments()
    pay.charge(500, "usd", "cus_1", idempotency_key="k")
    with pytest.raises(IdempotencyError) as info:
        pay.charge(700, "usd", "cus_1", idempotency_key="k")
    assert isinstance(info.value, NbagentError)
    msg = str(info.value)
    assert "'k'" in msg and "500 usd" in msg and "700 usd" in msg and "new key" in msg
    assert pay.total_charged() == 500


def test_invalid_requests() -> None:
    pay = FakePayments()
    for amount in (0, -5, 1.5, True):
        with pytest.raises(PaymentError):
            pay.charge(amount, "usd", "c")  # type: ignore[arg-type]
    with pytest.raises(PaymentError):
        pay.charge(100, "dollars", "c")
    assert pay.charges == []


def test_lost_response_retried_with_key_charges_once() -> None:
    pay = FakePayments(fail_after_charge_once=True)
    attempts: list[int] = []

    def pay_order() -> Charge:
        attempts.append(1)
        return pay.charge(2000, "eur", "cus_9", idempotency_key="order-9")

    charge = call_with_policy(pay_order, policy=step_policy(2), sleep=lambda s: None)
    assert len(attempts) == 2  # ConnectionError after the charge, then the retry
    assert charge.id == "ch_000001"
    assert pay.total_charged("cus_9") == 2000 and len(pay.charges) == 1


def test_lost_response_retried_without_key_double_charges() -> None:
    pay = FakePayments(fail_after_charge_once=True)
    call_with_policy(
        lambda: pay.charge(2000, "eur", "cus_9"), policy=step_policy(2), sleep=lambda s: None
    )
    assert pay.total_charged("cus_9") == 4000  # the bug the lesson is about


def test_persistence_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "pay" / "charges.json"
    first = FakePayments(path)
    first.charge(100, "usd", "a", idempotency_key="k1")
    first.charge(200, "usd", "b")
    second = FakePayments(path)
    assert second.charge(100, "usd", "a", idempotency_key="k1").id == "ch_000001"
    assert second.total_charged() == 300
    second.charge(50, "usd", "a")
    assert first.total_charged("a") == 150  # re-read from the file
    with pytest.raises(IdempotencyError):
        FakePayments(path).charge(999, "usd", "a", idempotency_key="k1")
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["charges"]) == 3
    assert [p.name for p in path.parent.iterdir()] == ["charges.json"]  # no temp files left


def test_bad_state_file(tmp_path: Path) -> None:
    path = tmp_path / "charges.json"
    path.write_text("{not json")
    with pytest.raises(PaymentError, match="Delete it"):
        FakePayments(path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(PaymentError, match="format"):
        FakePayments(path)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_no_double_charge_across_sigkill(tmp_path: Path) -> None:
    """A process charges and is killed before it can record success; its successor retries."""
    path = tmp_path / "charges.json"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from nbagent._payments import FakePayments
        pay = FakePayments({str(path)!r})
        pay.charge(1500, "usd", "cus_1", idempotency_key="run-1/step-pay")
        if sys.argv[1] == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        print(pay.total_charged("cus_1"))
        """
    )
    crashed = subprocess.run([sys.executable, "-c", script, "crash"], capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-c", script, "resume"], capture_output=True, text=True, check=True
    )
    assert resumed.stdout.strip() == "1500"
    assert len(FakePayments(path).charges) == 1
    assert os.path.exists(path)
