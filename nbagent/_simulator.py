"""A simulated LLM: an OpenAI-compatible server that lives inside an httpx2 transport.

openai >= 3 talks HTTP through ``httpx2``. :class:`SimulatedLLM` is an httpx2 transport
(sync and async), so the *real* ``openai.OpenAI`` client builds the request, sends it
"over the wire", parses the reply and raises its own exceptions, exactly as it does
against api.openai.com. Lessons and tests therefore exercise the same code path as
production, for free and offline::

    sim = SimulatedLLM(replies=["Paris."])
    client = make_simulated_openai(sim)
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])

What it serves
    ``POST /v1/chat/completions`` (plain, ``n`` choices, ``stream: true`` as SSE with
    ``stream_options.include_usage``, tool calls, ``response_format``) and
    ``POST /v1/responses`` (plain and streaming events). Any other path is a 404.

Replies
    Scripted replies (``replies=[...]``) are consumed in order, one per successful
    request; a reply is a string (the text), or a dict ``{"content": "...",
    "tool_calls": [{"name": ..., "arguments": {...} | "raw string"}]}``. ``replies`` may
    instead be a callable ``(request_json) -> str | dict | None``. When nothing is
    scripted (or the script is used up, or the callable returns None) a deterministic
    rule-based reply is made from the request (see :func:`default_reply`).

Token counting (deterministic, documented so tests can predict it)
    ``count_tokens(text) = ceil(len(text) / 4)`` -- OpenAI's own rule of thumb. A chat
    prompt costs ``3 + sum(4 + tokens(role) + tokens(content))`` plus
    ``tokens(json(tools))``; a Responses prompt counts ``instructions`` and every input
    item the same way. Reasoning models (the name matches ``o<digit>...`` or starts with
    ``gpt-5``) add a fixed number of reasoning tokens per ``reasoning_effort`` (see
    :data:`REASONING_TOKENS`); they are part of the output tokens and of the output
    budget, as at OpenAI. ``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens`` truncate the visible text (``finish_reason="length"``,
    Responses ``status="incomplete"``).

Prompt caching
    Like OpenAI: a prompt of at least ``cache_min_tokens`` (1024) tokens that shares a
    prefix with an earlier successful request to the same model reports that prefix as
    ``cached_tokens``, in blocks of 128 tokens. ``cached_prefix_tokens=N`` instead
    reports ``min(N, prompt_tokens)`` cached tokens on every request.

Faults
    ``faults=[...]`` or ``sim.fail_next(kind, times=1, **opts)`` queue faults; each
    request reaching the transport takes the next one. See :data:`FAULT_KINDS`. A
    faulted request never consumes a scripted reply, so a retry gets the same reply.

Bookkeeping
    ``sim.requests`` (the parsed JSON body of every request that reached the transport,
    faulted or not), ``sim.request_count`` and ``sim.calls`` (path, body, outcome). The
    Authorization header is never read or stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import httpx2
import openai

from ._errors import NbagentError

__all__ = [
    "FAULT_KINDS",
    "REASONING_TOKENS",
    "SIMULATED_API_KEY",
    "SIMULATED_BASE_URL",
    "Fault",
    "SimulatedCall",
    "SimulatedLLM",
    "SimulatorConfigError",
    "count_tokens",
    "default_reply",
    "is_reasoning_model",
    "make_simulated_openai",
]

# --------------------------------------------------------------------------- constants

#: The base URL of :func:`make_simulated_openai` clients. ``.invalid`` can never resolve,
#: so a request that escapes the transport fails loudly instead of reaching a server.
SIMULATED_BASE_URL = "https://simulated.nbagent.invalid/v1"
#: The dummy API key of simulated clients (never checked, never stored).
SIMULATED_API_KEY = "sk-simulated"

CHARS_PER_TOKEN = 4
CACHE_BLOCK_TOKENS = 128
#: Prompts remembered for the prompt-cache simulation (oldest forgotten first).
_CACHE_MEMORY = 256

#: Reasoning tokens a reasoning model spends per ``reasoning_effort`` (default "medium").
REASONING_TOKENS: Mapping[str, int] = {
    "none": 0,
    "minimal": 16,
    "low": 64,
    "medium": 192,
    "high": 512,
    "xhigh": 1024,
}

#: Fault kinds and what the openai client raises for each (with ``max_retries=0``).
FAULT_KINDS: Mapping[str, str] = {
    "timeout": "httpx2.ReadTimeout -> openai.APITimeoutError",
    "connection": "httpx2.ConnectError -> openai.APIConnectionError",
    "rate_limit": "429 + Retry-After / retry-after-ms -> openai.RateLimitError",
    "server_error": "500 -> openai.InternalServerError",
    "unavailable": "503 -> openai.InternalServerError",
    "auth": "401 -> openai.AuthenticationError",
    "forbidden": "403 -> openai.PermissionDeniedError",
    "bad_request": "400 -> openai.BadRequestError",
    "bad_tool_args": "200 whose tool-call arguments are malformed JSON or break the schema",
    "stream_cut": "stream stops after `after_events` events -> openai.APIConnectionError",
}

# status, OpenAI error type, code, default message
_HTTP_FAULTS: Mapping[str, tuple[int, str, str | None, str]] = {
    "rate_limit": (
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests (simulated). Please try again later.",
    ),
    "server_error": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request (simulated).",
    ),
    "unavailable": (
        503,
        "server_error",
        None,
        "The engine is currently overloaded, please try again later (simulated).",
    ),
    "auth": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided (simulated).",
    ),
    "forbidden": (
        403,
        "invalid_request_error",
        "unsupported_country_region_territory",
        "You are not allowed to use this model (simulated).",
    ),
    "bad_request": (
        400,
        "invalid_request_error",
        None,
        "Invalid request (simulated).",
    ),
}

Reply = str | dict[str, Any]
ReplyFunction = Callable[[dict[str, Any]], "Reply | None"]


class SimulatorConfigError(NbagentError, ValueError):
    """The simulated LLM was configured wrongly (unknown fault kind, bad scripted reply)."""


# --------------------------------------------------------------------------- small helpers


def count_tokens(text: str) -> int:
    """Simulated token count of ``text``: ``ceil(len(text) / 4)`` (0 for empty text)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def is_reasoning_model(model: str) -> bool:
    """True for models that spend reasoning tokens: ``o1``, ``o3-mini``, ``gpt-5*``, ..."""
    return re.match(r"^(o\d|gpt-5)", model.lower()) is not None


def _digest(*parts: object) -> str:
    raw = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def _text_of(value: Any) -> str:
    """All the text in a message content / Responses input item, concatenated."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(t for t in (_text_of(v) for v in value) if t)
    if isinstance(value, dict):
        for key in ("text", "content", "output", "arguments", "refusal"):
            if key in value:
                return _text_of(value[key])
    return ""


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One injected fault; see :data:`FAULT_KINDS`.

    :param kind: one of :data:`FAULT_KINDS`.
    :param times: how many consecutive requests it hits.
    :param retry_after_s: ``rate_limit``: the ``Retry-After`` seconds (``retry-after-ms``
        carries the same value in ms). None sends no retry headers.
    :param message: the error message (default: a realistic one).
    :param mode: ``bad_tool_args``: ``"malformed_json"`` (default) or ``"schema_mismatch"``.
    :param after_events: ``stream_cut``: SSE events sent before the connection drops.
    """

    kind: str
    times: int = 1
    retry_after_s: float | None = 1.0
    message: str | None = None
    mode: Literal["malformed_json", "schema_mismatch"] = "malformed_json"
    after_events: int = 2

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise SimulatorConfigError(
                f"Unknown fault kind {self.kind!r}; use one of: {', '.join(FAULT_KINDS)}."
            )
        if self.times < 1:
            raise SimulatorConfigError(f"Fault times must be >= 1, got {self.times}.")
        if self.mode not in ("malformed_json", "schema_mismatch"):
            raise SimulatorConfigError(
                f"bad_tool_args mode must be 'malformed_json' or 'schema_mismatch', not {self.mode!r}."
            )


@dataclass(frozen=True)
class SimulatedCall:
    """One request that reached the simulator."""

    #: URL path, e.g. ``/v1/chat/completions``.
    path: str
    #: The parsed JSON body (``{}`` when the body was not JSON).
    body: dict[str, Any]
    #: ``"ok"``, ``"length"`` (truncated), a fault kind, or ``"error"`` (bad request/404).
    outcome: str


# --------------------------------------------------------------------------- replies


@dataclass
class _Output:
    """What the model "says", before truncation and serialisation."""

    content: str | None
    tool_calls: list[tuple[str, str]]  # (name, arguments as sent on the wire)


_DECOMPOSE = re.compile(
    r"sub-?\s?questions?|break (?:it |this |the \w+ )?(?:down|into)|decompos|split (?:it |this )?into"
)
_SUMMARIZE = re.compile(r"summar|answer|synthes|conclu|final report|write up")
_SUBJECT = re.compile(r"(?:goal|question|topic|task)\s*[:=]\s*(.+)", re.IGNORECASE)
_FIRST_SENTENCE = re.compile(r"(?<=[.?!])\s+")
_INSTRUCTION_PREFIX = re.compile(
    r"^(?:please\s+)?(?:summari[sz]e|answer|explain|research|describe)\b[^:]{0,40}:\s*",
    re.IGNORECASE,
)


def _subject(text: str) -> str:
    """The goal/question a prompt is about: after ``Goal:``/``Question:``, else its last line."""
    match = _SUBJECT.search(text)
    if match:
        subject = match.group(1)
    else:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        subject = lines[-1] if lines else "the question"
    subject = _FIRST_SENTENCE.split(subject.strip(), maxsplit=1)[0]
    subject = _INSTRUCTION_PREFIX.sub("", subject)
    subject = subject.strip().strip("\"'").rstrip(".?!:;").strip()
    if len(subject) > 120:
        subject = subject[:117].rstrip() + "..."
    return subject or "the question"


_DECOMPOSE_TEMPLATES = (
    (
        "What is already known about {s}?",
        "Which factors or mechanisms matter most for {s}?",
        "What evidence would settle the open questions about {s}?",
    ),
    (
        "How is {s} defined and measured?",
        "What do the main sources say about {s}, and where do they disagree?",
        "What are the practical implications of {s}?",
    ),
)
_SUMMARY_TEMPLATES = (
    'On the question "{s}": the sources agree on the main points, the key factors are '
    "well documented, and a few details remain uncertain. Overall the evidence supports a "
    "clear, qualified answer. (simulated)",
    'Summary for "{s}": the findings point in one direction; the strongest evidence covers '
    "the central claim, while the remaining gaps are minor and could be closed with one or "
    "two more sources. (simulated)",
)


def default_reply(request: Mapping[str, Any], *, seed: int = 0) -> Reply:
    """The rule-based reply to ``request`` (a chat or Responses request body).

    Deterministic: the same request and seed give the same reply.

    * A forced tool call (``tool_choice`` ``"required"`` or naming a function) -> a call
      of that tool whose arguments are an example built from its JSON schema.
    * Structured output (``response_format`` / ``text.format`` json_schema) -> JSON
      matching the schema; ``json_object`` -> ``{"answer": ...}``.
    * The prompt asks to break a goal into sub-questions -> 3 numbered lines.
    * The prompt asks to summarize/answer -> a short paragraph quoting the question.
    * Otherwise a short answer echoing the question and a digest of the conversation
      (model, instructions, messages/input: streaming or not gives the same reply).
    """
    user_text, all_text = _prompt_texts(request)
    subject = _subject(user_text)
    variant = int(_digest(seed, subject), 16)

    forced = _forced_tool(request)
    if forced is not None:
        name, schema = forced
        return {"tool_calls": [{"name": name, "arguments": _example_from_schema(schema, subject)}]}

    fmt = _output_format(request)
    if fmt is not None:
        if fmt.get("type") == "json_schema":
            schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema") or {}
            return json.dumps(_example_from_schema(schema, subject))
        if fmt.get("type") == "json_object":
            return json.dumps({"answer": f"Simulated answer about {subject}."})

    lowered = all_text.lower()
    if _DECOMPOSE.search(lowered):
        questions = _DECOMPOSE_TEMPLATES[variant % len(_DECOMPOSE_TEMPLATES)]
        return "\n".join(f"{i}. {q.format(s=subject)}" for i, q in enumerate(questions, 1))
    if _SUMMARIZE.search(lowered):
        return _SUMMARY_TEMPLATES[variant % len(_SUMMARY_TEMPLATES)].format(s=subject)
    short = subject if len(subject) <= 80 else subject[:77] + "..."
    conversation = [request.get(k) for k in ("model", "instructions", "messages", "input")]
    return f"Simulated answer to: {short} [{_digest(seed, conversation)[:8]}]"


def _prompt_texts(request: Mapping[str, Any]) -> tuple[str, str]:
    """(text of the last user turn, all instruction + user text) of a request."""
    user_texts: list[str] = []
    other: list[str] = []
    if isinstance(request.get("instructions"), str):
        other.append(request["instructions"])
    items = request.get("messages")
    if items is None:
        items = request.get("input")
    if isinstance(items, str):
        user_texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            role = item.get("role")
            text = _text_of(item.get("content"))
            if role == "user":
                user_texts.append(text)
            elif role in ("system", "developer"):
                other.append(text)
    last_user = user_texts[-1] if user_texts else ""
    return last_user, "\n".join([*other, last_user])


def _tools(request: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, JSON schema) of the function tools of a chat or Responses request."""
    found: list[tuple[str, dict[str, Any]]] = []
    for tool in request.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        spec: dict[str, Any] = function if isinstance(function, dict) else tool
        name = spec.get("name")
        if isinstance(name, str):
            found.append((name, spec.get("parameters") or {}))
    return found


def _forced_tool(request: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    tools = _tools(request)
    if not tools:
        return None
    choice = request.get("tool_choice")
    if choice == "required":
        return tools[0]
    if isinstance(choice, dict):
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool[0] == name:
                return tool
    return None


def _output_format(request: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = request.get("response_format")
    if fmt is None and isinstance(request.get("text"), dict):
        fmt = request["text"].get("format")
    return fmt if isinstance(fmt, dict) and fmt.get("type") != "text" else None


def _example_from_schema(
    schema: Any, subject: str, name: str = "", root: Any = None, depth: int = 0
) -> Any:
    """A deterministic value that validates against a (simple) JSON schema.

    Handles objects, arrays, scalars, enums/const, anyOf/oneOf/allOf and local
    ``$ref``s (``#/$defs/...``, as pydantic writes them).
    """
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 8:
        return subject
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _example_from_schema(target, subject, name, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _example_from_schema(schema[key][0], subject, name, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props: dict[str, Any] = schema.get("properties") or {}
        wanted = schema.get("required") or list(props)
        return {
            k: _example_from_schema(props.get(k, {}), subject, k, root, depth + 1) for k in wanted
        }
    if kind == "array":
        return [_example_from_schema(schema.get("items", {}), subject, name, root, depth + 1)]
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if name in ("", "query", "q", "question", "topic", "text"):
        return subject
    return f"{name}: {subject}"


def _mismatching_args(schema: Any, subject: str) -> dict[str, Any]:
    """Valid JSON that breaks ``schema``: a required field dropped, or a wrong type."""
    valid = _example_from_schema(schema, subject)
    args = dict(valid) if isinstance(valid, dict) else {}
    required = schema.get("required") if isinstance(schema, dict) else None
    if required:
        args.pop(required[0], None)
        args["unexpected_argument"] = True
        return args
    if args:
        key = next(iter(args))
        args[key] = 12345 if isinstance(args[key], str) else "not the declared type"
        return args
    return {"unexpected_argument": True}


def _normalize_reply(reply: Any) -> _Output:
    """A scripted reply (str or dict) as an :class:`_Output`."""
    if isinstance(reply, str):
        return _Output(content=reply, tool_calls=[])
    if not isinstance(reply, dict):
        raise SimulatorConfigError(
            f"A scripted reply must be a str or a dict, not {type(reply).__name__}."
        )
    unknown = set(reply) - {"content", "tool_calls"}
    if unknown:
        raise SimulatorConfigError(
            f"Unknown keys {sorted(unknown)} in scripted reply; use 'content' and/or 'tool_calls'."
        )
    calls: list[tuple[str, str]] = []
    for call in reply.get("tool_calls") or []:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise SimulatorConfigError(
                'A scripted tool call must be a dict like {"name": "search", "arguments": {...}}.'
            )
        args = call.get("arguments", {})
        calls.append((call["name"], args if isinstance(args, str) else json.dumps(args)))
    content = reply.get("content")
    if content is not None and not isinstance(content, str):
        raise SimulatorConfigError("A scripted reply's 'content' must be a str.")
    if content is None and not calls:
        content = ""
    return _Output(content=content, tool_calls=calls)


# --------------------------------------------------------------------------- response plans


@dataclass
class _Plan:
    """How to answer one request: raise, a complete body, or SSE events."""

    status: int = 200
    headers: dict[str, str] | None = None
    body: bytes = b""
    events: list[bytes] | None = None
    raise_exc: Exception | None = None
    cut_after: int | None = None  # stream_cut: events sent before the connection drops


class _SSEStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A server-sent-events body, optionally dropped mid-way (``stream_cut``)."""

    def __init__(self, events: list[bytes], cut_after: int | None, request: httpx2.Request):
        self._events = events
        self._cut_after = cut_after
        self._request = request

    def _chunks(self) -> Iterator[bytes]:
        for i, event in enumerate(self._events):
            if self._cut_after is not None and i >= self._cut_after:
                raise httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(simulated stream_cut)",
                    request=self._request,
                )
            yield event

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks():
            yield chunk


def _error_body(kind_type: str, message: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind_type, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def _sse(data: Mapping[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _words(text: str) -> list[str]:
    """Text split into stream deltas (a word with its leading whitespace)."""
    return re.findall(r"\s*\S+|\s+$", text) or ([text] if text else [])


# --------------------------------------------------------------------------- the transport


class SimulatedLLM(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """An OpenAI-compatible LLM server as an httpx2 transport (sync and async).

    :param replies: scripted replies consumed in order (str or dict, see the module
        docstring), or a callable ``(request_json) -> str | dict | None``. None: rule-based
        replies only.
    :param latency_s: simulated time to first byte (``time.sleep`` / ``asyncio.sleep``).
    :param seed: mixed into the choice of rule-based phrasing.
    :param faults: faults to inject into the first requests, in order (kinds or
        :class:`Fault` objects).
    :param cached_prefix_tokens: report ``min(N, prompt_tokens)`` cached tokens on every
        request instead of simulating the prompt cache.
    :param cache_min_tokens: the shortest prompt the simulated prompt cache serves.
    """

    def __init__(
        self,
        replies: Sequence[Reply] | ReplyFunction | None = None,
        *,
        latency_s: float = 0.0,
        seed: int = 0,
        faults: Sequence[str | Fault] | None = None,
        cached_prefix_tokens: int | None = None,
        cache_min_tokens: int = 1024,
    ) -> None:
        if latency_s < 0:
            raise SimulatorConfigError(f"latency_s must be >= 0, got {latency_s}.")
        self._lock = threading.Lock()  # requests may arrive from threads and tasks at once
        self.latency_s = latency_s
        self.seed = seed
        self.cached_prefix_tokens = cached_prefix_tokens
        self.cache_min_tokens = cache_min_tokens
        self._reply_fn: ReplyFunction | None = None
        self._script: list[Reply] = []
        if callable(replies):
            self._reply_fn = replies
        elif replies is not None:
            if isinstance(replies, (str, dict)):
                raise SimulatorConfigError("replies must be a list of replies, e.g. ['Paris.'].")
            for reply in replies:
                _normalize_reply(reply)  # fail at construction, not mid-lesson
            self._script = list(replies)
        self._faults: list[list[Any]] = []  # [Fault, remaining times]
        for fault in faults or ():
            self._queue_fault(fault if isinstance(fault, Fault) else Fault(fault))
        self._seen_prompts: list[tuple[str, str]] = []  # (model, prompt text)
        #: Every request that reached the transport, in order.
        self.calls: list[SimulatedCall] = []

    # ----------------------------------------------------------------- public verbs

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The parsed JSON body of every request received (faulted ones too)."""
        return [call.body for call in self.calls]

    @property
    def request_count(self) -> int:
        """How many requests reached the simulator (faulted ones too)."""
        return len(self.calls)

    @property
    def replies_left(self) -> int:
        """Scripted replies not consumed yet."""
        return len(self._script)

    def fail_next(self, kind: str, times: int = 1, **opts: Any) -> None:
        """Make the next ``times`` requests fail with ``kind`` (after already queued faults).

        ``opts`` are :class:`Fault` fields: ``retry_after_s``, ``message``, ``mode``,
        ``after_events``.
        """
        self._queue_fault(Fault(kind, times=times, **opts))

    def add_replies(self, *replies: Reply) -> None:
        """Append scripted replies to the script."""
        if self._reply_fn is not None:
            raise SimulatorConfigError("This simulator takes replies from a callable, not a list.")
        for reply in replies:
            _normalize_reply(reply)
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget received requests, queued faults and the prompt cache (not the script)."""
        with self._lock:
            self.calls.clear()
            self._faults.clear()
            self._seen_prompts.clear()

    # ----------------------------------------------------------------- transport API

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Serve one request (sync client)."""
        request.read()
        plan = self._serve(request)
        if self.latency_s:
            time.sleep(self.latency_s)
        return self._respond(plan, request)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Serve one request (async client)."""
        await request.aread()
        plan = self._serve(request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self._respond(plan, request)

    # ----------------------------------------------------------------- plumbing

    def _queue_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append([fault, fault.times])

    def _take_fault(self) -> Fault | None:
        if not self._faults:
            return None
        entry = self._faults[0]
        entry[1] -= 1
        if entry[1] <= 0:
            self._faults.pop(0)
        fault: Fault = entry[0]
        return fault

    def _respond(self, plan: _Plan, request: httpx2.Request) -> httpx2.Response:
        if plan.raise_exc is not None:
            raise plan.raise_exc
        headers = dict(plan.headers or {})
        headers.setdefault("openai-processing-ms", str(int(self.latency_s * 1000)))
        if plan.events is not None:
            headers["content-type"] = "text/event-stream; charset=utf-8"
            stream = _SSEStream(plan.events, plan.cut_after, request)
            return httpx2.Response(plan.status, headers=headers, stream=stream, request=request)
        headers["content-type"] = "application/json"
        return httpx2.Response(plan.status, headers=headers, content=plan.body, request=request)

    def _serve(self, request: httpx2.Request) -> _Plan:
        path = request.url.path
        try:
            parsed = json.loads(request.content or b"{}")
        except ValueError:
            parsed = None
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        with self._lock:
            plan, outcome = self._serve_locked(request, path, body, parsed)
            self.calls.append(SimulatedCall(path=path, body=body, outcome=outcome))
            plan.headers = {
                "x-request-id": f"req_sim_{len(self.calls):06d}",
                **(plan.headers or {}),
            }
        return plan

    def _serve_locked(
        self, request: httpx2.Request, path: str, body: dict[str, Any], parsed: Any
    ) -> tuple[_Plan, str]:
        fault = self._take_fault()
        if fault is not None and fault.kind in ("timeout", "connection"):
            exc: Exception
            if fault.kind == "timeout":
                exc = httpx2.ReadTimeout(fault.message or "simulated read timeout", request=request)
            else:
                exc = httpx2.ConnectError(
                    fault.message or "simulated connection failure", request=request
                )
            return _Plan(raise_exc=exc), fault.kind
        if fault is not None and fault.kind in _HTTP_FAULTS:
            return self._http_fault(fault), fault.kind

        api: Literal["chat", "responses"]
        if request.method == "POST" and path.endswith("/chat/completions"):
            api = "chat"
        elif request.method == "POST" and path.endswith("/responses"):
            api = "responses"
        else:
            msg = f"Unknown request URL: {request.method} {path} (the simulator serves "
            msg += "POST /v1/chat/completions and POST /v1/responses)."
            return self._error(404, msg, "unknown_url"), "error"
        problem = self._validate(api, body, parsed)
        if problem is not None:
            return problem, "error"

        forced: _Output | None = None
        if fault is not None and fault.kind == "bad_tool_args":
            forced = self._bad_tool_output(body, fault)
        try:
            output = forced or self._pick_reply(body, consume=fault is None)
        except SimulatorConfigError as err:
            return self._error(400, f"Simulator script error: {err}", None), "error"
        if output.tool_calls and not _tools(body) and forced is None:
            msg = "A scripted reply has tool_calls but the request declared no tools."
            return self._error(400, msg, None, "tools"), "error"

        plan, truncated = (self._chat if api == "chat" else self._responses)(body, output)
        if fault is not None and fault.kind == "stream_cut":
            if plan.events is None:
                exc = httpx2.RemoteProtocolError(
                    "Server disconnected without sending a response (simulated stream_cut).",
                    request=request,
                )
                return _Plan(raise_exc=exc), fault.kind
            plan.cut_after = fault.after_events
            return plan, fault.kind
        if fault is not None:
            return plan, fault.kind
        return plan, "length" if truncated else "ok"

    def _validate(self, api: str, body: dict[str, Any], parsed: Any) -> _Plan | None:
        if not isinstance(parsed, dict):
            return self._error(400, "We could not parse the JSON body of your request.", None)
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self._error(400, "you must provide a model parameter", None, "model")
        if api == "chat" and not (isinstance(body.get("messages"), list) and body["messages"]):
            return self._error(400, "'messages' must be a non-empty array.", None, "messages")
        if api == "responses" and not isinstance(body.get("input"), (str, list)):
            return self._error(400, "'input' must be a string or an array.", None, "input")
        return None

    def _error(
        self, status: int, message: str, code: str | None, param: str | None = None
    ) -> _Plan:
        kind_type = "invalid_request_error" if status < 500 else "server_error"
        return _Plan(status=status, body=_error_body(kind_type, message, code, param))

    def _http_fault(self, fault: Fault) -> _Plan:
        status, kind_type, code, message = _HTTP_FAULTS[fault.kind]
        headers: dict[str, str] = {}
        if fault.kind == "rate_limit":
            headers = {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0",
            }
            if fault.retry_after_s is not None:
                headers["retry-after"] = str(max(0, math.ceil(fault.retry_after_s)))
                headers["retry-after-ms"] = str(int(fault.retry_after_s * 1000))
                headers["x-ratelimit-reset-requests"] = f"{fault.retry_after_s:g}s"
        body = _error_body(kind_type, fault.message or message, code)
        return _Plan(status=status, headers=headers, body=body)

    def _pick_reply(self, body: dict[str, Any], *, consume: bool) -> _Output:
        reply: Reply | None = None
        if self._reply_fn is not None:
            reply = self._reply_fn(body)
        elif self._script:
            reply = self._script.pop(0) if consume else self._script[0]
        if reply is None:
            reply = default_reply(body, seed=self.seed)
        return _normalize_reply(reply)

    def _bad_tool_output(self, body: dict[str, Any], fault: Fault) -> _Output:
        tools = _tools(body)
        name, schema = _forced_tool(body) or (tools[0] if tools else ("tool", {}))
        subject = _subject(_prompt_texts(body)[0])
        if fault.mode == "schema_mismatch":
            args = json.dumps(_mismatching_args(schema, subject))
        else:
            args = json.dumps(_example_from_schema(schema, subject))[:-1] + ', "unterminated'
        return _Output(content=None, tool_calls=[(name, args)])

    # ----------------------------------------------------------------- token accounting

    def _usage_numbers(
        self,
        body: dict[str, Any],
        prompt_text: str,
        prompt_tokens: int,
        output: _Output,
        limit: Any,
    ) -> tuple[_Output, int, int, int, bool]:
        """(truncated output, cached, reasoning, output tokens per choice, truncated?)."""
        cached = self._cached_tokens(body["model"], prompt_text, prompt_tokens)
        effort = body.get("reasoning_effort")
        if effort is None and isinstance(body.get("reasoning"), dict):
            effort = body["reasoning"].get("effort")
        reasoning = 0
        if is_reasoning_model(body["model"]):
            reasoning = REASONING_TOKENS.get(str(effort or "medium"), REASONING_TOKENS["medium"])
        budget = limit if isinstance(limit, int) and limit > 0 else None
        if budget is not None:
            reasoning = min(reasoning, budget)
        room = None if budget is None else budget - reasoning
        content, calls, truncated = output.content, list(output.tool_calls), False
        visible = 0
        if content:
            visible = count_tokens(content)
            if room is not None and visible > room:
                content, visible, truncated = content[: room * CHARS_PER_TOKEN], room, True
            if room is not None:
                room -= visible
        kept: list[tuple[str, str]] = []
        for name, args in calls:
            cost = count_tokens(name) + count_tokens(args) + 3
            if room is not None and cost > room:
                truncated = True
                keep_chars = max(0, room - count_tokens(name) - 3) * CHARS_PER_TOKEN
                if keep_chars:
                    kept.append((name, args[:keep_chars]))
                    visible += room
                    room = 0
                break
            kept.append((name, args))
            visible += cost
            if room is not None:
                room -= cost
        return _Output(content, kept), cached, reasoning, visible + reasoning, truncated

    def _cached_tokens(self, model: str, prompt_text: str, prompt_tokens: int) -> int:
        if self.cached_prefix_tokens is not None:
            return max(0, min(self.cached_prefix_tokens, prompt_tokens))
        best = 0
        for seen_model, seen in self._seen_prompts:
            if seen_model == model:
                best = max(best, _common_prefix_len(seen, prompt_text))
        if (model, prompt_text) not in self._seen_prompts:
            self._seen_prompts.append((model, prompt_text))
            del self._seen_prompts[:-_CACHE_MEMORY]
        if prompt_tokens < self.cache_min_tokens:
            return 0
        blocks = (best // CHARS_PER_TOKEN) // CACHE_BLOCK_TOKENS
        return min(blocks * CACHE_BLOCK_TOKENS, prompt_tokens)

    # ----------------------------------------------------------------- chat completions

    def _chat(self, body: dict[str, Any], output: _Output) -> tuple[_Plan, bool]:
        model: str = body["model"]
        tools_text = json.dumps(body.get("tools"), sort_keys=True) if body.get("tools") else ""
        parts = [tools_text]
        prompt_tokens = 3 + count_tokens(tools_text)
        for message in body["messages"]:
            role = str(message.get("role", "")) if isinstance(message, dict) else ""
            text = _text_of(message.get("content")) if isinstance(message, dict) else ""
            if isinstance(message, dict) and message.get("tool_calls"):
                text += json.dumps(message["tool_calls"], sort_keys=True)
            parts.append(f"<|{role}|>{text}")
            prompt_tokens += 4 + count_tokens(role) + count_tokens(text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        output, cached, reasoning, per_choice, truncated = self._usage_numbers(
            body, "".join(parts), prompt_tokens, output, limit
        )
        n: int = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        finish = "length" if truncated else ("tool_calls" if output.tool_calls else "stop")
        ident = "chatcmpl-sim" + _digest(self.seed, body, len(self.calls))[:24]
        created = int(time.time())
        call_ids = [f"call_sim{_digest(ident, i)[:20]}" for i in range(len(output.tool_calls))]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": per_choice * n,
            "total_tokens": prompt_tokens + per_choice * n,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning * n,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        base = {"id": ident, "created": created, "model": model, "system_fingerprint": "fp_sim"}
        base["service_tier"] = "default"

        if not body.get("stream"):
            reply: dict[str, Any] = {
                "role": "assistant",
                "content": output.content,
                "refusal": None,
                "annotations": [],
            }
            if output.tool_calls:
                reply["tool_calls"] = [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                    for cid, (name, args) in zip(call_ids, output.tool_calls, strict=True)
                ]
            choices = [
                {"index": i, "message": reply, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ]
            payload = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            return _Plan(body=json.dumps(payload).encode()), truncated

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            data: dict[str, Any] = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        events: list[bytes] = []
        for i in range(n):
            events.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
            for piece in _words(output.content or ""):
                events.append(chunk(i, {"content": piece}))
            for k, (cid, (name, args)) in enumerate(zip(call_ids, output.tool_calls, strict=True)):
                head = {"index": k, "id": cid, "type": "function"}
                head["function"] = {"name": name, "arguments": ""}
                events.append(chunk(i, {"tool_calls": [head]}))
                for start in range(0, len(args), 16):
                    fragment = {"index": k, "function": {"arguments": args[start : start + 16]}}
                    events.append(chunk(i, {"tool_calls": [fragment]}))
            events.append(chunk(i, {}, finish))
        if include_usage:
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            events.append(_sse(final))
        events.append(_sse("[DONE]"))
        return _Plan(events=events), truncated

    # ----------------------------------------------------------------- responses API

    def _responses(self, body: dict[str, Any], output: _Output) -> tuple[_Plan, bool]:
        model: str = body["model"]
        tools_text = json.dumps(body.get("tools"), sort_keys=True) if body.get("tools") else ""
        raw_instructions = body.get("instructions")
        instructions = raw_instructions if isinstance(raw_instructions, str) else ""
        items = body["input"]
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        parts = [tools_text, f"<|instructions|>{instructions}"]
        prompt_tokens = 3 + count_tokens(tools_text) + count_tokens(instructions)
        for item in items:
            role = str(item.get("role") or item.get("type") or "") if isinstance(item, dict) else ""
            text = _text_of(item) if isinstance(item, dict) else str(item)
            parts.append(f"<|{role}|>{text}")
            prompt_tokens += 4 + count_tokens(role) + count_tokens(text)
        output, cached, reasoning, out_tokens, truncated = self._usage_numbers(
            body, "".join(parts), prompt_tokens, output, body.get("max_output_tokens")
        )
        ident = "resp_sim" + _digest(self.seed, body, len(self.calls))[:24]
        status = "incomplete" if truncated else "completed"
        item_status = "incomplete" if truncated else "completed"
        out_items: list[dict[str, Any]] = []
        if is_reasoning_model(model):
            out_items.append({"id": f"rs_sim{ident[8:]}", "type": "reasoning", "summary": []})
        if output.content is not None and (output.content or not output.tool_calls):
            out_items.append(
                {
                    "id": f"msg_sim{ident[8:]}",
                    "type": "message",
                    "role": "assistant",
                    "status": item_status,
                    "content": [
                        {
                            "type": "output_text",
                            "text": output.content,
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            )
        for k, (name, args) in enumerate(output.tool_calls):
            out_items.append(
                {
                    "id": f"fc_sim{_digest(ident, k)[:20]}",
                    "type": "function_call",
                    "call_id": f"call_sim{_digest(ident, 'call', k)[:20]}",
                    "name": name,
                    "arguments": args,
                    "status": item_status,
                }
            )
        usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt_tokens + out_tokens,
        }
        created = time.time()
        response: dict[str, Any] = {
            "id": ident,
            "object": "response",
            "created_at": created,
            "completed_at": None if truncated else created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model,
            "output": out_items,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.get("metadata") or {},
        }
        if not body.get("stream"):
            return _Plan(body=json.dumps(response).encode()), truncated
        return _Plan(events=self._response_events(response)), truncated

    @staticmethod
    def _response_events(response: dict[str, Any]) -> list[bytes]:
        """The SSE event sequence of a streamed Responses call ending in ``response``."""
        seq = 0
        events: list[bytes] = []

        def emit(kind: str, **fields: Any) -> None:
            nonlocal seq
            events.append(_sse({"type": kind, "sequence_number": seq, **fields}, event=kind))
            seq += 1

        pending = {
            **response,
            "status": "in_progress",
            "output": [],
            "usage": None,
            "completed_at": None,
            "incomplete_details": None,
        }
        emit("response.created", response=pending)
        emit("response.in_progress", response=pending)
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
                empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                common = {"item_id": item["id"], "output_index": index, "content_index": 0}
                emit("response.content_part.added", part=empty_part, **common)
                for piece in _words(text):
                    emit("response.output_text.delta", delta=piece, logprobs=[], **common)
                emit("response.output_text.done", text=text, logprobs=[], **common)
                emit("response.content_part.done", part=item["content"][0], **common)
            elif item["type"] == "function_call":
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
                args = item["arguments"]
                for start in range(0, len(args), 16):
                    emit(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=index,
                        delta=args[start : start + 16],
                    )
                emit(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=args,
                    name=item["name"],
                )
            else:
                emit("response.output_item.added", output_index=index, item=item)
            emit("response.output_item.done", output_index=index, item=item)
        final = (
            "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        )
        emit(final, response=response)
        return events


# --------------------------------------------------------------------------- client factory


@overload
def make_simulated_openai(
    sim: SimulatedLLM | None = None, *, async_: Literal[False] = False, **openai_kwargs: Any
) -> openai.OpenAI: ...


@overload
def make_simulated_openai(
    sim: SimulatedLLM | None = None, *, async_: Literal[True], **openai_kwargs: Any
) -> openai.AsyncOpenAI: ...


def make_simulated_openai(
    sim: SimulatedLLM | None = None, *, async_: bool = False, **openai_kwargs: Any
) -> openai.OpenAI | openai.AsyncOpenAI:
    """A real ``openai.OpenAI`` (or ``AsyncOpenAI``) client whose HTTP goes to ``sim``.

    Defaults: ``api_key="sk-simulated"``, ``base_url`` :data:`SIMULATED_BASE_URL`,
    ``max_retries=0`` (nbagent does the retrying); ``openai_kwargs`` override them.
    ``http_client`` cannot be given: the simulator *is* the client's transport.
    """
    if "http_client" in openai_kwargs:
        raise SimulatorConfigError(
            "make_simulated_openai() builds its own http_client around the simulator; "
            "pass the SimulatedLLM instead."
        )
    transport = sim if sim is not None else SimulatedLLM()
    options: dict[str, Any] = {
        "api_key": SIMULATED_API_KEY,
        "base_url": SIMULATED_BASE_URL,
        "max_retries": 0,
    }
    options.update(openai_kwargs)
    if async_:
        return openai.AsyncOpenAI(http_client=httpx2.AsyncClient(transport=transport), **options)
    return openai.OpenAI(http_client=httpx2.Client(transport=transport), **options)
