"""Retry policies as data, a circuit breaker, and one driver for LLM calls and step bodies.

The lesson's retry table is a :class:`RetryPolicy`: an ordered tuple of :class:`Rule` objects
(first match wins), each built from tenacity ``stop``/``wait`` strategies. The driver
(:class:`Retrier`, :class:`AsyncRetrier`, :func:`call_with_policy`) runs a callable under a
policy on top of :class:`tenacity.Retrying`; it reports every attempt to ``on_attempt`` as an
:class:`AttemptInfo` and re-raises the *original* exception when it gives up.

Module order: constants and settings, errors, matchers, waits, rules and policies, the default
policy and the step policy, the circuit breaker, the driver, tool-argument validation.

Design choices (the *why*):

* **Per-rule attempt counting.** A rule's ``stop``/``wait`` see how many errors *that rule*
  matched in this call, not the call-wide attempt number: "retry timeouts 3x with 1 s, 5 s,
  30 s" stays exact when a 503 sits between two timeouts. The call-wide number is still what
  :class:`AttemptInfo` reports and what ``RetryPolicy.stop`` (a global cap) sees.
* **Unknown exceptions.** In :data:`DEFAULT_POLICY` (LLM calls) an exception no rule knows is
  surfaced at once: it is most likely a bug in our own code or in the caller's, and retrying a
  bug only burns money. :func:`step_policy` retries it with the timeout backoff instead: a step
  body is arbitrary user code (scrapers, flaky APIs) and ``--retries N`` is an explicit request.
* **Never retried, by any policy:** :data:`NEVER_RETRY` (``KeyboardInterrupt``, ``SystemExit``,
  ``asyncio.CancelledError``, :class:`~nbagent.CapExceeded`, :class:`~nbagent.RunStopped`,
  :class:`~nbagent.StepLockedError`). This is enforced by the driver, before the policy is read,
  so a user policy cannot turn it off by accident.
* **Lazy exception types.** openai, httpx2, httpx and requests types are looked up in
  ``sys.modules`` when an error is classified, never imported: an exception of a library that
  was never imported cannot exist, and importing openai costs ~0.5 s per kernel.
* **HTTP status by duck typing.** Any exception with an integer ``status_code`` (or
  ``response.status_code``) is classified by status: openai's ``APIStatusError`` family,
  ``httpx2.HTTPStatusError``, ``requests.HTTPError`` and :class:`ResponseStatusError` alike.
* **Time scale.** ``NBAGENT_TIME_SCALE`` (default 1.0) multiplies every backoff *sleep*;
  ``AttemptInfo.wait_s`` stays the policy's wait, so traces read the same in fast lessons.
  The circuit breaker's cool-down is wall-clock and never scaled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import email.utils
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

import tenacity
from tenacity import RetryCallState
from tenacity.stop import stop_after_attempt, stop_base, stop_before_delay, stop_never
from tenacity.wait import wait_base, wait_chain, wait_fixed, wait_none, wait_random

from ._errors import (
    CapExceeded,
    CircuitOpenError,
    NbagentError,
    RunStopped,
    StepError,
    StepLockedError,
    StoreError,
    ToolSchemaError,
)

log = logging.getLogger("nbagent.retry")

T = TypeVar("T")

# --------------------------------------------------------------------------- constants

#: Environment variable that scales every backoff sleep (``0`` in tests and fast lessons).
TIME_SCALE_ENV = "NBAGENT_TIME_SCALE"

#: The lesson's backoff before retry 1, 2, 3 of a timeout, connection or 5xx error (seconds).
BACKOFF_S: tuple[float, ...] = (1.0, 5.0, 30.0)

#: Wait when a 429 carries no usable ``retry-after-ms`` / ``retry-after`` (seconds).
RATE_LIMIT_FALLBACK_S = 1.0

#: Longest server-requested wait honoured; longer ones are clamped (openai uses 120 s too).
RATE_LIMIT_MAX_WAIT_S = 120.0

#: Consecutive 429s from one endpoint that open its circuit.
CIRCUIT_THRESHOLD = 5

#: Seconds an open circuit fails fast before one trial call is let through (wall-clock).
CIRCUIT_COOLDOWN_S = 30.0

Action = Literal["retry", "surface", "stop_run", "feedback"]
_ACTIONS: frozenset[str] = frozenset(("retry", "surface", "stop_run", "feedback"))

#: Exceptions no policy may retry (checked by the driver before the policy is consulted).
NEVER_RETRY: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    asyncio.CancelledError,
    CapExceeded,
    RunStopped,
    StepLockedError,
)


def time_scale_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Return ``NBAGENT_TIME_SCALE`` as a float >= 0 (default 1.0).

    A bad value warns loudly and falls back to 1.0: a typo must not break a notebook, and
    falling back to real waits is the safe side.
    """
    env = os.environ if environ is None else environ
    raw = env.get(TIME_SCALE_ENV)
    if raw is None or raw.strip() == "":
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        msg = f"{TIME_SCALE_ENV}={raw!r} is not a number >= 0; using 1.0 (real backoff waits)"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return 1.0
    return value


# --------------------------------------------------------------------------- errors


class RetryPolicyError(NbagentError, ValueError):
    """A retry policy or an override of one is malformed (unknown rule, bad field)."""


class BreakerOpenError(CircuitOpenError):
    """Raised by :meth:`CircuitBreaker.before_call` while the circuit is open.

    Carries the data a status line or a step engine needs to decide what to do next.
    """

    def __init__(self, message: str, *, endpoint: str, retry_in_s: float, state: str) -> None:
        super().__init__(message)
        #: The endpoint key of the breaker (usually the client's base_url).
        self.endpoint = endpoint
        #: Seconds until the circuit half-opens (0 while a half-open trial call is in flight).
        self.retry_in_s = retry_in_s
        #: ``"open"`` or ``"half_open"``.
        self.state = state


class ToolValidationError(ToolSchemaError):
    """Tool-call arguments failed validation; carries the details fed back to the model."""

    def __init__(
        self, message: str, *, tool_name: str | None, errors: Iterable[str], arguments: str
    ) -> None:
        super().__init__(message)
        #: Name of the tool the model called (``None`` if the caller did not say).
        self.tool_name = tool_name
        #: One readable line per problem (``"$.city: 'city' is a required property"``).
        self.errors: tuple[str, ...] = tuple(errors)
        #: The raw ``arguments`` JSON string the model produced.
        self.arguments = arguments

    @property
    def feedback(self) -> str:
        """The message to append to the conversation before the one retry."""
        tool = f"tool {self.tool_name!r}" if self.tool_name else "the tool"
        problems = "\n".join(f"- {e}" for e in self.errors)
        return (
            f"Your call to {tool} was rejected because its arguments do not match the tool's "
            f"JSON schema:\n{problems}\nCall {tool} again with corrected arguments."
        )


class ResponseStatusError(NbagentError):
    """An HTTP error *response*, raised inside a retried transport function.

    A transport sees 429/5xx as responses, not exceptions. Raise this inside the retried
    function so the policy can classify it (by status, honouring ``retry-after``), and when
    the driver gives up, return ``exc.response`` so openai's own status handling raises
    ``RateLimitError``/``InternalServerError``/... to the caller. Deliberately not a
    subclass of ``httpx2.RequestError``: openai would re-wrap it as ``APIConnectionError``.
    """

    def __init__(self, response: Any, message: str | None = None) -> None:
        self.response = response
        self.status_code: int = int(response.status_code)
        super().__init__(message or f"HTTP {self.status_code} from the endpoint")


# --------------------------------------------------------------------------- matchers


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (``status_code`` or ``response.status_code``)."""
    for holder in (exc, getattr(exc, "response", None)):
        code = getattr(holder, "status_code", None) if holder is not None else None
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return None


class ErrorTypes:
    """Matches exceptions by type; types given as classes or as lazy ``"module.Name"`` paths.

    A dotted path is resolved through ``sys.modules`` only: a library that was never imported
    cannot have raised, so there is no need (and no cost) to import it.
    """

    def __init__(self, *types: type[BaseException] | str) -> None:
        self.types = types

    def _resolved(self) -> tuple[type[BaseException], ...]:
        out: list[type[BaseException]] = []
        for t in self.types:
            if isinstance(t, str):
                module_name, _, attr = t.rpartition(".")
                module = sys.modules.get(module_name)
                resolved = getattr(module, attr, None) if module is not None else None
                if isinstance(resolved, type) and issubclass(resolved, BaseException):
                    out.append(resolved)
            else:
                out.append(t)
        return tuple(out)

    def __call__(self, exc: BaseException) -> bool:
        return isinstance(exc, self._resolved())

    def __or__(self, other: Callable[[BaseException], bool]) -> AnyOf:
        return AnyOf(self, other)

    def __repr__(self) -> str:
        names = dict.fromkeys(t if isinstance(t, str) else t.__name__ for t in self.types)
        return f"ErrorTypes({', '.join(names)})"


class HTTPStatus:
    """Matches exceptions carrying an HTTP status in ``codes`` (see :func:`http_status`)."""

    def __init__(self, *codes: int | range) -> None:
        self.codes = codes

    def __call__(self, exc: BaseException) -> bool:
        status = http_status(exc)
        return status is not None and any(
            status in c if isinstance(c, range) else status == c for c in self.codes
        )

    def __or__(self, other: Callable[[BaseException], bool]) -> AnyOf:
        return AnyOf(self, other)

    def __repr__(self) -> str:
        parts = [f"{c.start}-{c.stop - 1}" if isinstance(c, range) else str(c) for c in self.codes]
        return f"HTTPStatus({', '.join(parts)})"


class AnyOf:
    """Matches when any of its matchers does."""

    def __init__(self, *matchers: Callable[[BaseException], bool]) -> None:
        self.matchers = matchers

    def __call__(self, exc: BaseException) -> bool:
        return any(m(exc) for m in self.matchers)

    def __or__(self, other: Callable[[BaseException], bool]) -> AnyOf:
        return AnyOf(*self.matchers, other)

    def __repr__(self) -> str:
        return " | ".join(repr(m) for m in self.matchers)


def _always(exc: BaseException) -> bool:
    return True


#: Network timeouts. Before CONNECTION: openai's APITimeoutError subclasses APIConnectionError
#: and requests' ConnectTimeout is both a ConnectionError and a Timeout. 408 is a timeout too.
TIMEOUT_ERRORS = ErrorTypes(
    TimeoutError,
    asyncio.TimeoutError,
    concurrent.futures.TimeoutError,
    "openai.APITimeoutError",
    "httpx2.TimeoutException",
    "httpx.TimeoutException",
    "requests.exceptions.Timeout",
) | HTTPStatus(408)

#: Connection failures (refused, reset, DNS, server hung up mid-response).
CONNECTION_ERRORS = ErrorTypes(
    ConnectionError,
    "openai.APIConnectionError",
    "httpx2.NetworkError",
    "httpx2.RemoteProtocolError",
    "httpx.NetworkError",
    "httpx.RemoteProtocolError",
    "requests.exceptions.ConnectionError",
)

#: Errors in the step body's own code: re-running the same code cannot fix them.
PROGRAMMING_ERRORS = ErrorTypes(
    SyntaxError, NameError, ImportError, NotImplementedError, StepError, StoreError
)


# --------------------------------------------------------------------------- waits


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    try:
        value = headers.get(name)
    except Exception:  # an odd headers object must not break error handling
        return None
    if value is None and isinstance(headers, Mapping):
        for key, v in headers.items():
            if str(key).lower() == name:
                value = v
                break
    return None if value is None else str(value)


def retry_after_seconds(
    exc: BaseException, *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds the server asked us to wait, or ``None`` when it did not say.

    Read in this order: an ``exc.retry_after`` attribute (seconds; the protocol for
    non-HTTP errors, e.g. a user's own rate-limit exception), then ``retry-after-ms`` and
    ``retry-after`` (seconds or an HTTP date) from ``exc.response.headers`` or
    ``exc.headers``. A date in the past means 0.

    :param now: wall clock for HTTP dates (injectable for tests).
    """
    attr = getattr(exc, "retry_after", None)
    if isinstance(attr, (int, float)) and not isinstance(attr, bool) and math.isfinite(attr):
        return max(float(attr), 0.0)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) if response is not None else None
    if headers is None:
        headers = getattr(exc, "headers", None)
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = _header(headers, name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except ValueError:
            continue
        if math.isfinite(value):
            return max(value, 0.0)
    raw = _header(headers, "retry-after")
    if raw is not None:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        return max(when.timestamp() - now(), 0.0)
    return None


class wait_retry_after(wait_base):
    """Wait what the server's ``retry-after-ms`` / ``retry-after`` says (tenacity strategy).

    :param fallback: seconds when the error carries no usable value.
    :param max_wait: longer server requests are clamped to this.
    :param now: wall clock for HTTP-date values.
    """

    def __init__(
        self,
        fallback: float = RATE_LIMIT_FALLBACK_S,
        max_wait: float = RATE_LIMIT_MAX_WAIT_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.fallback = fallback
        self.max_wait = max_wait
        self.now = now

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        seconds = retry_after_seconds(exc, now=self.now) if exc is not None else None
        return self.fallback if seconds is None else min(seconds, self.max_wait)

    def __repr__(self) -> str:
        return f"wait_retry_after(fallback={self.fallback}, max_wait={self.max_wait})"


def wait_backoff(*seconds: float) -> wait_base:
    """Exact waits before retry 1, 2, 3, ... (the last one repeats): ``wait_backoff(1, 5, 30)``."""
    if not seconds:
        return wait_none()
    return wait_chain(*(wait_fixed(s) for s in seconds))


# --------------------------------------------------------------------------- rules, policy


@dataclass(frozen=True)
class Alert:
    """An alert a rule raises once per call, when ``after`` matching errors occurred.

    ``status`` restricts the count to errors with that HTTP status ("repeated 503").
    """

    #: Short text put in ``AttemptInfo.alert``.
    message: str
    #: Fire when this many errors matched by the rule (and ``status``) occurred in one call.
    after: int = 1
    #: Count only errors carrying this HTTP status (``None``: every error of the rule).
    status: int | None = None


@dataclass(frozen=True)
class Rule:
    """One row of the retry table: which errors, and what to do about them."""

    #: Name used by ``policy.replace(name, ...)``, overrides and traces.
    name: str
    #: Exception types, or a predicate on the exception (:class:`ErrorTypes`, :class:`HTTPStatus`).
    matches: tuple[type[BaseException], ...] | Callable[[BaseException], bool]
    #: ``retry``; ``surface`` (re-raise now); ``stop_run`` (re-raise and tell the run to stop);
    #: ``feedback`` (retry, with the error handed to ``on_attempt`` to feed back to the model).
    action: Action = "surface"
    #: tenacity stop strategy; sees this rule's error count in the call as ``attempt_number``.
    stop: stop_base = field(default_factory=lambda: stop_after_attempt(1))
    #: tenacity wait strategy (unscaled seconds); sees the rule's error count as well.
    wait: wait_base = field(default_factory=wait_none)
    #: Optional alert raised when the rule matched often enough within one call.
    alert: Alert | None = None
    #: Whether an error of this rule counts towards opening the endpoint's circuit.
    trips_breaker: bool = False

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise RetryPolicyError(
                f"rule {self.name!r}: action {self.action!r} is not one of {sorted(_ACTIONS)}"
            )

    def match(self, exc: BaseException) -> bool:
        """Whether this rule applies to ``exc``."""
        if isinstance(self.matches, tuple):
            return isinstance(exc, self.matches)
        return bool(self.matches(exc))

    @property
    def retries(self) -> bool:
        """Whether this rule ever retries (``retry`` or ``feedback``)."""
        return self.action in ("retry", "feedback")


_UNKNOWN_SURFACE = Rule("unknown", _always, "surface")


def _rule_changes(rule: Rule, changes: Mapping[str, Any]) -> Rule:
    """Apply field changes plus the conveniences ``retries=N`` and ``waits=[s, ...]``."""
    fields = {f.name for f in dataclasses.fields(Rule)}
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "retries":
            out["stop"] = stop_after_attempt(int(value) + 1)
        elif key == "waits":
            out["wait"] = wait_backoff(*value)
        elif key in fields and key != "name":
            out[key] = value
        else:
            raise RetryPolicyError(
                f"rule {rule.name!r}: cannot change {key!r}; use one of "
                f"{sorted((fields - {'name'}) | {'retries', 'waits'})}"
            )
    return dataclasses.replace(rule, **out)


@dataclass(frozen=True)
class Decision:
    """The answer of :meth:`RetryPolicy.decide`."""

    #: Whether to run another attempt.
    retry: bool
    #: Unscaled wait before it (``None`` when not retrying).
    wait_s: float | None
    #: Name of the rule that matched.
    rule: str
    #: That rule's action.
    action: Action
    #: Set when the run must stop (auth failure): the reason.
    stop_run: str | None = None
    #: For ``feedback`` rules: the text to append to the conversation.
    feedback: str | None = None


def _stop_run_text(rule: Rule, exc: BaseException) -> str | None:
    if rule.action != "stop_run":
        return None
    return f"{rule.name} failure: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RetryPolicy:
    """An ordered tuple of :class:`Rule`; the first rule matching an error decides.

    Policies are immutable; every override returns a new one, so a per-step or per-call
    policy can be derived from the run's policy without touching it::

        policy = DEFAULT_POLICY.replace("timeout", stop=stop_after_attempt(2))
        policy = policy.with_jitter(0.5)
        policy = policy.override({"rate_limit": {"retries": 2}})
    """

    rules: tuple[Rule, ...]
    #: Extra call-wide stop (sees the call-wide attempt number), OR-ed with each rule's stop.
    stop: stop_base | None = None
    #: Rule used when no rule matches (default: surface the error).
    fallback: Rule = _UNKNOWN_SURFACE

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RetryPolicyError(f"retry policy has duplicate rule names: {dupes}")

    # -- lookup
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules) + (self.fallback.name,)

    def __getitem__(self, name: str) -> Rule:
        for rule in (*self.rules, self.fallback):
            if rule.name == name:
                return rule
        raise RetryPolicyError(f"retry policy has no rule {name!r}; rules: {list(self.names)}")

    def rule_for(self, exc: BaseException) -> Rule:
        """The rule deciding what happens to ``exc`` (first match, else ``fallback``)."""
        for rule in self.rules:
            if rule.match(exc):
                return rule
        return self.fallback

    # -- derivation
    def replace(self, name: str, **changes: Any) -> RetryPolicy:
        """A copy with rule ``name`` changed (``stop=``, ``wait=``, ``action=``, ``retries=N``,
        ``waits=[1, 2]``, ``alert=``, ``matches=``, ``trips_breaker=``)."""
        self[name]  # raises a readable error for unknown names
        if name == self.fallback.name:
            return dataclasses.replace(self, fallback=_rule_changes(self.fallback, changes))
        rules = tuple(_rule_changes(r, changes) if r.name == name else r for r in self.rules)
        return dataclasses.replace(self, rules=rules)

    def with_rule(self, rule: Rule, *, before: str | None = None) -> RetryPolicy:
        """A copy with ``rule`` added (before rule ``before``, else after the last rule)."""
        rules = list(r for r in self.rules if r.name != rule.name)
        names = [r.name for r in rules]
        if before is not None:
            self[before]  # readable error for unknown names
        index = names.index(before) if before in names else len(rules)
        rules.insert(index, rule)
        return dataclasses.replace(self, rules=tuple(rules))

    def without(self, *names: str) -> RetryPolicy:
        """A copy without the named rules (their errors fall through to later rules)."""
        for n in names:
            self[n]
        return dataclasses.replace(self, rules=tuple(r for r in self.rules if r.name not in names))

    def only(self, *names: str) -> RetryPolicy:
        """A copy keeping only the named rules (plus ``never_retry``); the rest surfaces."""
        for n in names:
            self[n]
        keep = set(names) | {"never_retry"}
        return RetryPolicy(
            tuple(r for r in self.rules if r.name in keep),
            stop=self.stop,
            fallback=_UNKNOWN_SURFACE,
        )

    def with_jitter(self, max_s: float = 1.0, *, rules: Iterable[str] | None = None) -> RetryPolicy:
        """A copy adding ``wait_random(0, max_s)`` to the waits of retrying rules (or ``rules``)."""
        chosen = set(rules) if rules is not None else None
        out = self
        for rule in (*self.rules, self.fallback):
            if (chosen is None and rule.retries) or (chosen is not None and rule.name in chosen):
                out = out.replace(rule.name, wait=rule.wait + wait_random(0, max_s))
        return out

    def override(self, overrides: PolicyLike) -> RetryPolicy:
        """Layer overrides on this policy (per run, per step, per call).

        ``overrides`` is ``None`` (no change), a :class:`RetryPolicy` (used as is) or a dict:
        ``{"timeout": {"retries": 2, "waits": [1, 2]}, "jitter": 0.5, "stop": stop_obj}``,
        where a rule's value is a dict of changes (see :meth:`replace`) or a :class:`Rule`.
        """
        if overrides is None:
            return self
        if isinstance(overrides, RetryPolicy):
            return overrides
        if not isinstance(overrides, Mapping):
            raise RetryPolicyError(
                f"a retry policy override must be a RetryPolicy or a dict, not {type(overrides).__name__}"
            )
        out = self
        for key, value in overrides.items():
            if key == "jitter":
                out = out.with_jitter(float(value))
            elif key == "stop":
                out = dataclasses.replace(out, stop=value)
            elif isinstance(value, Rule):
                out = out.with_rule(value) if value.name not in out.names else out._swap(value)
            elif isinstance(value, Mapping):
                out = out.replace(key, **value)
            else:
                raise RetryPolicyError(
                    f"override for rule {key!r} must be a dict of changes or a Rule, not {value!r}"
                )
        return out

    def _swap(self, rule: Rule) -> RetryPolicy:
        if rule.name == self.fallback.name:
            return dataclasses.replace(self, fallback=rule)
        return dataclasses.replace(
            self, rules=tuple(rule if r.name == rule.name else r for r in self.rules)
        )

    # -- one decision, for engines that own their loop
    def decide(
        self,
        exc: BaseException,
        attempt: int,
        *,
        rule_attempt: int | None = None,
        elapsed_s: float = 0.0,
    ) -> Decision:
        """What to do after attempt ``attempt`` failed with ``exc`` (no state is kept).

        For engines that run their own attempt loop. Prefer :meth:`Retrier.attempts`, which
        counts errors per rule, raises alerts and drives the breaker; here the rule sees
        ``rule_attempt`` (default: ``attempt``) and the call-wide stop sees ``attempt`` and
        ``elapsed_s`` (seconds since the first attempt started).
        """
        rule = _NEVER if isinstance(exc, NEVER_RETRY) else self.rule_for(exc)
        stop_run = _stop_run_text(rule, exc)
        feedback = feedback_text(exc) if rule.action == "feedback" else None
        if not rule.retries:
            return Decision(False, None, rule.name, rule.action, stop_run, feedback)
        now = time.monotonic()
        state = RetryCallState(tenacity.Retrying(), None, (), {})
        state.start_time = now - elapsed_s
        state.outcome = tenacity.Future.construct(attempt, exc, True)
        state.outcome_timestamp = now
        state.attempt_number = attempt if rule_attempt is None else rule_attempt
        wait_s = float(rule.wait(state))
        state.upcoming_sleep = wait_s
        stop = bool(rule.stop(state))
        if not stop and self.stop is not None:
            state.attempt_number = attempt
            stop = bool(self.stop(state))
        return Decision(not stop, None if stop else wait_s, rule.name, rule.action, None, feedback)

    def sleep(self, wait_s: float | None, *, sleep: Callable[[float], None] = time.sleep) -> None:
        """Sleep ``wait_s`` x ``NBAGENT_TIME_SCALE`` (companion of :meth:`decide`)."""
        if wait_s:
            sleep(wait_s * time_scale_from_env())

    # -- display
    def describe(self) -> list[dict[str, str]]:
        """The table as rows of text (for status displays and docs)."""
        return [
            {
                "rule": r.name,
                "matches": _describe_matches(r.matches),
                "action": r.action,
                "stop": repr(r.stop),
                "wait": repr(r.wait),
                "alert": r.alert.message if r.alert else "",
            }
            for r in (*self.rules, self.fallback)
        ]

    def __str__(self) -> str:
        return "\n".join(
            f"{row['rule']:<14} {row['action']:<9} {row['matches']}" for row in self.describe()
        )


PolicyLike = RetryPolicy | Mapping[str, Any] | None


def _describe_matches(matches: tuple[type[BaseException], ...] | Callable[..., bool]) -> str:
    if matches is _always:
        return "any exception"
    if isinstance(matches, tuple):
        return ", ".join(t.__name__ for t in matches)
    return repr(matches)


def _never_rule() -> Rule:
    return Rule("never_retry", NEVER_RETRY, "surface")


def _default_rules() -> tuple[Rule, ...]:
    backoff = wait_backoff(*BACKOFF_S)
    return (
        _never_rule(),
        Rule("circuit_open", (CircuitOpenError,), "surface"),
        Rule("tool_schema", (ToolSchemaError,), "feedback", stop=stop_after_attempt(2)),
        Rule(
            "auth",
            HTTPStatus(401, 403),
            "stop_run",
            alert=Alert("auth failure"),
        ),
        Rule(
            "rate_limit",
            HTTPStatus(429),
            "retry",
            stop=stop_after_attempt(CIRCUIT_THRESHOLD),
            wait=wait_retry_after(),
            trips_breaker=True,
        ),
        Rule("timeout", TIMEOUT_ERRORS, "retry", stop=stop_after_attempt(4), wait=backoff),
        Rule("connection", CONNECTION_ERRORS, "retry", stop=stop_after_attempt(4), wait=backoff),
        Rule(
            "server_error",
            HTTPStatus(range(500, 600)),
            "retry",
            stop=stop_after_attempt(4),
            wait=backoff,
            alert=Alert("repeated 503", after=2, status=503),
        ),
        Rule("client_error", HTTPStatus(range(400, 500)), "surface"),
    )


#: The lesson's table. LLM calls: unknown errors surface (see the module docstring).
DEFAULT_POLICY = RetryPolicy(_default_rules())


def resolve_policy(policy: PolicyLike, base: RetryPolicy | None = None) -> RetryPolicy:
    """``policy`` layered on ``base`` (default :data:`DEFAULT_POLICY`): run -> step -> call."""
    return (base or DEFAULT_POLICY).override(policy)


_call_overrides: contextvars.ContextVar[tuple[PolicyLike, ...]] = contextvars.ContextVar(
    "nbagent_retry_policy", default=()
)


@contextlib.contextmanager
def retry_policy(overrides: PolicyLike) -> Iterator[None]:
    """Override the retry policy of the LLM calls made inside the block (per call or per step).

    Layers, lowest first: the lesson's table, ``Run(retry_policy=...)``, the
    client's ``policy=...``, then these blocks (innermost wins)::

        with nbagent.retry_policy({"timeout": {"retries": 1}}):
            client.chat.completions.create(...)
    """
    resolve_policy(overrides)  # a bad override fails here, not in the middle of a call
    token = _call_overrides.set((*_call_overrides.get(), overrides))
    try:
        yield
    finally:
        _call_overrides.reset(token)


def call_overrides() -> tuple[PolicyLike, ...]:
    """The ``retry_policy`` blocks around the current call, outermost first."""
    return _call_overrides.get()


def step_policy(
    retries: int, timeout: float | None = None, *, base: RetryPolicy | None = None
) -> RetryPolicy:
    """The policy for ``%%step NAME --retries N [--timeout S]``.

    Re-runs a failed step body up to ``retries`` more times, classifying by the exception
    the body raised and waiting what its rule waits (1 s, 5 s, 30 s, 30 s, ... for timeouts,
    connection errors, 5xx and unknown errors; ``retry-after`` for 429s). Never retried:
    4xx, auth failures (``stop_run``), :data:`NEVER_RETRY`, an open circuit, and programming
    errors of the body (SyntaxError, NameError, ImportError, NotImplementedError, nbagent
    StepError/StoreError). A tool-schema error escaping a step is retried like the others
    (re-running the step asks the model again).

    :param retries: extra attempts allowed (``0``: run once).
    :param timeout: overall budget in seconds: no new attempt starts if the backoff before it
        would end after ``timeout`` seconds from the first attempt (tenacity's
        ``stop_before_delay``; unscaled waits plus real elapsed time). It does not interrupt a
        running body: that is the step engine's job.
    """
    if retries < 0:
        raise StepError(f"--retries must be >= 0, got {retries}")
    if timeout is not None and timeout <= 0:
        raise StepError(f"--timeout must be > 0 seconds, got {timeout}")
    src = base or DEFAULT_POLICY
    backoff = wait_backoff(*BACKOFF_S)
    rules: list[Rule] = [_never_rule(), Rule("programming_error", PROGRAMMING_ERRORS, "surface")]
    for rule in src.rules:
        if rule.name in ("never_retry", "programming_error"):
            continue
        if rule.retries:
            rule = dataclasses.replace(rule, action="retry", stop=stop_never)
        rules.append(rule)
    stop: stop_base = stop_after_attempt(retries + 1)
    if timeout is not None:
        stop = stop | stop_before_delay(timeout)
    fallback = Rule("unknown", _always, "retry", stop=stop_never, wait=backoff)
    return RetryPolicy(tuple(rules), stop=stop, fallback=fallback)


# --------------------------------------------------------------------------- circuit breaker

BreakerStateName = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerState:
    """A snapshot of a :class:`CircuitBreaker` for status lines and traces."""

    endpoint: str
    state: BreakerStateName
    consecutive_failures: int
    opened_at: float | None
    retry_in_s: float


class CircuitBreaker:
    """Per-endpoint circuit breaker for rate limits.

    After ``threshold`` consecutive rate-limited calls (no success in between) the circuit
    opens: :meth:`before_call` raises :class:`BreakerOpenError` (a ``CircuitOpenError``)
    without calling the endpoint. After ``cooldown_s`` (wall-clock, never time-scaled) it is
    half-open and lets exactly one trial call through: success closes it, another rate limit
    re-opens it. Errors that are neither (timeouts, 400s, ...) neither count nor reset, and
    release a half-open trial slot. A trial slot held longer than ``cooldown_s`` (its caller
    died) is given to the next caller. Thread-safe.

    :param endpoint: key shown in messages (usually the client's base_url).
    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        endpoint: str = "default",
        *,
        threshold: int = CIRCUIT_THRESHOLD,
        cooldown_s: float = CIRCUIT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise RetryPolicyError(f"circuit threshold must be >= 1, got {threshold}")
        self.endpoint = endpoint
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._failures = 0
        self._trial_started: float | None = None

    # -- state as data
    def _state(self, now: float) -> BreakerStateName:
        if self._opened_at is None:
            return "closed"
        return "half_open" if now - self._opened_at >= self.cooldown_s else "open"

    @property
    def state(self) -> BreakerStateName:
        with self._lock:
            return self._state(self.clock())

    @property
    def opened_at(self) -> float | None:
        """Clock time the circuit last opened (``None`` while closed)."""
        return self._opened_at

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def snapshot(self) -> BreakerState:
        with self._lock:
            now = self.clock()
            state = self._state(now)
            retry_in = 0.0
            if state == "open" and self._opened_at is not None:
                retry_in = self._opened_at + self.cooldown_s - now
            return BreakerState(self.endpoint, state, self._failures, self._opened_at, retry_in)

    # -- protocol
    def before_call(self) -> None:
        """Let a call through, or raise :class:`BreakerOpenError` to fail fast."""
        with self._lock:
            now = self.clock()
            state = self._state(now)
            if state == "closed":
                return
            if state == "half_open":
                trial = self._trial_started
                if trial is None or now - trial >= self.cooldown_s:
                    self._trial_started = now
                    return
                raise BreakerOpenError(
                    f"endpoint {self.endpoint!r} is rate-limiting us; its circuit is half-open "
                    "and a trial call is in flight. Calls fail fast until that trial call "
                    "succeeds: retry in a few seconds.",
                    endpoint=self.endpoint,
                    retry_in_s=0.0,
                    state=state,
                )
            assert self._opened_at is not None
            retry_in = self._opened_at + self.cooldown_s - now
            raise BreakerOpenError(
                f"endpoint {self.endpoint!r} answered {self._failures} rate-limit errors (429) "
                f"in a row, so calls to it fail fast for {retry_in:.1f} s more; then one trial "
                "call is let through. Wait and resume, lower the request rate (fewer parallel "
                "calls), or raise the account's rate limit; breaker.reset() retries now.",
                endpoint=self.endpoint,
                retry_in_s=retry_in,
                state=state,
            )

    def record_success(self) -> None:
        """A call went through: close the circuit and reset the count."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_started = None

    def record_failure(self) -> bool:
        """A call was rate-limited. Returns True if the circuit is open afterwards."""
        with self._lock:
            now = self.clock()
            self._failures += 1
            state = self._state(now)
            if state == "half_open" or (state == "closed" and self._failures >= self.threshold):
                self._opened_at = now
            self._trial_started = None
            return self._opened_at is not None

    def release(self) -> None:
        """A call ended with an unrelated error: free a half-open trial slot, count nothing."""
        with self._lock:
            self._trial_started = None

    def reset(self) -> None:
        """Close the circuit now (the user knows the limit was lifted)."""
        self.record_success()

    def __repr__(self) -> str:
        s = self.snapshot()
        return f"CircuitBreaker({s.endpoint!r}, state={s.state}, failures={s.consecutive_failures})"


_BREAKERS: dict[str, CircuitBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(endpoint: str, **kwargs: Any) -> CircuitBreaker:
    """The process-wide breaker of ``endpoint`` (created with ``kwargs`` on first use)."""
    with _BREAKERS_LOCK:
        breaker = _BREAKERS.get(endpoint)
        if breaker is None:
            breaker = _BREAKERS[endpoint] = CircuitBreaker(endpoint, **kwargs)
        return breaker


def reset_breakers() -> None:
    """Forget every process-wide breaker (tests, or a fresh run)."""
    with _BREAKERS_LOCK:
        _BREAKERS.clear()


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class AttemptInfo:
    """What happened in one attempt; passed to ``on_attempt`` exactly once per attempt."""

    #: 1-based attempt number within the call.
    attempt: int
    #: ``"ok"`` or ``"error"``.
    outcome: Literal["ok", "error"]
    #: The exception of a failed attempt.
    exception: BaseException | None = None
    #: Name of the rule that matched the exception (``None`` on success).
    rule: str | None = None
    #: That rule's action.
    action: Action | None = None
    #: How many errors this rule matched so far in the call (what its stop/wait saw).
    rule_attempt: int = 0
    #: Wait before the next attempt, in the policy's (unscaled) seconds; ``None`` if no retry.
    wait_s: float | None = None
    #: Seconds actually slept (``wait_s`` x time scale).
    sleep_s: float | None = None
    #: Whether another attempt follows.
    will_retry: bool = False
    #: Alert raised by this attempt (``"repeated 503"``, ``"auth failure"``, ``"circuit open: ..."``).
    alert: str | None = None
    #: Set when the run must stop (auth failure): the reason.
    stop_run: str | None = None
    #: For ``feedback`` rules: the text to append to the conversation before the retry.
    feedback: str | None = None
    #: The endpoint's breaker state after this attempt (``None`` without a breaker).
    breaker: BreakerState | None = None

    def __str__(self) -> str:
        if self.outcome == "ok":
            return f"attempt {self.attempt}: ok"
        exc = type(self.exception).__name__ if self.exception is not None else "error"
        then = f"retry in {self.wait_s:g} s" if self.will_retry else "give up"
        extra = "".join(
            f"; {k}: {v}" for k, v in (("alert", self.alert), ("stop run", self.stop_run)) if v
        )
        return f"attempt {self.attempt}: {exc} [{self.rule}] -> {then}{extra}"


OnAttempt = Callable[[AttemptInfo], None]


def feedback_text(exc: BaseException) -> str:
    """The message to feed back to the model for a tool-schema error."""
    if isinstance(exc, ToolValidationError):
        return exc.feedback
    return f"Your tool call was rejected: {exc}. Call the tool again with valid arguments."


@dataclass
class _Verdict:
    attempt: int
    exception: BaseException | None
    rule: Rule | None
    rule_attempt: int = 0
    alert: str | None = None
    stop_run: str | None = None
    feedback: str | None = None
    breaker_open: bool = False


class _Call:
    """Per-call state; its bound methods are the tenacity strategies and hooks.

    tenacity owns the loop (attempt, decide, wait, stop, sleep); this object only answers its
    questions by looking up the policy, so there is no hand-written retry loop here.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        on_attempt: OnAttempt | None,
        breaker: CircuitBreaker | None,
        scale: float,
    ) -> None:
        self.policy = policy
        self.on_attempt = on_attempt
        self.breaker = breaker
        self.scale = scale
        self.rule_counts: dict[str, int] = {}
        self.status_counts: dict[tuple[str, int | None], int] = {}
        self.verdict: _Verdict | None = None

    # -- classification (memoised per attempt: retry, wait and stop all ask)
    def _judge(self, rs: RetryCallState) -> _Verdict:
        if self.verdict is not None and self.verdict.attempt == rs.attempt_number:
            return self.verdict
        outcome = rs.outcome
        exc = outcome.exception() if outcome is not None else None
        if exc is None:
            verdict = _Verdict(rs.attempt_number, None, None)
            if self.breaker is not None:
                self.breaker.record_success()
        else:
            rule = _NEVER if isinstance(exc, NEVER_RETRY) else self.policy.rule_for(exc)
            count = self.rule_counts[rule.name] = self.rule_counts.get(rule.name, 0) + 1
            verdict = _Verdict(rs.attempt_number, exc, rule, count)
            alert = rule.alert
            if alert is not None:
                key = (rule.name, alert.status)
                if alert.status is None or http_status(exc) == alert.status:
                    self.status_counts[key] = self.status_counts.get(key, 0) + 1
                    if self.status_counts[key] == alert.after:
                        verdict.alert = alert.message
            verdict.stop_run = _stop_run_text(rule, exc)
            if rule.action == "feedback":
                verdict.feedback = feedback_text(exc)
            if self.breaker is not None:
                if rule.trips_breaker:
                    verdict.breaker_open = self.breaker.record_failure()
                    if verdict.breaker_open:
                        verdict.alert = verdict.alert or f"circuit open: {self.breaker.endpoint}"
                else:
                    self.breaker.release()
        self.verdict = verdict
        return verdict

    def _rule_view(self, rs: RetryCallState, verdict: _Verdict) -> RetryCallState:
        view = copy.copy(rs)
        view.attempt_number = verdict.rule_attempt
        return view

    def _emit(self, verdict: _Verdict, *, wait_s: float | None) -> None:
        if self.on_attempt is None:
            return
        rule = verdict.rule
        self.on_attempt(
            AttemptInfo(
                attempt=verdict.attempt,
                outcome="ok" if verdict.exception is None else "error",
                exception=verdict.exception,
                rule=rule.name if rule else None,
                action=rule.action if rule else None,
                rule_attempt=verdict.rule_attempt,
                wait_s=wait_s,
                sleep_s=None if wait_s is None else wait_s * self.scale,
                will_retry=wait_s is not None,
                alert=verdict.alert,
                stop_run=verdict.stop_run,
                feedback=verdict.feedback,
                breaker=self.breaker.snapshot() if self.breaker is not None else None,
            )
        )

    # -- tenacity hooks
    def before(self, rs: RetryCallState) -> None:
        """Fail fast on an open circuit: the function is not called, nothing is retried."""
        if self.breaker is None:
            return
        try:
            self.breaker.before_call()
        except BreakerOpenError as exc:
            rule = self.policy["circuit_open"] if "circuit_open" in self.policy.names else _CIRCUIT
            verdict = _Verdict(rs.attempt_number, exc, rule)
            verdict.alert = f"circuit open: {self.breaker.endpoint}"
            self._emit(verdict, wait_s=None)
            raise

    def retry(self, rs: RetryCallState) -> bool:
        verdict = self._judge(rs)
        if verdict.rule is None or not verdict.rule.retries:
            self._emit(verdict, wait_s=None)
            return False
        return True

    def wait(self, rs: RetryCallState) -> float:
        verdict = self._judge(rs)
        assert verdict.rule is not None
        return float(verdict.rule.wait(self._rule_view(rs, verdict)))

    def stop(self, rs: RetryCallState) -> bool:
        verdict = self._judge(rs)
        assert verdict.rule is not None
        if verdict.breaker_open:
            return True  # the next attempt would only fail fast
        if verdict.rule.stop(self._rule_view(rs, verdict)):
            return True
        return self.policy.stop is not None and bool(self.policy.stop(rs))

    def before_sleep(self, rs: RetryCallState) -> None:
        self._emit(self._judge(rs), wait_s=rs.upcoming_sleep)

    def exhausted(self, rs: RetryCallState) -> Any:
        """tenacity's ``retry_error_callback``: report, then re-raise the ORIGINAL exception."""
        self._emit(self._judge(rs), wait_s=None)
        assert rs.outcome is not None
        return rs.outcome.result()  # raises the original exception, never RetryError

    def tenacity_kwargs(self) -> dict[str, Any]:
        return {
            "stop": self.stop,
            "wait": self.wait,
            "retry": self.retry,
            "before": self.before,
            "before_sleep": self.before_sleep,
            "retry_error_callback": self.exhausted,
        }


_NEVER = _never_rule()
_CIRCUIT = Rule("circuit_open", (CircuitOpenError,), "surface")


class Attempt:
    """One attempt of the iterator form: use as ``with attempt:`` around the body."""

    def __init__(self, manager: tenacity.AttemptManager) -> None:
        self._manager = manager

    @property
    def number(self) -> int:
        """1-based attempt number."""
        return self._manager.retry_state.attempt_number

    def __enter__(self) -> Attempt:
        self._manager.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self._manager.__exit__(exc_type, exc, tb)


class _RetrierBase:
    def __init__(
        self,
        policy: PolicyLike = None,
        *,
        time_scale: float | None = None,
        on_attempt: OnAttempt | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        #: The resolved policy (overrides layered on :data:`DEFAULT_POLICY`).
        self.policy = resolve_policy(policy)
        self.time_scale = time_scale
        self.on_attempt = on_attempt
        self.breaker = breaker

    def _scale(self) -> float:
        # Read per call, not per Retrier: a notebook may set the variable after import.
        return time_scale_from_env() if self.time_scale is None else float(self.time_scale)

    def _new_call(self) -> _Call:
        return _Call(self.policy, self.on_attempt, self.breaker, self._scale())


class Retrier(_RetrierBase):
    """Run callables under a :class:`RetryPolicy` (synchronous).

    >>> r = Retrier(DEFAULT_POLICY, sleep=lambda s: None)
    >>> r(lambda: 42)
    42

    :param policy: a policy, a dict of overrides on :data:`DEFAULT_POLICY`, or ``None``.
    :param sleep: called with the scaled backoff in seconds (default ``time.sleep``).
    :param time_scale: multiplies sleeps; ``None`` reads ``NBAGENT_TIME_SCALE`` on each call.
    :param on_attempt: called once per attempt with an :class:`AttemptInfo`.
    :param breaker: circuit breaker of the endpoint (LLM transport); ``None`` for step bodies.
    """

    def __init__(
        self,
        policy: PolicyLike = None,
        *,
        sleep: Callable[[float], None] | None = None,
        time_scale: float | None = None,
        on_attempt: OnAttempt | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        super().__init__(policy, time_scale=time_scale, on_attempt=on_attempt, breaker=breaker)
        self.sleep = sleep

    def _retrying(self, call: _Call) -> tenacity.Retrying:
        sleep = self.sleep or time.sleep
        return tenacity.Retrying(
            sleep=lambda s: sleep(float(s) * call.scale), **call.tenacity_kwargs()
        )

    def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` until it succeeds or the policy gives up."""
        result: T = self._retrying(self._new_call())(fn, *args, **kwargs)
        return result

    call = __call__

    def attempts(self) -> Iterator[Attempt]:
        """Iterator form for a code block::

        for attempt in retrier.attempts():
            with attempt:
                run_the_cell_body()
        """
        for manager in self._retrying(self._new_call()):
            yield Attempt(manager)


class AsyncRetrier(_RetrierBase):
    """:class:`Retrier` for coroutines (``AsyncOpenAI``); ``sleep`` may be sync or async."""

    def __init__(
        self,
        policy: PolicyLike = None,
        *,
        sleep: Callable[[float], Awaitable[None] | None] | None = None,
        time_scale: float | None = None,
        on_attempt: OnAttempt | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        super().__init__(policy, time_scale=time_scale, on_attempt=on_attempt, breaker=breaker)
        self.sleep = sleep

    def _retrying(self, call: _Call) -> tenacity.AsyncRetrying:
        sleep = self.sleep or asyncio.sleep

        async def scaled_sleep(seconds: float) -> None:
            waited = sleep(float(seconds) * call.scale)
            if inspect.isawaitable(waited):
                await waited

        return tenacity.AsyncRetrying(sleep=scaled_sleep, **call.tenacity_kwargs())

    async def __call__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await ``fn(*args, **kwargs)`` (a coroutine function, or a function returning one)."""

        async def once() -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return await self._retrying(self._new_call())(once)

    call = __call__

    async def attempts(self) -> AsyncIterator[Attempt]:
        """``async for attempt in retrier.attempts(): with attempt: ...``"""
        async for manager in self._retrying(self._new_call()):
            yield Attempt(manager)


def call_with_policy(
    fn: Callable[[], T],
    *,
    policy: PolicyLike = None,
    sleep: Callable[[float], None] | None = None,
    time_scale: float | None = None,
    on_attempt: OnAttempt | None = None,
    breaker: CircuitBreaker | None = None,
) -> T:
    """Call ``fn()`` under ``policy``; shorthand for ``Retrier(...)(fn)``."""
    retrier = Retrier(
        policy, sleep=sleep, time_scale=time_scale, on_attempt=on_attempt, breaker=breaker
    )
    return retrier(fn)


async def acall_with_policy(
    fn: Callable[[], Any],
    *,
    policy: PolicyLike = None,
    sleep: Callable[[float], Awaitable[None] | None] | None = None,
    time_scale: float | None = None,
    on_attempt: OnAttempt | None = None,
    breaker: CircuitBreaker | None = None,
) -> Any:
    """Await ``fn()`` under ``policy``; shorthand for ``await AsyncRetrier(...)(fn)``."""
    retrier = AsyncRetrier(
        policy, sleep=sleep, time_scale=time_scale, on_attempt=on_attempt, breaker=breaker
    )
    return await retrier(fn)


def classify(exc: BaseException, policy: PolicyLike = None) -> Rule:
    """The rule ``policy`` applies to ``exc`` (for status lines and tests)."""
    if isinstance(exc, NEVER_RETRY):
        return _NEVER
    return resolve_policy(policy).rule_for(exc)


# --------------------------------------------------------------------------- tool arguments

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


def _subset_errors(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
    """Validate the common JSON-schema subset (type, properties, required, enum, items,
    additionalProperties, const). Used only when the ``jsonschema`` package is missing."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_JSON_TYPES.get(t, lambda v: True)(value) for t in names):
            wanted = names[0] if len(names) == 1 else names
            return [f"{path}: {json.dumps(value)} is not of type {wanted!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {json.dumps(value)} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {json.dumps(value)} was expected to be {schema['const']!r}")
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: {name!r} is a required property")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                errors.extend(_subset_errors(item, props[name], f"{path}.{name}"))
            elif extra is False:
                errors.append(f"{path}: additional property {name!r} is not allowed")
            elif isinstance(extra, Mapping):
                errors.extend(_subset_errors(item, extra, f"{path}.{name}"))
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            errors.extend(_subset_errors(item, schema["items"], f"{path}[{i}]"))
    return errors


def _schema_errors(value: Any, schema: Mapping[str, Any]) -> list[str]:
    # jsonschema is used when installed (it is in this venv, pulled in by Jupyter, but it is
    # not a declared dependency of nbagent) and imported lazily (~0.9 s). Without it the small
    # subset validator above covers what tool schemas use in practice.
    try:
        import jsonschema
    except ImportError:
        return _subset_errors(value, schema, "$")
    validator_cls = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    validator = validator_cls(schema)
    found = sorted(validator.iter_errors(value), key=lambda e: (e.json_path, e.message))
    return [f"{e.json_path}: {e.message}" for e in found]


def validate_tool_arguments(
    arguments_json: str, schema: Mapping[str, Any], *, tool_name: str | None = None
) -> dict[str, Any]:
    """Parse a tool call's ``arguments`` and validate them against the tool's JSON schema.

    :returns: the arguments as a dict.
    :raises ToolValidationError: (a :class:`~nbagent.ToolSchemaError`) with one readable line
        per problem: invalid JSON, not an object, missing required property, wrong type,
        value not in enum, unexpected property.
    """
    tool = f"tool {tool_name!r}" if tool_name else "tool call"
    try:
        value = json.loads(arguments_json)
    except (json.JSONDecodeError, TypeError) as exc:
        problem = f"arguments are not valid JSON: {exc}"
        raise ToolValidationError(
            f"{tool}: {problem}",
            tool_name=tool_name,
            errors=[problem],
            arguments=str(arguments_json),
        ) from None
    errors = _schema_errors(value, schema)
    if not errors and not isinstance(value, dict):
        errors = [f"$: arguments must be a JSON object, got {json.dumps(value)}"]
    if errors:
        listing = "\n".join(f"  - {e}" for e in errors)
        raise ToolValidationError(
            f"{tool}: arguments do not match the tool's schema:\n{listing}",
            tool_name=tool_name,
            errors=errors,
            arguments=arguments_json,
        )
    return value  # type: ignore[no-any-return]


__all__ = [
    "DEFAULT_POLICY",
    "Decision",
    "NEVER_RETRY",
    "TIME_SCALE_ENV",
    "Alert",
    "AnyOf",
    "AsyncRetrier",
    "Attempt",
    "AttemptInfo",
    "BreakerOpenError",
    "BreakerState",
    "CircuitBreaker",
    "ErrorTypes",
    "HTTPStatus",
    "ResponseStatusError",
    "Retrier",
    "RetryPolicy",
    "RetryPolicyError",
    "Rule",
    "ToolValidationError",
    "acall_with_policy",
    "breaker_for",
    "call_with_policy",
    "classify",
    "feedback_text",
    "http_status",
    "reset_breakers",
    "resolve_policy",
    "retry_after_seconds",
    "step_policy",
    "time_scale_from_env",
    "validate_tool_arguments",
    "wait_backoff",
    "wait_retry_after",
]
