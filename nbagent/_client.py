"""The traced LLM client: every call logged, priced, capped, retried and never paid twice.

nbagent wraps the official ``openai`` client at its HTTP transport (openai >= 3 talks
through ``httpx2``), so the SDK's request building, parsing and exceptions run unchanged
and any OpenAI-compatible ``base_url`` works::

    client = nbagent.openai_client()          # an openai.OpenAI, max_retries=0
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])

Per request, :class:`TracedTransport` (and its async twin) does, in order:

1. **Run and step.** The run is the one given to the factory, else
   :func:`~nbagent.current_run`; the step is :func:`~nbagent.current_step` (may be None).
   A stopped run raises :class:`~nbagent.RunStopped` before anything is sent.
2. **No re-billing (call ledger).** Inside a step a call is identified by
   ``run / step_id / position in the step attempt / sha256(request body)[:16]``. A call
   already answered by an *unfinished* execution of the step (a crash, a failed attempt)
   is served from the ledger: same status, safe headers and body bytes (a stream is
   re-streamed from its recorded SSE bytes), nothing is sent, the trace row says
   ``replayed`` with cost 0, and no cap is charged. Entries written before the step last
   *completed* are ignored: re-running a finished step on purpose (``--rerun``, a source
   or input change) asks the model again. The position comes first so two identical
   requests in one step are two calls; the hash makes sure a changed request is never
   answered with an old reply.
3. **Hard cost cap.** The worst case is reserved with :meth:`Run.reserve` before sending:
   ``prompt bound x input rate + output bound x output rate`` where the prompt bound is
   the UTF-8 *bytes* of the prompt text (a token is at least one byte) plus a per-message
   and per-tool overhead (:data:`MESSAGE_OVERHEAD_TOKENS`, :data:`TOOL_OVERHEAD_TOKENS`),
   an image counts :data:`IMAGE_TOKENS`, and the output bound is ``max_tokens`` /
   ``max_completion_tokens`` / ``max_output_tokens`` or the model's output limit, times
   ``n`` (input is billed once). A call that could cross the cap is never sent:
   :class:`~nbagent.CostCapExceeded` propagates through openai unchanged. After the call
   the reservation is settled to the real cost computed from the reported usage.
4. **Retries.** The policy table (:data:`nbagent._retry.DEFAULT_POLICY`) runs inside
   openai's request loop with the endpoint's circuit breaker; one trace row per attempt.
   Error *responses* that end the call are returned, so openai raises its own
   ``RateLimitError`` / ``BadRequestError`` / ``AuthenticationError``; exhausted timeouts
   and connection errors re-raise the original httpx2 error (openai maps them to
   ``APITimeoutError`` / ``APIConnectionError``). An auth failure alerts and stops the run.
5. **Tool-schema feedback.** A 200 chat completion (not streamed) whose tool-call
   arguments are not JSON or do not validate against the request's declared ``tools``
   schemas is traced as an error and re-sent *once* with the assistant message and one
   ``tool`` message per tool call carrying the validation error (tool messages, because
   the API rejects an assistant ``tool_calls`` message that is not answered by them). The
   second response is returned whatever it contains: if it is still invalid the caller
   sees it (its trace row is ``ok`` with the validation error in ``error``). The re-send
   is a second billed call with its own reservation; if the cap refuses it, the first
   response is returned. Streams are not validated (their bytes already reached the caller).
6. **Idempotency.** Every request carries ``Idempotency-Key: <step key>:call:<position>``
   (outside a step ``run:R:call:N``, ``N`` the run's stored LLM-call counter taken in the
   reservation's transaction; ``run:R:request:N`` for unpriced endpoints), the same
   across retries, kernel restarts and processes; the feedback re-send appends
   ``:feedback``. A caller's own ``Idempotency-Key`` header is kept.

Streams. Bytes flow through to the SDK live, cut at SSE event boundaries (the SDK cannot
use a partial event anyway), and are teed. A chat stream without
``stream_options.include_usage`` gets it added, so the cost is always known; the extra
usage chunk (``choices == []``) is then removed from what the caller sees, so code that
reads ``chunk.choices[0]`` keeps working. When the stream ends or is closed, the usage is
priced and settled, the ledger written (complete streams only) and the trace row added. A
stream abandoned before its usage arrived is settled at its reservation (an upper bound:
the provider may have billed the whole generation) and flagged in the row's ``detail``.

Unknown models. A model the :class:`~nbagent._pricing.PriceBook` has no price for is
reserved *and* billed at :data:`UNKNOWN_MODEL_RATES` (conservative list rates), flagged
``price_known=0`` in the trace, with one warning per model saying how to add its price
(``0`` for a local model): an unknown model is never silently free, and the cap still
limits it.

Secrets never reach disk: no request or response header is stored (the ledger keeps a
short allow-list of harmless response headers), ``api_key``-like fields of a body are
redacted, and the request's own API key is masked wherever it appears in stored text.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import openai

from ._engine import Run, StepContext, current_run, current_step
from ._errors import CostCapExceeded, NbagentError
from ._pricing import PriceBook
from ._retry import (
    AsyncRetrier,
    AttemptInfo,
    BreakerOpenError,
    CircuitBreaker,
    PolicyLike,
    ResponseStatusError,
    Retrier,
    RetryPolicy,
    ToolValidationError,
    breaker_for,
    call_overrides,
    resolve_policy,
    validate_tool_arguments,
)
from ._simulator import SIMULATED_API_KEY, SIMULATED_BASE_URL, SimulatedLLM
from ._store import NANO

log = logging.getLogger("nbagent.client")

__all__ = [
    "IMAGE_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "TOOL_OVERHEAD_TOKENS",
    "UNKNOWN_MODEL_RATES",
    "AsyncTracedTransport",
    "TracedTransport",
    "async_openai_client",
    "default_client",
    "openai_client",
    "simulated_client",
]

# --------------------------------------------------------------------------- settings

#: USD per million tokens (input, output) used to reserve and bill a model without a known
#: price: the list price of the most expensive widely used chat models (o1: $15 / $60).
UNKNOWN_MODEL_RATES: tuple[float, float] = (15.0, 60.0)

#: Tokens a chat message or Responses input item may add around its text (role markers).
MESSAGE_OVERHEAD_TOKENS = 8
#: Tokens the rendering of one declared tool may add to its JSON (namespace, comments).
TOOL_OVERHEAD_TOKENS = 32
#: Tokens reserved per image part (high detail on the largest images is ~2,500).
IMAGE_TOKENS = 6000
#: Tokens reserved for a conversation the server keeps (``previous_response_id``,
#: ``conversation``) when the model's context window is unknown.
STORED_CONTEXT_TOKENS = 128_000
#: Fixed prompt overhead of a request.
REQUEST_OVERHEAD_TOKENS = 16

#: Response headers kept in the ledger (everything else, cookies included, is dropped).
_SAFE_HEADERS = ("content-type", "x-request-id", "openai-processing-ms", "openai-version")
_SECRET_FIELDS = frozenset({"api_key", "apikey", "api-key", "authorization", "x-api-key"})
_REDACTED = "[REDACTED]"
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
_SIMULATOR_NOTICE = (
    "nbagent: no OPENAI_API_KEY is set, so this uses the built-in simulated LLM (offline, "
    "free, canned replies priced as if real). For a real model, set OPENAI_API_KEY (and "
    "OPENAI_BASE_URL for another OpenAI-compatible server) before starting Python or the kernel."
)

Api = Literal["chat", "responses"]

_default_book: PriceBook | None = None
_book_lock = threading.Lock()
_warned_models: set[str] = set()
_notice_shown = False


def _price_book(prices: PriceBook | Mapping[str, Mapping[str, Any]] | None) -> PriceBook:
    global _default_book
    if isinstance(prices, PriceBook):
        return prices
    if prices is not None:
        return PriceBook(overrides=prices)
    with _book_lock:
        if _default_book is None:
            _default_book = PriceBook()
        return _default_book


def _warn_unknown(model: str) -> None:
    if model in _warned_models:
        return
    _warned_models.add(model)
    i, o = UNKNOWN_MODEL_RATES
    warnings.warn(
        f"nbagent has no price for model {model!r}: its calls are reserved and billed at a "
        f"conservative ${i:g} / ${o:g} per million input / output tokens and flagged "
        "price_known=0 in the trace. Give the real price with "
        f"nbagent.openai_client(prices={{{model!r}: {{'input_per_mtok': ..., "
        "'output_per_mtok': ...}}) (USD per million tokens; 0 for a local model).",
        UnknownModelPriceWarning,
        stacklevel=2,
    )


class UnknownModelPriceWarning(UserWarning):
    """A model has no known price: nbagent bills it at :data:`UNKNOWN_MODEL_RATES`."""


# --------------------------------------------------------------------------- request facts


def _bytes_bound(value: Any) -> int:
    """UTF-8 bytes of every string in a prompt structure (an upper bound of its tokens)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, Mapping):
        if value.get("type") in _IMAGE_TYPES:
            return IMAGE_TOKENS
        return sum(_bytes_bound(v) for v in value.values())
    if isinstance(value, list):
        return sum(_bytes_bound(v) for v in value)
    if value is None or isinstance(value, bool):
        return 0
    return len(str(value))


def _json_bytes(value: Any) -> int:
    return 0 if value is None else len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _output_bound(api: Api, body: Mapping[str, Any], book: PriceBook, model: str) -> int:
    keys = ("max_completion_tokens", "max_tokens") if api == "chat" else ("max_output_tokens",)
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return book.output_limit(model)


def _context_window(book: PriceBook, model: str) -> int:
    card = book._card(model, "openai", warn=False)  # noqa: SLF001 - same package
    window = getattr(card, "context_window", None)
    return int(window) if window else STORED_CONTEXT_TOKENS


def prompt_bound(api: Api, body: Mapping[str, Any], book: PriceBook | None = None) -> int:
    """An upper bound of the prompt tokens of a request (see the module docstring)."""
    tokens = REQUEST_OVERHEAD_TOKENS
    items: Any
    if api == "chat":
        items = body.get("messages") or []
        extra = (body.get("tools"), body.get("functions"), body.get("response_format"))
    else:
        items = body.get("input")
        items = [items] if isinstance(items, str) else (items or [])
        extra = (body.get("tools"), body.get("text"), body.get("instructions"))
        if body.get("previous_response_id") or body.get("conversation"):
            model = str(body.get("model") or "")
            tokens += _context_window(book, model) if book else STORED_CONTEXT_TOKENS
    tokens += len(items) * MESSAGE_OVERHEAD_TOKENS + _bytes_bound(items)
    for value in extra:
        tokens += _json_bytes(value)
    tools = body.get("tools")
    if isinstance(tools, list):
        tokens += TOOL_OVERHEAD_TOKENS * len(tools)
    return tokens


def _api_of(request: httpx2.Request) -> Api | None:
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    return None


_AUTH_HEADERS = frozenset({b"authorization", b"api-key", b"x-api-key"})


def _secrets_of(request: httpx2.Request) -> list[str]:
    """The credentials a request carries (masked wherever they appear in stored text)."""
    found = []
    for name, raw in request.headers.raw:
        if name.lower() in _AUTH_HEADERS and raw:
            value = raw.decode("latin-1")
            value = value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
            if len(value) >= 8:
                found.append(value)
    return found


def _redact_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _REDACTED if str(k).lower() in _SECRET_FIELDS else _redact_fields(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_fields(v) for v in value]
    return value


def _usage_numbers(api: Api, usage: Any) -> tuple[int, int, int, int] | None:
    """(input, cached, output, reasoning) tokens from a usage object, or None."""
    if not isinstance(usage, Mapping):
        return None
    if api == "chat":
        inp, out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        in_details, out_details = (
            usage.get("prompt_tokens_details"),
            usage.get("completion_tokens_details"),
        )
    else:
        inp, out = usage.get("input_tokens"), usage.get("output_tokens")
        in_details, out_details = (
            usage.get("input_tokens_details"),
            usage.get("output_tokens_details"),
        )
    if not isinstance(inp, int) or not isinstance(out, int):
        return None
    cached = (in_details or {}).get("cached_tokens") if isinstance(in_details, Mapping) else 0
    reasoning = (
        (out_details or {}).get("reasoning_tokens") if isinstance(out_details, Mapping) else 0
    )
    inp, out = max(inp, 0), max(out, 0)
    cached = min(max(int(cached or 0), 0), inp)
    reasoning = min(max(int(reasoning or 0), 0), out)
    return inp, cached, out, reasoning


# --------------------------------------------------------------------------- one call


@dataclass
class _Call:
    """Everything known about one logical LLM call (all its attempts)."""

    run: Run
    ctx: StepContext | None
    api: Api | None
    name: str
    raw: bytes
    body: dict[str, Any] | None
    model: str | None
    secrets: list[str]
    idem_key: str
    ledger_key: str | None = None
    stream: bool = False
    strip_usage: bool = False
    price_known: bool | None = None
    reservation: int = 0
    reserved: bool = False
    attempt: int = 0  # attempts made so far in the call (all requests)
    attempt_base: int = 0  # attempts before the current request (feedback re-send)
    t_attempt: float = 0.0
    fed_back: bool = False
    request_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step_id(self) -> str | None:
        return self.ctx.step_id if self.ctx is not None else None

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text


class _Core:
    """The transport-independent half of the traced transport (sync and async share it)."""

    def __init__(
        self,
        run: Run | None,
        prices: PriceBook | Mapping[str, Mapping[str, Any]] | None,
        policy: PolicyLike,
        base_url: str | None,
    ) -> None:
        self.bound_run = run
        self.book = _price_book(prices)
        resolved: RetryPolicy = resolve_policy(policy)
        self.raw_policy = policy
        self.feedback = "tool_schema" in resolved.names and resolved["tool_schema"].retries
        self.policy = resolved.without("tool_schema") if self.feedback else resolved
        self.base_url = base_url

    def policy_for(self, run: Run) -> RetryPolicy:
        """The policy of one call: table < ``Run(retry_policy=)`` < client < ``retry_policy`` blocks."""
        run_layer = getattr(run, "retry_policy", None)
        blocks = call_overrides()
        if run_layer is None and not blocks:
            return self.policy
        resolved = resolve_policy(self.raw_policy, base=resolve_policy(run_layer))
        for layer in blocks:
            resolved = resolve_policy(layer, base=resolved)
        return resolved.without("tool_schema") if self.feedback else resolved

    # -- preparing ----------------------------------------------------------------

    def endpoint(self, request: httpx2.Request) -> str:
        if self.base_url:
            return self.base_url
        url = request.url
        return f"{url.scheme}://{url.netloc.decode('ascii')}"

    def prepare(self, request: httpx2.Request) -> _Call:
        run = self.bound_run or current_run(required=True)
        assert run is not None
        ctx = current_step()
        if ctx is not None and ctx.run is not run:
            ctx = None  # a client bound to another run: not part of this step
        api = _api_of(request)
        raw = request.content
        body: dict[str, Any] | None = None
        if api is not None:
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                body = parsed
            else:
                api = None  # not a request we can price: pass it through, traced
        name = {"chat": "chat.completions", "responses": "responses"}.get(
            api or "", request.url.path
        )
        position = ctx.next_call() if ctx is not None else None
        # outside a step the key comes from the run's stored call counter, read in the
        # reservation's transaction (see reserve)
        idem = f"{ctx.idempotency_key()}:call:{position}" if ctx is not None else ""
        call = _Call(
            run=run,
            ctx=ctx,
            api=api,
            name=name,
            raw=raw,
            body=body,
            model=body.get("model") if body else None,
            secrets=_secrets_of(request),
            idem_key=idem,
        )
        if api is not None and ctx is not None and body is not None:
            digest = hashlib.sha256(raw).hexdigest()[:16]
            call.ledger_key = f"{run.name}/{ctx.step_id}/{position}/{digest}"
        if body is not None:
            call.stream = bool(body.get("stream"))
        return call

    def assign_key(self, call: _Call) -> None:
        """Outside a step, an unpriced request's key: ``run:R:request:N`` (stored counter)."""
        if not call.idem_key:
            seq = call.run.store.incr(call.run.name, "request_seq")
            call.idem_key = f"run:{call.run.name}:request:{seq}"

    def request_text(self, call: _Call, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        low = text.lower()
        if any(f in low for f in ("api_key", "apikey", "api-key", "authorization")):
            try:
                text = json.dumps(_redact_fields(json.loads(text)))
            except ValueError:
                pass
        return call.redact(text)

    def add_stream_usage(self, call: _Call, request: httpx2.Request) -> httpx2.Request:
        """Chat streams: ask for the usage chunk if the caller did not (stripped later)."""
        if call.api != "chat" or not call.stream or call.body is None:
            return request
        options = call.body.get("stream_options")
        if isinstance(options, Mapping) and options.get("include_usage"):
            return request
        body = dict(call.body)
        body["stream_options"] = {**(options or {}), "include_usage": True}
        call.strip_usage = True
        return rebuild(request, body)

    # -- the ledger -------------------------------------------------------------------

    def ledger_hit(self, call: _Call) -> dict[str, Any] | None:
        ctx = call.ctx
        if call.ledger_key is None or ctx is None:
            return None
        if ctx.ledger_keys is None:  # one range read per step execution, not one per call
            ctx.ledger_keys = call.run.store.record_keys("llm", f"{call.run.name}/{ctx.step_id}/")
        if call.ledger_key not in ctx.ledger_keys:
            return None
        rec = call.run.store.get_record("llm", call.ledger_key)
        if not isinstance(rec, dict):
            return None
        step = call.run.store.get_step(call.run.name, ctx.step_id)
        if step and step.get("finished_at", 0) >= rec.get("ts", 0):
            return None  # answered by an execution that completed: a re-run asks again
        return rec

    def replay(self, call: _Call, rec: dict[str, Any], request: httpx2.Request) -> httpx2.Response:
        call.run.check_not_stopped()
        text = rec["body"]
        body = base64.b64decode(text) if rec.get("enc") == "b64" else text.encode("utf-8")
        usage = rec.get("usage") or [0, 0, 0, 0]
        call.attempt += 1
        self.row(
            call,
            status="replayed",
            usage=tuple(usage),
            cost=0.0,
            latency=0.0,
            response=rec.get("response_text"),
            replayed=True,
            price_known=rec.get("price_known"),
        )
        return httpx2.Response(
            int(rec["status"]), headers=rec.get("headers") or {}, content=body, request=request
        )

    def write_ledger(
        self,
        call: _Call,
        response: httpx2.Response,
        body: bytes,
        usage: tuple[int, int, int, int] | None,
        cost: float,
        response_text: str | None,
    ) -> None:
        if call.ledger_key is None:
            return
        try:
            text, enc = call.redact(body.decode("utf-8")), "utf-8"
        except UnicodeDecodeError:
            text, enc = base64.b64encode(body).decode("ascii"), "b64"
        headers = {k: v for k, v in response.headers.items() if k in _SAFE_HEADERS}
        if call.ctx is not None and call.ctx.ledger_keys is not None:
            call.ctx.ledger_keys.add(call.ledger_key)
        call.run.store.set_record(
            "llm",
            call.ledger_key,
            {
                "ts": time.time(),
                "status": response.status_code,
                "headers": headers,
                "body": text,
                "enc": enc,
                "stream": call.stream,
                "model": call.model,
                "usage": list(usage) if usage else None,
                "cost_usd": cost,
                "price_known": call.price_known,
                "response_text": response_text,
            },
        )

    # -- money ------------------------------------------------------------------------

    def reserve(self, call: _Call, body: Mapping[str, Any]) -> None:
        """Reserve the call's worst case; refuses (and traces) with CostCapExceeded."""
        assert call.api is not None and call.model is not None
        model = call.model
        book = self.book
        known = book.is_known(model)
        call.price_known = known
        prompt = prompt_bound(call.api, body, book)
        output = _output_bound(call.api, body, book, model)
        n = body.get("n") if call.api == "chat" else 1
        output *= n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        if known:
            worst = book.worst_case(model, prompt, output)
        else:
            _warn_unknown(model)
            worst = (prompt * UNKNOWN_MODEL_RATES[0] + output * UNKNOWN_MODEL_RATES[1]) / 1e6
        what = f"this {model} call"
        try:
            refusal: NbagentError | None = None
            try:  # (no transaction: the reservation is one atomic step, see Store.add_if)
                call.reservation = call.run.reserve(worst, what=what)
            except NbagentError as exc:
                refusal = exc
            if refusal is None and not call.idem_key:
                # outside a step: the run's call counter, as the reservation left it,
                # makes ``run:R:call:N`` unique
                call.idem_key = f"run:{call.run.name}:call:{call.run.last_call_number}"
            if refusal is not None:
                raise refusal
        except NbagentError as exc:
            call.attempt += 1
            self.row(call, status="refused", error=f"{type(exc).__name__}: {exc}", latency=0.0)
            raise
        call.reserved = True
        # about to be sent: a step's live line shows itself now (see StepLine.lazy)
        call.run._emit({"type": "llm_started", "step": call.step_id, "model": model})

    def price(self, call: _Call, usage: tuple[int, int, int, int] | None) -> float:
        if usage is None or call.model is None:
            return 0.0
        inp, cached, out, reasoning = usage
        if call.price_known:
            return self.book.cost(call.model, inp, out, cached, reasoning)[0]
        return (inp * UNKNOWN_MODEL_RATES[0] + out * UNKNOWN_MODEL_RATES[1]) / 1e6

    def settle(self, call: _Call, cost: float | None, *, answered: bool = True) -> None:
        """Replace the reservation by ``cost`` (None: bill the whole reservation).

        ``answered=False`` (an error, no reply) does not count in the step's LLM calls.
        """
        if not call.reserved:
            return
        call.reserved = False
        real = call.reservation / NANO if cost is None else cost
        call.run.settle(call.reservation, real)
        if call.ctx is not None and answered:
            call.ctx.llm_calls += 1
            call.ctx.cost_usd += real

    # -- the trace ----------------------------------------------------------------------

    def row(
        self,
        call: _Call,
        *,
        status: str,
        error: str | None = None,
        wait_s: float | None = None,
        usage: tuple[int, ...] | None = None,
        cost: float = 0.0,
        latency: float | None = None,
        response: str | None = None,
        replayed: bool = False,
        price_known: bool | None = None,
        detail: dict[str, Any] | None = None,
        emit: bool = True,
    ) -> dict[str, Any]:
        """Trace one attempt; observers get the ``llm_call`` event (returned) unless ``emit`` is
        False (the caller emits it, e.g. after the transaction holding the row commits)."""
        inp, cached, out, reasoning = usage if usage else (None, None, None, None)
        if call.request_text is None:
            call.request_text = self.request_text(call, call.raw)
        if latency is None:
            latency = time.perf_counter() - call.t_attempt
        known = call.price_known if price_known is None else price_known
        error = call.redact(error) if error else error
        call.run.record_event(
            kind="llm",
            name=call.name,
            step=call.step_id,
            attempt=call.attempt,
            status=status,
            error=error,
            wait_s=wait_s,
            model=call.model,
            input_tokens=inp,
            cached_tokens=cached,
            output_tokens=out,
            reasoning_tokens=reasoning,
            cost_usd=cost,
            latency_s=latency,
            idempotency_key=call.idem_key or None,
            replayed=int(replayed),
            price_known=None if known is None else int(known),
            request=call.request_text,
            response=call.redact(response) if response else response,
            detail=detail,
        )
        event = {
            "type": "llm_call",
            "step": call.step_id,
            "attempt": call.attempt,
            "status": status,
            "model": call.model,
            "input_tokens": inp,
            "cached_tokens": cached,
            "output_tokens": out,
            "reasoning_tokens": reasoning,
            "cost_usd": cost,
            "latency_s": latency,
            "error": error,
            "wait_s": wait_s,
            "replayed": replayed,
        }
        if emit:
            call.run._emit(event)
        return event

    def on_attempt(self, call: _Call, info: AttemptInfo) -> None:
        """One failed attempt: a trace row, alerts, the stop switch, the retry event."""
        if info.outcome == "ok":
            return
        exc = info.exception
        response_text = None
        if isinstance(exc, ResponseStatusError):
            response_text = exc.response.content.decode("utf-8", "replace")
            error = f"HTTP {exc.status_code}: {_error_message(response_text)}"
        else:
            error = f"{type(exc).__name__}: {exc}"
        error = call.redact(error)
        refused = isinstance(exc, BreakerOpenError)
        if refused:
            call.attempt += 1  # the breaker refused before our send() ran
        self.row(
            call,
            status="refused" if refused else "error",
            error=error,
            wait_s=info.wait_s,
            latency=0.0 if refused else None,
            response=response_text,
            detail={"rule": info.rule} if info.rule else None,
        )
        run = call.run
        if info.alert:
            kind = (
                "auth"
                if info.stop_run
                else "circuit"
                if info.alert.startswith("circuit")
                else "server_error"
                if "503" in info.alert
                else "llm"
            )
            run.alert(kind, f"{info.alert}: {call.name} {call.model or ''} — {error}".strip())
        if info.stop_run:
            run.stop(f"auth failure: {error} — fix the API key, then resume")
        if info.will_retry:
            run._emit(
                {
                    "type": "llm_retrying",
                    "step": call.step_id,
                    "attempt": call.attempt,
                    "wait_s": info.wait_s,
                    "error": error,
                }
            )

    # -- finishing ----------------------------------------------------------------------

    def finish_plain(
        self, call: _Call, response: httpx2.Response, content: bytes
    ) -> list[dict[str, Any]] | None:
        """A complete 200 body: price, settle, trace, ledger.

        Returns the messages to append for the one tool-schema feedback re-send, or None
        when the response is final (then it is in the ledger).
        """
        try:
            data = json.loads(content)
        except ValueError:
            data = None
        usage = None
        if isinstance(data, dict) and call.api is not None:
            usage = _usage_numbers(call.api, data.get("usage"))
        cost = call.reservation / NANO if usage is None else self.price(call, usage)
        problem, feedback = None, None
        if call.api == "chat" and isinstance(data, dict) and self.feedback:
            problem, feedback = _tool_problems(call.body or {}, data)
        retry = feedback is not None and not call.fed_back
        error = None
        if problem:
            error = f"ToolValidationError: {problem}"
            error += " (re-sent once with the error fed back)" if retry else " (returned as is)"
        text = content.decode("utf-8", "replace")
        with call.run.store.batch():  # one commit: the settlement, the ledger, the row
            self.settle(call, cost)  # no usage reported: billed at the reservation
            if not retry:
                self.write_ledger(call, response, content, usage, cost, text)
            event = self.row(
                call,
                status="error" if retry else "ok",
                error=error,
                usage=usage,
                cost=cost,
                response=text,
                detail=None if usage else {"usage": "not reported: billed at the reservation"},
                emit=False,
            )
        call.run._emit(event)  # observers after the commit
        call.extra["last"] = (usage, cost, text)
        return feedback if retry else None

    def feedback_request(
        self, call: _Call, request: httpx2.Request, messages: list[dict[str, Any]]
    ) -> httpx2.Request:
        assert call.body is not None
        body = dict(call.body)
        body["messages"] = [*body.get("messages", []), *messages]
        call.fed_back = True
        call.attempt_base = call.attempt
        call.body = body
        call.request_text = None
        new = rebuild(request, body)
        call.raw = new.content
        new.headers["Idempotency-Key"] = f"{call.idem_key}:feedback"
        return new


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text[:300]


def _tool_problems(
    body: Mapping[str, Any], data: Mapping[str, Any]
) -> tuple[str | None, list[dict[str, Any]] | None]:
    """Validate choice 0's tool calls against the declared tools.

    Returns (problem text, the messages to append) or (None, None) when all is well.
    """
    tools = body.get("tools")
    choices = data.get("choices")
    if not isinstance(tools, list) or not tools or not isinstance(choices, list) or not choices:
        return None, None
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list) or not calls:
        return None, None
    schemas: dict[str, Any] = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}
    problems: list[str] = []
    replies: list[dict[str, Any]] = []
    for tc in calls:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            continue  # custom tools have no JSON schema
        name = fn.get("name")
        feedback = None
        if name not in schemas:
            known = ", ".join(sorted(schemas))
            problem = f"tool {name!r} is not declared (declared: {known})"
            feedback = f"There is no tool named {name!r}; use one of: {known}."
        else:
            try:
                validate_tool_arguments(fn.get("arguments") or "", schemas[name], tool_name=name)
                problem = None
            except ToolValidationError as exc:
                problem = "; ".join(exc.errors)
                feedback = exc.feedback
        if problem:
            problems.append(f"{name}: {problem}")
        replies.append(
            {
                "role": "tool",
                "tool_call_id": tc.get("id"),
                "content": feedback
                or "Not executed, because another tool call in this turn was rejected. "
                "Call it again if it is still needed.",
            }
        )
    if not problems:
        return None, None
    assistant: dict[str, Any] = {"role": "assistant", "content": message.get("content")}  # type: ignore[union-attr]
    assistant["tool_calls"] = calls
    return "; ".join(problems), [assistant, *replies]


def rebuild(request: httpx2.Request, body: Mapping[str, Any]) -> httpx2.Request:
    """The same request with a new JSON body (headers kept, content-length recomputed)."""
    headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
    return httpx2.Request(
        request.method,
        request.url,
        headers=headers,
        content=json.dumps(body, separators=(",", ":")).encode("utf-8"),
        extensions=request.extensions,
    )


# --------------------------------------------------------------------------- streams


class _StreamTee:
    """Parses an SSE stream as it flows through: usage, assembled text, completeness."""

    def __init__(self, core: _Core, call: _Call, response: httpx2.Response) -> None:
        self.core, self.call, self.response = core, call, response
        self.decoder: Any = None
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding and encoding != "identity":
            probe = httpx2.Response(200, headers={"content-encoding": encoding}, content=b"")
            self.decoder = probe._get_content_decoder()  # noqa: SLF001
            del response.headers["content-encoding"]  # we hand decoded bytes to the SDK
            if "content-length" in response.headers:
                del response.headers["content-length"]
        self.buffer = b""
        self.sent: list[bytes] = []
        self.usage: tuple[int, int, int, int] | None = None
        self.done = False
        self.texts: dict[int, list[str]] = {}
        self.tool_calls: dict[tuple[int, int], dict[str, Any]] = {}
        self.finish: dict[int, Any] = {}
        self.final: Any = None
        self.error: BaseException | None = None
        self.finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self.decoder is not None:
            chunk = self.decoder.decode(chunk)
        self.buffer += chunk
        out: list[bytes] = []
        while True:
            match = _EVENT_END.search(self.buffer)
            if match is None:
                break
            event, self.buffer = self.buffer[: match.end()], self.buffer[match.end() :]
            if self.keep(event):
                out.append(event)
        data = b"".join(out)
        if data:
            self.sent.append(data)
        return data

    def flush(self) -> bytes:
        if self.decoder is not None:
            self.buffer += self.decoder.flush()
        data, self.buffer = self.buffer, b""
        if data:
            self.sent.append(data)
        return data

    def keep(self, event: bytes) -> bool:
        """Parse one event; False to drop it (the usage chunk we asked for)."""
        lines = event.decode("utf-8", "replace").splitlines()
        payload = "\n".join(line[5:].lstrip(" ") for line in lines if line.startswith("data:"))
        if not payload:
            return True
        if payload.startswith("[DONE]"):
            self.done = True
            return True
        try:
            obj = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        api = self.call.api
        if api == "chat":
            usage = _usage_numbers("chat", obj.get("usage"))
            if usage is not None:
                self.usage = usage
            choices = obj.get("choices") or []
            for choice in choices:
                self._chat_delta(choice)
            if usage is not None and not choices and self.call.strip_usage:
                return False
        elif api == "responses":
            kind = obj.get("type")
            if kind == "response.output_text.delta":
                self.texts.setdefault(0, []).append(str(obj.get("delta", "")))
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                self.final = obj.get("response")
                if isinstance(self.final, dict):
                    self.usage = _usage_numbers("responses", self.final.get("usage"))
                self.done = True
        return True

    def _chat_delta(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        index = int(choice.get("index") or 0)
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            self.texts.setdefault(index, []).append(delta["content"])
        for tc in delta.get("tool_calls") or []:
            slot = self.tool_calls.setdefault((index, int(tc.get("index") or 0)), {})
            if tc.get("id"):
                slot["id"] = tc["id"]
            fn = tc.get("function") or {}
            if fn.get("name"):
                slot["name"] = fn["name"]
            slot["arguments"] = slot.get("arguments", "") + (fn.get("arguments") or "")
        if choice.get("finish_reason"):
            self.finish[index] = choice["finish_reason"]

    def assembled(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stream": True}
        if self.call.api == "responses" and isinstance(self.final, dict):
            out["response"] = self.final
        out["text"] = "".join(self.texts.get(0, []))
        if len(self.texts) > 1:
            out["texts"] = {i: "".join(t) for i, t in sorted(self.texts.items())}
        if self.tool_calls:
            out["tool_calls"] = [v for _, v in sorted(self.tool_calls.items())]
        if self.finish:
            out["finish_reason"] = self.finish.get(0)
        if self.usage:
            out["usage"] = dict(
                zip(("input", "cached", "output", "reasoning"), self.usage, strict=True)
            )
        return out

    def finish_stream(self) -> None:
        """Price, settle, trace and (complete streams only) write the ledger; once."""
        if self.finished:
            return
        self.finished = True
        core, call = self.core, self.call
        try:
            text = json.dumps(self.assembled(), ensure_ascii=False)
            if self.usage is not None:
                cost = core.price(call, self.usage)
            else:
                cost = call.reservation / NANO  # the upper bound: the server may have billed it
            complete = self.done and self.error is None
            with call.run.store.batch():  # one commit: the settlement and the ledger
                core.settle(call, cost)
                if complete:
                    core.write_ledger(
                        call, self.response, b"".join(self.sent), self.usage, cost, text
                    )
            error = None
            if self.error is not None:
                error = f"{type(self.error).__name__}: {self.error}"
            elif not complete:
                error = "stream closed before it completed"
            detail = None
            if self.usage is None:
                detail = {"usage": "not received: billed at the reservation (upper bound)"}
            core.row(
                call,
                status="ok" if complete else "error",
                error=error,
                usage=self.usage,
                cost=cost,
                response=text,
                detail=detail,
            )
        except Exception:  # finishing runs in close()/finally: never break the caller's stream
            log.exception("nbagent: could not record a finished LLM stream")


class _TracedSyncStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, tee: _StreamTee) -> None:
        self.inner, self.tee = inner, tee

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.inner:
                data = self.tee.feed(chunk)
                if data:
                    yield data
            tail = self.tee.flush()
            if tail:
                yield tail
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self.tee.error = exc
            raise
        finally:
            self.tee.finish_stream()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.tee.finish_stream()

    def __del__(self) -> None:  # a stream dropped without being read still settles
        with contextlib.suppress(Exception):
            self.tee.finish_stream()


class _TracedAsyncStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, tee: _StreamTee) -> None:
        self.inner, self.tee = inner, tee

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                data = self.tee.feed(chunk)
                if data:
                    yield data
            tail = self.tee.flush()
            if tail:
                yield tail
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self.tee.error = exc
            raise
        finally:
            self.tee.finish_stream()

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.tee.finish_stream()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.tee.finish_stream()


# --------------------------------------------------------------------------- transports


def _breaker_clean(breaker: CircuitBreaker) -> bool:
    """Closed, with no rate-limit failure counted: a success needs no breaker update."""
    return breaker.opened_at is None and breaker.consecutive_failures == 0


def _replaying(
    exc: BaseException, send: Callable[[], httpx2.Response]
) -> Callable[[], httpx2.Response]:
    """``send`` whose first call re-raises ``exc`` (the fast path's failed first attempt)."""
    pending = [exc]

    def again() -> httpx2.Response:
        if pending:
            raise pending.pop()
        return send()

    return again


def _areplaying(
    exc: BaseException, send: Callable[[], Awaitable[httpx2.Response]]
) -> Callable[[], Awaitable[httpx2.Response]]:
    pending = [exc]

    async def again() -> httpx2.Response:
        if pending:
            raise pending.pop()
        return await send()

    return again


class TracedTransport(httpx2.BaseTransport):
    """An httpx2 transport that traces, caps, retries and ledgers LLM calls (see module doc).

    :param inner: the transport that really sends (``httpx2.HTTPTransport``, a simulator).
    :param run: the run to charge; ``None``: the current run at call time.
    :param prices: a :class:`~nbagent._pricing.PriceBook` or a dict of price overrides.
    :param policy: retry policy or overrides on the default table.
    :param base_url: endpoint key of the circuit breaker (default: the URL's origin).
    """

    def __init__(
        self,
        inner: httpx2.BaseTransport,
        *,
        run: Run | None = None,
        prices: PriceBook | Mapping[str, Mapping[str, Any]] | None = None,
        policy: PolicyLike = None,
        base_url: str | None = None,
    ) -> None:
        self.inner = inner
        self.core = _Core(run, prices, policy, base_url)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        core = self.core
        request.read()
        call = core.prepare(request)
        rec = core.ledger_hit(call)
        if rec is not None:
            return core.replay(call, rec, request)
        if call.api is None or call.body is None:
            call.run.check_not_stopped()
            self.core.assign_key(call)
            return self._send(call, request)
        core.reserve(call, call.body)
        request = core.add_stream_usage(call, request)
        try:
            response = self._send(call, request)
            if response.status_code >= 400:
                core.settle(call, 0.0, answered=False)
                return response
            if call.stream:
                tee = _StreamTee(core, call, response)
                assert isinstance(response.stream, httpx2.SyncByteStream)
                response.stream = _TracedSyncStream(response.stream, tee)
                return response
            content = response.read()
            messages = core.finish_plain(call, response, content)
            if messages is None:
                return response
            # one re-send with the validation error fed back to the model
            second = core.feedback_request(call, request, messages)
            try:
                core.reserve(call, call.body or {})
            except CostCapExceeded:
                core.write_ledger(call, response, content, *call.extra["last"])
                return response
            final = self._send(call, second)
            if final.status_code >= 400:
                core.settle(call, 0.0, answered=False)
                return final
            core.finish_plain(call, final, final.read())
            return final
        except BaseException:
            core.settle(call, 0.0, answered=False)
            raise

    def _send(self, call: _Call, request: httpx2.Request) -> httpx2.Response:
        core = self.core
        first = call.attempt + 1
        request.headers.setdefault("Idempotency-Key", call.idem_key)

        def send() -> httpx2.Response:
            call.attempt += 1
            call.t_attempt = time.perf_counter()
            request.headers["x-stainless-retry-count"] = str(call.attempt - first)
            response = self.inner.handle_request(request)
            if response.status_code >= 400:
                response.read()
                raise ResponseStatusError(response)
            return response

        breaker = breaker_for(core.endpoint(request))
        fn = send
        if _breaker_clean(breaker):
            # Fast path (most calls): the first attempt runs without the retry machinery
            # (~50 µs of tenacity set-up). A failure is handed to the Retrier as its first
            # attempt, so classification, waits, rows and alerts are exactly the same.
            try:
                response = send()
            except BaseException as exc:
                fn = _replaying(exc, send)
            else:
                if call.api is None:
                    core.row(call, status="ok")
                return response
        retrier = Retrier(
            core.policy_for(call.run),
            breaker=breaker,
            on_attempt=lambda info: core.on_attempt(call, info),
        )
        try:
            response = retrier(fn)
        except ResponseStatusError as exc:
            return exc.response  # type: ignore[no-any-return]
        if call.api is None:  # other endpoints: traced, unpriced
            core.row(call, status="ok")
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncTracedTransport(httpx2.AsyncBaseTransport):
    """The async twin of :class:`TracedTransport` (for ``openai.AsyncOpenAI``)."""

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport,
        *,
        run: Run | None = None,
        prices: PriceBook | Mapping[str, Mapping[str, Any]] | None = None,
        policy: PolicyLike = None,
        base_url: str | None = None,
    ) -> None:
        self.inner = inner
        self.core = _Core(run, prices, policy, base_url)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        core = self.core
        await request.aread()
        call = core.prepare(request)
        rec = core.ledger_hit(call)
        if rec is not None:
            return core.replay(call, rec, request)
        if call.api is None or call.body is None:
            call.run.check_not_stopped()
            self.core.assign_key(call)
            return await self._send(call, request)
        core.reserve(call, call.body)
        request = core.add_stream_usage(call, request)
        try:
            response = await self._send(call, request)
            if response.status_code >= 400:
                core.settle(call, 0.0, answered=False)
                return response
            if call.stream:
                tee = _StreamTee(core, call, response)
                assert isinstance(response.stream, httpx2.AsyncByteStream)
                response.stream = _TracedAsyncStream(response.stream, tee)
                return response
            content = await response.aread()
            messages = core.finish_plain(call, response, content)
            if messages is None:
                return response
            second = core.feedback_request(call, request, messages)
            try:
                core.reserve(call, call.body or {})
            except CostCapExceeded:
                core.write_ledger(call, response, content, *call.extra["last"])
                return response
            final = await self._send(call, second)
            if final.status_code >= 400:
                core.settle(call, 0.0, answered=False)
                return final
            core.finish_plain(call, final, await final.aread())
            return final
        except BaseException:
            core.settle(call, 0.0, answered=False)
            raise

    async def _send(self, call: _Call, request: httpx2.Request) -> httpx2.Response:
        core = self.core
        first = call.attempt + 1
        request.headers.setdefault("Idempotency-Key", call.idem_key)

        async def send() -> httpx2.Response:
            call.attempt += 1
            call.t_attempt = time.perf_counter()
            request.headers["x-stainless-retry-count"] = str(call.attempt - first)
            response = await self.inner.handle_async_request(request)
            if response.status_code >= 400:
                await response.aread()
                raise ResponseStatusError(response)
            return response

        breaker = breaker_for(core.endpoint(request))
        fn: Callable[[], Awaitable[httpx2.Response]] = send
        if _breaker_clean(breaker):  # fast path, see TracedTransport._send
            try:
                response: httpx2.Response = await send()
            except BaseException as exc:
                fn = _areplaying(exc, send)
            else:
                if call.api is None:
                    core.row(call, status="ok")
                return response
        retrier = AsyncRetrier(
            core.policy_for(call.run),
            breaker=breaker,
            on_attempt=lambda info: core.on_attempt(call, info),
        )
        try:
            response = await retrier(fn)
        except ResponseStatusError as exc:
            return exc.response  # type: ignore[no-any-return]
        if call.api is None:
            core.row(call, status="ok")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# --------------------------------------------------------------------------- factories


def _unwrap(transport: Any) -> Any:
    while isinstance(transport, (TracedTransport, AsyncTracedTransport)):
        transport = transport.inner
    return transport


def _wrap_http_client(hc: Any, make: Any) -> None:
    """Wrap an httpx2 client's transport and every mounted one (proxy mounts win)."""
    if not isinstance(hc, (httpx2.Client, httpx2.AsyncClient)):
        raise NbagentError(
            f"nbagent can only trace an httpx2 http_client (openai >= 3), not "
            f"{type(hc).__module__}.{type(hc).__name__}. Pass httpx2.Client(...) or "
            "leave http_client out."
        )
    hc._transport = make(_unwrap(hc._transport))  # noqa: SLF001 - no public swap in httpx2
    for pattern, transport in list(hc._mounts.items()):  # noqa: SLF001
        if transport is not None:
            hc._mounts[pattern] = make(_unwrap(transport))  # noqa: SLF001


def _client_kwargs(openai_kwargs: dict[str, Any]) -> dict[str, Any]:
    retries = openai_kwargs.pop("max_retries", 0)
    if retries:
        warnings.warn(
            f"max_retries={retries} ignored: nbagent retries LLM calls itself (policy table); "
            "pass policy={...} to nbagent.openai_client to change it.",
            stacklevel=3,
        )
    return {**openai_kwargs, "max_retries": 0}


def openai_client(
    run: Run | None = None,
    *,
    prices: PriceBook | Mapping[str, Mapping[str, Any]] | None = None,
    policy: PolicyLike = None,
    **openai_kwargs: Any,
) -> openai.OpenAI:
    """A real :class:`openai.OpenAI` whose calls are traced, capped and retried by nbagent.

    :param run: the run to charge (default: the current run at call time).
    :param prices: a PriceBook, or price overrides ``{model: {"input_per_mtok": ...,
        "output_per_mtok": ...}}`` (USD per million tokens; 0 for local models).
    :param policy: retry policy, or overrides of the default table
        (``{"timeout": {"retries": 1}}``).
    :param openai_kwargs: passed to ``openai.OpenAI`` (``api_key``, ``base_url``,
        ``http_client``, ...). ``max_retries`` is forced to 0: nbagent owns retries.
    """
    kwargs = _client_kwargs(openai_kwargs)
    client = openai.OpenAI(**kwargs)
    base_url = str(client.base_url)
    _wrap_http_client(
        client._client,  # noqa: SLF001 - the http client openai keeps (a user's one too)
        lambda inner: TracedTransport(
            inner, run=run, prices=prices, policy=policy, base_url=base_url
        ),
    )
    return client


def async_openai_client(
    run: Run | None = None,
    *,
    prices: PriceBook | Mapping[str, Mapping[str, Any]] | None = None,
    policy: PolicyLike = None,
    **openai_kwargs: Any,
) -> openai.AsyncOpenAI:
    """:func:`openai_client` for :class:`openai.AsyncOpenAI`."""
    kwargs = _client_kwargs(openai_kwargs)
    client = openai.AsyncOpenAI(**kwargs)
    base_url = str(client.base_url)
    _wrap_http_client(
        client._client,  # noqa: SLF001
        lambda inner: AsyncTracedTransport(
            inner, run=run, prices=prices, policy=policy, base_url=base_url
        ),
    )
    return client


def simulated_client(
    *,
    replies: Any = None,
    latency_s: float = 0.0,
    faults: Any = None,
    model: str = "gpt-4o-mini",
    run: Run | None = None,
    async_: bool = False,
    sim: SimulatedLLM | None = None,
    prices: PriceBook | Mapping[str, Mapping[str, Any]] | None = None,
    policy: PolicyLike = None,
    **openai_kwargs: Any,
) -> Any:
    """The traced client talking to the built-in simulated LLM (offline, priced as if real).

    :param replies: scripted replies or a reply function (see :class:`SimulatedLLM`).
    :param latency_s: simulated time to first byte.
    :param faults: faults to inject into the first requests (``["rate_limit", "timeout"]``).
    :param model: the model lessons should ask for; kept as ``client.nbagent_model``.
    :param sim: an existing simulator (its ``requests`` show what was sent); overrides
        ``replies``, ``latency_s`` and ``faults``.
    :returns: ``openai.OpenAI`` (``openai.AsyncOpenAI`` with ``async_=True``); the
        simulator is ``client.nbagent_sim``.
    """
    transport = sim or SimulatedLLM(replies, latency_s=latency_s, faults=faults)
    options: dict[str, Any] = {"api_key": SIMULATED_API_KEY, "base_url": SIMULATED_BASE_URL}
    options.update(openai_kwargs)
    client: Any
    if async_:
        options["http_client"] = httpx2.AsyncClient(transport=transport)
        client = async_openai_client(run, prices=prices, policy=policy, **options)
    else:
        options["http_client"] = httpx2.Client(transport=transport)
        client = openai_client(run, prices=prices, policy=policy, **options)
    client.nbagent_sim = transport
    client.nbagent_model = model
    return client


def default_client(
    run: Run | None = None,
    *,
    async_: bool = False,
    model: str | None = None,
    **kwargs: Any,
) -> Any:
    """A real traced client when ``OPENAI_API_KEY`` is set, else the simulated one.

    The simulated case prints one line (once per process) saying so and how to use a real
    model. ``client.nbagent_model`` is ``model``, else ``$NBAGENT_MODEL``, else
    ``"gpt-4o-mini"``. ``$NBAGENT_SIM_LATENCY_S`` sets the simulated model's time to first
    byte (default 0): time to interrupt a headless run mid-step, as a lesson does.
    """
    global _notice_shown
    chosen = model or os.environ.get("NBAGENT_MODEL") or "gpt-4o-mini"
    client: Any
    if os.environ.get("OPENAI_API_KEY"):
        factory = async_openai_client if async_ else openai_client
        client = factory(run, **kwargs)
        client.nbagent_model = chosen
        return client
    if not _notice_shown:
        _notice_shown = True
        print(_SIMULATOR_NOTICE, file=sys.stdout, flush=True)
    latency = os.environ.get("NBAGENT_SIM_LATENCY_S")
    if latency and "latency_s" not in kwargs and "sim" not in kwargs:
        try:
            kwargs["latency_s"] = float(latency)
        except ValueError:
            raise NbagentError(
                f"NBAGENT_SIM_LATENCY_S={latency!r} is not a number of seconds (e.g. 0.5)."
            ) from None
    return simulated_client(run=run, async_=async_, model=chosen, **kwargs)
