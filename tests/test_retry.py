"""The retry table, the circuit breaker and the driver, with a fake clock and no real sleeps."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import httpx2
import openai
import pytest
import requests
import tenacity
from tenacity import stop_after_attempt

from nbagent._errors import (
    CapExceeded,
    CircuitOpenError,
    RunStopped,
    StepError,
    StepLockedError,
    ToolSchemaError,
)
from nbagent._retry import (
    DEFAULT_POLICY,
    TIME_SCALE_ENV,
    AsyncRetrier,
    AttemptInfo,
    BreakerOpenError,
    CircuitBreaker,
    ResponseStatusError,
    Retrier,
    RetryPolicyError,
    Rule,
    ToolValidationError,
    acall_with_policy,
    breaker_for,
    call_with_policy,
    classify,
    reset_breakers,
    retry_after_seconds,
    step_policy,
    time_scale_from_env,
    validate_tool_arguments,
    wait_retry_after,
)

URL = "https://llm.example.test/v1/chat/completions"
REQ = httpx2.Request("POST", URL)


# --------------------------------------------------------------------------- helpers


def response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, request=REQ, headers=headers or {})


def rate_limit(headers: dict[str, str] | None = None) -> openai.RateLimitError:
    return openai.RateLimitError("rate limited", response=response(429, headers), body=None)


def status_error(status: int) -> openai.APIStatusError:
    classes: dict[int, type[openai.APIStatusError]] = {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        403: openai.PermissionDeniedError,
        404: openai.NotFoundError,
        422: openai.UnprocessableEntityError,
        429: openai.RateLimitError,
    }
    cls = classes.get(
        status, openai.InternalServerError if status >= 500 else openai.APIStatusError
    )
    return cls(f"HTTP {status}", response=response(status), body=None)


class Flaky:
    """Raises the given exceptions in order, then returns ``result``."""

    def __init__(self, *errors: BaseException | Callable[[], BaseException], result: Any = "ok"):
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            err = self.errors.pop(0)
            raise err() if callable(err) and not isinstance(err, BaseException) else err
        return self.result


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.infos: list[AttemptInfo] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    def retrier(self, policy: Any = None, **kw: Any) -> Retrier:
        kw.setdefault("time_scale", 1.0)
        return Retrier(policy, sleep=self.sleep, on_attempt=self.infos.append, **kw)

    @property
    def waits(self) -> list[float | None]:
        return [i.wait_s for i in self.infos]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIME_SCALE_ENV, raising=False)
    reset_breakers()


# --------------------------------------------------------------------------- timeouts / connection

TIMEOUTS: list[Callable[[], BaseException]] = [
    lambda: openai.APITimeoutError(REQ),
    lambda: httpx2.ReadTimeout("read timed out", request=REQ),
    lambda: httpx2.ConnectTimeout("connect timed out", request=REQ),
    lambda: httpx.ReadTimeout("read timed out"),
    lambda: requests.exceptions.ReadTimeout("read timed out"),
    lambda: requests.exceptions.ConnectTimeout("connect timed out"),
    lambda: TimeoutError("socket timed out"),
]
CONNECTION: list[Callable[[], BaseException]] = [
    lambda: openai.APIConnectionError(request=REQ),
    lambda: httpx2.ConnectError("refused", request=REQ),
    lambda: httpx2.RemoteProtocolError("server hung up", request=REQ),
    lambda: httpx.ConnectError("refused"),
    lambda: requests.exceptions.ConnectionError("refused"),
    lambda: ConnectionResetError("reset by peer"),
]


@pytest.mark.parametrize("make", TIMEOUTS)
def test_timeout_retried_3x_with_1_5_30(make: Callable[[], BaseException]) -> None:
    rec = Recorder()
    fn = Flaky(*(make() for _ in range(10)))
    with pytest.raises(type(make())) as info:
        rec.retrier()(fn)
    assert not isinstance(info.value, tenacity.RetryError)
    assert fn.calls == 4
    assert rec.sleeps == [1, 5, 30]
    assert rec.waits == [1, 5, 30, None]
    assert [i.rule for i in rec.infos] == ["timeout"] * 4
    assert [i.will_retry for i in rec.infos] == [True, True, True, False]
    assert [i.attempt for i in rec.infos] == [1, 2, 3, 4]


@pytest.mark.parametrize("make", CONNECTION)
def test_connection_error_retried_like_timeout(make: Callable[[], BaseException]) -> None:
    rec = Recorder()
    fn = Flaky(*(make() for _ in range(10)))
    with pytest.raises(type(make())):
        rec.retrier()(fn)
    assert fn.calls == 4
    assert rec.sleeps == [1, 5, 30]
    assert rec.infos[0].rule == "connection"


def test_timeout_then_success_returns_value() -> None:
    rec = Recorder()
    fn = Flaky(TimeoutError(), TimeoutError(), result=42)
    assert rec.retrier()(fn) == 42
    assert rec.sleeps == [1, 5]
    assert [i.outcome for i in rec.infos] == ["error", "error", "ok"]


def test_waits_are_counted_per_rule() -> None:
    """A 503 between two timeouts does not advance the timeout's backoff chain."""
    rec = Recorder()
    fn = Flaky(TimeoutError(), status_error(503), TimeoutError(), result="done")
    assert rec.retrier()(fn) == "done"
    assert rec.sleeps == [1, 1, 5]
    assert [i.rule_attempt for i in rec.infos[:3]] == [1, 1, 2]


# --------------------------------------------------------------------------- rate limits


def test_retry_after_ms_honoured() -> None:
    rec = Recorder()
    fn = Flaky(rate_limit({"retry-after-ms": "2500", "retry-after": "9"}))
    assert rec.retrier()(fn) == "ok"
    assert rec.sleeps == [2.5]
    assert rec.infos[0].rule == "rate_limit"


def test_retry_after_seconds_honoured() -> None:
    rec = Recorder()
    assert rec.retrier()(Flaky(rate_limit({"retry-after": "7"}))) == "ok"
    assert rec.sleeps == [7]


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 12, tz=timezone.utc), usegmt=True)
    exc = rate_limit({"retry-after": date})
    assert retry_after_seconds(exc, now=lambda: now) == pytest.approx(12)
    rs = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    rs.outcome = tenacity.Future.construct(1, exc, True)
    assert wait_retry_after(now=lambda: now)(rs) == pytest.approx(12)
    past = format_datetime(datetime.fromtimestamp(now - 60, tz=timezone.utc), usegmt=True)
    assert retry_after_seconds(rate_limit({"retry-after": past}), now=lambda: now) == 0


def test_rate_limit_without_header_waits_1s_and_stops_after_5() -> None:
    rec = Recorder()
    fn = Flaky(*(rate_limit() for _ in range(10)))
    with pytest.raises(openai.RateLimitError):
        rec.retrier()(fn)
    assert fn.calls == 5
    assert rec.sleeps == [1, 1, 1, 1]


def test_retry_after_attribute_for_non_http_errors() -> None:
    class Throttled(Exception):
        status_code = 429
        retry_after = 3.0

    rec = Recorder()
    assert rec.retrier()(Flaky(Throttled())) == "ok"
    assert rec.sleeps == [3.0]


def test_huge_retry_after_is_clamped() -> None:
    rec = Recorder()
    rec.retrier()(Flaky(rate_limit({"retry-after": "86400"})))
    assert rec.sleeps == [120.0]


# --------------------------------------------------------------------------- 5xx


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_error_retried_3x(status: int) -> None:
    rec = Recorder()
    fn = Flaky(*(status_error(status) for _ in range(10)))
    with pytest.raises(openai.InternalServerError):
        rec.retrier()(fn)
    assert fn.calls == 4
    assert rec.sleeps == [1, 5, 30]


def test_two_503_in_one_call_alert_once() -> None:
    rec = Recorder()
    fn = Flaky(status_error(503), status_error(503), status_error(503), result="ok")
    assert rec.retrier()(fn) == "ok"
    assert [i.alert for i in rec.infos] == [None, "repeated 503", None, None]


def test_one_503_or_other_5xx_no_alert() -> None:
    rec = Recorder()
    rec.retrier()(Flaky(status_error(503), status_error(500), status_error(502)))
    assert all(i.alert is None for i in rec.infos)


# --------------------------------------------------------------------------- 4xx / auth


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_client_error_not_retried_original_type(status: int) -> None:
    rec = Recorder()
    err = status_error(status)
    fn = Flaky(err)
    with pytest.raises(type(err)) as info:
        rec.retrier()(fn)
    assert info.value is err
    assert fn.calls == 1
    assert rec.sleeps == []
    assert rec.infos[0].rule == "client_error" and rec.infos[0].stop_run is None


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_stops_run_without_retry(status: int) -> None:
    rec = Recorder()
    err = status_error(status)
    fn = Flaky(err)
    with pytest.raises(type(err)):
        rec.retrier()(fn)
    assert fn.calls == 1 and rec.sleeps == []
    (info,) = rec.infos
    assert info.rule == "auth" and info.action == "stop_run"
    assert info.stop_run is not None and info.stop_run.startswith("auth failure: ")
    assert type(err).__name__ in info.stop_run
    assert info.alert == "auth failure"
    assert not info.will_retry


# --------------------------------------------------------------------------- tool schema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city"],
    "additionalProperties": False,
}


def test_tool_schema_one_retry_with_feedback() -> None:
    messages: list[dict[str, str]] = [{"role": "user", "content": "weather?"}]
    replies = iter(['{"city": 3}', '{"city": "Oslo"}'])
    sent: list[int] = []

    def once() -> dict[str, Any]:
        sent.append(len(messages))
        return validate_tool_arguments(next(replies), SCHEMA, tool_name="get_weather")

    def on_attempt(info: AttemptInfo) -> None:
        if info.feedback and info.will_retry:
            messages.append({"role": "user", "content": info.feedback})

    args = call_with_policy(once, on_attempt=on_attempt, sleep=lambda s: None, time_scale=1)
    assert args == {"city": "Oslo"}
    assert sent == [1, 2]  # the retry saw the feedback message
    assert "get_weather" in messages[1]["content"]
    assert "$.city" in messages[1]["content"] and "string" in messages[1]["content"]


def test_tool_schema_exactly_one_retry() -> None:
    rec = Recorder()
    fn = Flaky(*(ToolSchemaError("bad args") for _ in range(5)))
    with pytest.raises(ToolSchemaError):
        rec.retrier()(fn)
    assert fn.calls == 2
    assert rec.sleeps == [0]
    assert [i.rule for i in rec.infos] == ["tool_schema", "tool_schema"]
    assert isinstance(rec.infos[0].exception, ToolSchemaError)
    assert rec.infos[0].feedback and "bad args" in rec.infos[0].feedback


@pytest.mark.parametrize("use_jsonschema", [True, False])
def test_validate_tool_arguments(monkeypatch: pytest.MonkeyPatch, use_jsonschema: bool) -> None:
    if not use_jsonschema:
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # import fails -> subset validator
    ok = validate_tool_arguments('{"city": "Oslo", "days": 2, "tags": ["a"]}', SCHEMA)
    assert ok == {"city": "Oslo", "days": 2, "tags": ["a"]}

    cases = {
        '{"city": "Oslo"': ["not valid JSON"],
        '{"days": 2}': ["'city'", "required"],
        '{"city": "Oslo", "days": "two"}': ["$.days", "integer"],
        '{"city": "Oslo", "unit": "k"}': ["$.unit", "'c'"],
        '{"city": "Oslo", "zip": 1}': ["zip"],
        '{"city": "Oslo", "tags": [1]}': ["$.tags[0]", "string"],
        '["Oslo"]': ["object"],
    }
    for raw, needles in cases.items():
        with pytest.raises(ToolValidationError) as info:
            validate_tool_arguments(raw, SCHEMA, tool_name="get_weather")
        err = info.value
        assert isinstance(err, ToolSchemaError)
        assert err.tool_name == "get_weather" and err.arguments == raw and err.errors
        for needle in needles:
            assert needle in str(err), (raw, str(err))
        assert "get_weather" in err.feedback


def test_validate_tool_arguments_no_schema_type_requires_object() -> None:
    with pytest.raises(ToolValidationError, match="JSON object"):
        validate_tool_arguments("3", {})


# --------------------------------------------------------------------------- never retried / unknown


@pytest.mark.parametrize(
    "err",
    [KeyboardInterrupt(), CapExceeded("cap"), RunStopped("stopped"), StepLockedError("locked")],
)
def test_never_retried_by_any_policy(err: BaseException) -> None:
    permissive = DEFAULT_POLICY.override({"unknown": {"action": "retry", "retries": 5}})
    permissive = permissive.without("never_retry")
    for policy in (DEFAULT_POLICY, step_policy(5), permissive):
        rec = Recorder()
        fn = Flaky(err)
        with pytest.raises(type(err)):
            rec.retrier(policy)(fn)
        assert fn.calls == 1 and rec.sleeps == []
        assert rec.infos[0].rule == "never_retry"


def test_unknown_error_surfaces_for_llm_calls() -> None:
    rec = Recorder()
    fn = Flaky(ValueError("boom"))
    with pytest.raises(ValueError):
        rec.retrier()(fn)
    assert fn.calls == 1 and rec.infos[0].rule == "unknown"


def test_step_policy_retries_unknown_with_timeout_backoff() -> None:
    rec = Recorder()
    fn = Flaky(*(ValueError("flaky scrape") for _ in range(10)))
    with pytest.raises(ValueError):
        rec.retrier(step_policy(3))(fn)
    assert fn.calls == 4
    assert rec.sleeps == [1, 5, 30]


def test_step_policy_n_retries_is_total_cap() -> None:
    rec = Recorder()
    fn = Flaky(*(TimeoutError() for _ in range(10)))
    with pytest.raises(TimeoutError):
        rec.retrier(step_policy(5))(fn)
    assert fn.calls == 6
    assert rec.sleeps == [1, 5, 30, 30, 30]
    rec = Recorder()
    fn = Flaky(ValueError(), TimeoutError(), status_error(503), ValueError())
    with pytest.raises(openai.InternalServerError):
        rec.retrier(step_policy(2))(fn)
    assert fn.calls == 3


@pytest.mark.parametrize(
    "err",
    [
        status_error(400),
        status_error(401),
        SyntaxError("bad"),
        NameError("x"),
        ModuleNotFoundError("nope"),
        StepError("dup"),
        CircuitOpenError("open"),
    ],
)
def test_step_policy_does_not_retry(err: BaseException) -> None:
    rec = Recorder()
    fn = Flaky(err)
    with pytest.raises(type(err)):
        rec.retrier(step_policy(3))(fn)
    assert fn.calls == 1


def test_step_policy_zero_retries_and_bad_args() -> None:
    fn = Flaky(ValueError())
    with pytest.raises(ValueError):
        Retrier(step_policy(0), sleep=lambda s: None)(fn)
    assert fn.calls == 1
    with pytest.raises(StepError):
        step_policy(-1)
    with pytest.raises(StepError):
        step_policy(1, timeout=0)


def test_step_policy_timeout_budget() -> None:
    rec = Recorder()
    fn = Flaky(*(ValueError() for _ in range(10)))
    with pytest.raises(ValueError):
        rec.retrier(step_policy(10, timeout=3.0))(fn)
    # 1 s backoff fits in 3 s; the next one (5 s) would end after the budget.
    assert fn.calls == 2 and rec.sleeps == [1]


def test_step_policy_decide_for_engine_loops() -> None:
    policy = step_policy(2)
    d1 = policy.decide(TimeoutError(), 1)
    assert d1.retry and d1.wait_s == 1 and d1.rule == "timeout"
    assert policy.decide(TimeoutError(), 2).wait_s == 5
    assert not policy.decide(TimeoutError(), 3).retry
    auth = policy.decide(status_error(401), 1)
    assert not auth.retry and auth.stop_run and auth.wait_s is None
    assert not policy.decide(KeyboardInterrupt(), 1).retry
    slept: list[float] = []
    policy.sleep(5, sleep=slept.append)
    assert slept == [5]


# --------------------------------------------------------------------------- time scale


def test_time_scale_env_zero_sleeps_zero_but_reports_policy_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "0")
    sleeps: list[float] = []
    infos: list[AttemptInfo] = []
    fn = Flaky(TimeoutError(), TimeoutError(), TimeoutError())
    Retrier(sleep=sleeps.append, on_attempt=infos.append)(fn)
    assert sleeps == [0, 0, 0]
    assert [i.wait_s for i in infos[:3]] == [1, 5, 30]
    assert [i.sleep_s for i in infos[:3]] == [0, 0, 0]


def test_time_scale_param_and_bad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    rec.retrier(time_scale=0.5)(Flaky(TimeoutError(), TimeoutError()))
    assert rec.sleeps == [0.5, 2.5]
    monkeypatch.setenv(TIME_SCALE_ENV, "fast")
    with pytest.warns(RuntimeWarning, match=TIME_SCALE_ENV):
        assert time_scale_from_env() == 1.0
    assert time_scale_from_env({TIME_SCALE_ENV: "0.1"}) == 0.1


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_5_consecutive_429_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(URL, clock=clock)
    rec = Recorder()
    retrier = rec.retrier(breaker=breaker)
    fn = Flaky(*(rate_limit() for _ in range(10)))
    with pytest.raises(openai.RateLimitError):
        retrier(fn)
    assert fn.calls == 5
    assert breaker.state == "open" and breaker.consecutive_failures == 5
    assert breaker.opened_at == clock()
    assert rec.infos[-1].alert == f"circuit open: {URL}"
    assert rec.infos[-1].breaker is not None and rec.infos[-1].breaker.state == "open"

    clock.advance(10)
    fresh = Flaky()
    with pytest.raises(CircuitOpenError) as info:
        retrier(fresh)
    assert fresh.calls == 0
    msg = str(info.value)
    assert URL in msg and "20.0 s" in msg and "429" in msg
    assert isinstance(info.value, BreakerOpenError) and info.value.retry_in_s == pytest.approx(20)
    assert rec.infos[-1].rule == "circuit_open" and not rec.infos[-1].will_retry


def test_breaker_half_open_one_trial_then_close() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(URL, clock=clock, cooldown_s=30)
    for _ in range(5):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state == "open"
    clock.advance(29.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open"

    breaker.before_call()  # the single trial call
    with pytest.raises(CircuitOpenError, match="trial"):
        breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    assert breaker.opened_at is None
    breaker.before_call()


def test_breaker_half_open_failure_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(URL, clock=clock)
    rec = Recorder()
    retrier = rec.retrier(breaker=breaker)
    with pytest.raises(openai.RateLimitError):
        retrier(Flaky(*(rate_limit() for _ in range(5))))
    clock.advance(30)
    assert breaker.state == "half_open"
    trial = Flaky(rate_limit(), rate_limit())
    with pytest.raises(openai.RateLimitError):
        retrier(trial)
    assert trial.calls == 1  # failure re-opened the circuit: no second attempt
    assert breaker.state == "open" and breaker.opened_at == clock()
    clock.advance(30)
    assert retrier(Flaky(result="back")) == "back"
    assert breaker.state == "closed"


def test_breaker_counts_only_consecutive_429() -> None:
    breaker = CircuitBreaker(URL, clock=FakeClock())
    rec = Recorder()
    retrier = rec.retrier(breaker=breaker)
    retrier(Flaky(*(rate_limit() for _ in range(4))))  # 4 x 429, then success resets
    assert breaker.consecutive_failures == 0 and breaker.state == "closed"
    retrier(Flaky(rate_limit(), rate_limit(), TimeoutError(), rate_limit()))
    assert breaker.state == "closed"


def test_breaker_cooldown_not_time_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "0")
    clock = FakeClock()
    breaker = CircuitBreaker(URL, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(1)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()


def test_breaker_thread_safe() -> None:
    breaker = CircuitBreaker(URL, threshold=10_000, clock=FakeClock())

    def hammer() -> None:
        for _ in range(500):
            breaker.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.consecutive_failures == 4000


def test_breaker_registry_per_endpoint() -> None:
    a = breaker_for("https://a.test/v1")
    assert breaker_for("https://a.test/v1") is a
    assert breaker_for("https://b.test/v1") is not a
    snap = a.snapshot()
    assert snap.state == "closed" and snap.endpoint == "https://a.test/v1"


# --------------------------------------------------------------------------- driver forms


def test_iterator_form_retries_block() -> None:
    rec = Recorder()
    fn = Flaky(TimeoutError(), TimeoutError(), result="x")
    numbers = []
    result = None
    for attempt in rec.retrier(step_policy(3)).attempts():
        with attempt:
            numbers.append(attempt.number)
            result = fn()
    assert result == "x" and numbers == [1, 2, 3]
    assert rec.sleeps == [1, 5]


def test_iterator_form_reraises_original() -> None:
    rec = Recorder()
    with pytest.raises(openai.BadRequestError):
        for attempt in rec.retrier().attempts():
            with attempt:
                raise status_error(400)
    with pytest.raises(TimeoutError):
        for attempt in rec.retrier(step_policy(1)).attempts():
            with attempt:
                raise TimeoutError()


def test_iterator_form_keyboard_interrupt() -> None:
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        for attempt in Retrier(step_policy(5), sleep=lambda s: None).attempts():
            with attempt:
                calls += 1
                raise KeyboardInterrupt
    assert calls == 1


def test_async_call_and_iterator() -> None:
    sleeps: list[float] = []
    infos: list[AttemptInfo] = []

    async def asleep(s: float) -> None:
        sleeps.append(s)

    state = {"n": 0}

    async def call() -> str:
        state["n"] += 1
        if state["n"] < 3:
            raise openai.APITimeoutError(REQ)
        return "async ok"

    async def main() -> None:
        assert (
            await acall_with_policy(call, sleep=asleep, on_attempt=infos.append, time_scale=1)
            == "async ok"
        )
        r = AsyncRetrier(step_policy(2), sleep=sleeps.append, time_scale=1)
        seen = []
        with pytest.raises(ValueError):
            async for attempt in r.attempts():
                with attempt:
                    seen.append(attempt.number)
                    raise ValueError("x")
        assert seen == [1, 2, 3]
        with pytest.raises(openai.AuthenticationError):
            await AsyncRetrier(sleep=asleep)(Flaky(status_error(401)))

    asyncio.run(main())
    assert sleeps == [1, 5, 1, 5]
    assert [i.outcome for i in infos] == ["error", "error", "ok"]


def test_transport_style_response_status_error() -> None:
    """A transport raises ResponseStatusError for 429/5xx and returns the last response."""
    responses = [response(429, {"retry-after": "2"}), response(503), response(200)]
    rec = Recorder()

    def send_once() -> httpx2.Response:
        resp = responses.pop(0)
        if resp.status_code >= 400:
            raise ResponseStatusError(resp)
        return resp

    assert rec.retrier()(send_once).status_code == 200
    assert rec.sleeps == [2, 1]
    assert [i.rule for i in rec.infos] == ["rate_limit", "server_error", None]

    final = [response(400)]

    def send_bad() -> httpx2.Response:
        raise ResponseStatusError(final[0])

    with pytest.raises(ResponseStatusError) as info:
        rec.retrier()(send_bad)
    assert info.value.response.status_code == 400


def test_real_openai_client_through_mock_transport() -> None:
    """The real SDK raises the exceptions; the policy classifies and retries them."""
    statuses = [429, 500, 200]
    seen: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        status = statuses.pop(0)
        seen.append(status)
        if status != 200:
            return httpx2.Response(
                status, json={"error": {"message": "nope"}}, headers={"retry-after-ms": "1500"}
            )
        body = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"},
                }
            ],
        }
        return httpx2.Response(200, json=body)

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="https://llm.example.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    rec = Recorder()
    out = rec.retrier(breaker=breaker_for(str(client.base_url)))(
        lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    )
    assert out.choices[0].message.content == "hi"
    assert seen == [429, 500, 200]
    assert rec.sleeps == [1.5, 1]
    assert [type(i.exception).__name__ for i in rec.infos[:2]] == [
        "RateLimitError",
        "InternalServerError",
    ]


# --------------------------------------------------------------------------- policy as data


def test_policy_replace_and_overrides_are_immutable() -> None:
    p = DEFAULT_POLICY.replace("timeout", stop=stop_after_attempt(2))
    rec = Recorder()
    fn = Flaky(*(TimeoutError() for _ in range(5)))
    with pytest.raises(TimeoutError):
        rec.retrier(p)(fn)
    assert fn.calls == 2
    assert DEFAULT_POLICY["timeout"].stop is not p["timeout"].stop

    rec = Recorder()
    fn = Flaky(*(TimeoutError() for _ in range(5)))
    with pytest.raises(TimeoutError):
        rec.retrier({"timeout": {"retries": 3, "waits": [2, 4]}})(fn)
    assert rec.sleeps == [2, 4, 4]

    with pytest.raises(RetryPolicyError, match="no rule 'timeouts'"):
        DEFAULT_POLICY.replace("timeouts", retries=1)
    with pytest.raises(RetryPolicyError):
        DEFAULT_POLICY.replace("timeout", colour="red")
    with pytest.raises(RetryPolicyError):
        Rule("x", (ValueError,), "explode")  # type: ignore[arg-type]


def test_policy_with_jitter_and_custom_rule() -> None:
    p = DEFAULT_POLICY.with_jitter(0.5)
    rec = Recorder()
    with pytest.raises(TimeoutError):
        rec.retrier(p)(Flaky(*(TimeoutError() for _ in range(5))))
    for got, base in zip(rec.sleeps, [1, 5, 30], strict=True):
        assert base <= got <= base + 0.5

    class Flake(Exception):
        pass

    p = DEFAULT_POLICY.override(
        {"flake": Rule("flake", (Flake,), "retry", stop=stop_after_attempt(3))}
    )
    assert classify(Flake(), p).name == "flake"
    rec = Recorder()
    with pytest.raises(Flake):
        rec.retrier(p)(Flaky(*(Flake() for _ in range(5))))
    assert len(rec.infos) == 3


def test_classification_table() -> None:
    expected: dict[str, list[BaseException]] = {
        "timeout": [openai.APITimeoutError(REQ), httpx2.PoolTimeout("p"), TimeoutError()],
        "connection": [openai.APIConnectionError(request=REQ), ConnectionRefusedError()],
        "rate_limit": [rate_limit()],
        "server_error": [status_error(500), status_error(503)],
        "client_error": [status_error(400), status_error(404), status_error(422)],
        "auth": [status_error(401), status_error(403)],
        "tool_schema": [ToolSchemaError("x")],
        "circuit_open": [CircuitOpenError("x")],
        "never_retry": [KeyboardInterrupt(), CapExceeded("x")],
        "unknown": [ValueError(), RuntimeError()],
    }
    for name, errors in expected.items():
        for err in errors:
            assert classify(err).name == name, (name, err)
    assert "timeout" in str(DEFAULT_POLICY)
    assert json.dumps(DEFAULT_POLICY.describe())


def test_async_breaker_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(URL, threshold=2, clock=clock)
    calls = {"n": 0}

    async def limited() -> None:
        calls["n"] += 1
        raise rate_limit()

    async def main() -> None:
        r = AsyncRetrier(sleep=lambda s: None, breaker=breaker)
        with pytest.raises(openai.RateLimitError):
            await r(limited)
        assert calls["n"] == 2 and breaker.state == "open"
        with pytest.raises(CircuitOpenError):
            await r(limited)
        assert calls["n"] == 2

    asyncio.run(main())


def test_policy_with_rule_before_and_only() -> None:
    class Flake(Exception):
        pass

    p = DEFAULT_POLICY.with_rule(Rule("flake", (Flake,), "retry"), before="timeout")
    assert p.names.index("flake") == p.names.index("timeout") - 1
    feedback_only = DEFAULT_POLICY.only("tool_schema")
    assert classify(TimeoutError(), feedback_only).name == "unknown"
    assert classify(ToolSchemaError("x"), feedback_only).name == "tool_schema"
    with pytest.raises(RetryPolicyError):
        DEFAULT_POLICY.with_rule(Rule("flake", (Flake,)), before="nope")
