"""The simulated LLM, driven through the real openai client (sync and async)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
import pytest
from genai_prices import Usage, calc_price
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.completion_usage import CompletionUsage
from openai.types.responses import Response, ResponseUsage
from pydantic import BaseModel

from nbagent._errors import NbagentError
from nbagent._pricing import PriceBook
from nbagent._simulator import (
    REASONING_TOKENS,
    Fault,
    SimulatedLLM,
    SimulatorConfigError,
    count_tokens,
    make_simulated_openai,
)

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"],
        },
    },
}
RESPONSES_SEARCH_TOOL = {"type": "function", **SEARCH_TOOL["function"]}  # type: ignore[dict-item]


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def chat(client: openai.OpenAI, text: str = "hello", **kwargs: Any) -> ChatCompletion:
    kwargs.setdefault("model", "gpt-4o-mini")
    return client.chat.completions.create(messages=user(text), **kwargs)


def usage_of(resp: ChatCompletion | ChatCompletionChunk) -> CompletionUsage:
    assert resp.usage is not None
    return resp.usage


def cached_of(resp: ChatCompletion) -> int:
    details = usage_of(resp).prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    return details.cached_tokens


def reasoning_of(resp: ChatCompletion) -> int:
    details = usage_of(resp).completion_tokens_details
    assert details is not None and details.reasoning_tokens is not None
    return details.reasoning_tokens


@pytest.fixture
def sim() -> SimulatedLLM:
    return SimulatedLLM()


@pytest.fixture
def client(sim: SimulatedLLM) -> openai.OpenAI:
    return make_simulated_openai(sim)


# ----------------------------------------------------------------------------- chat


def test_chat_completion_parses_with_usage_and_requested_model(
    sim: SimulatedLLM, client: openai.OpenAI
):
    text = "What is the capital of France?"
    resp = chat(client, text, model="gpt-4o-mini-2024-07-18")
    assert isinstance(resp, ChatCompletion)
    assert resp.model == "gpt-4o-mini-2024-07-18"  # as asked, so prices are real prices
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert "capital of France" in (choice.message.content or "")
    usage = resp.usage
    assert isinstance(usage, CompletionUsage)
    # Documented rule: 3 + per message (4 + tokens(role) + tokens(content)).
    assert usage.prompt_tokens == 3 + 4 + count_tokens("user") + count_tokens(text)
    assert usage.completion_tokens == count_tokens(choice.message.content or "")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert sim.request_count == 1
    assert sim.requests[0]["messages"] == user(text)
    assert sim.calls[0].path == "/v1/chat/completions"


def test_count_tokens_rule():
    assert count_tokens("") == 0
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2


def test_default_replies_are_deterministic(client: openai.OpenAI):
    other = make_simulated_openai(SimulatedLLM())
    a = chat(client, "Tell me about tides").choices[0].message.content
    b = chat(other, "Tell me about tides").choices[0].message.content
    c = chat(client, "Tell me about volcanoes").choices[0].message.content
    assert a == b
    assert a != c


def test_decomposition_prompt_gets_three_numbered_sub_questions(client: openai.OpenAI):
    prompt = "Break the goal into sub-questions.\nGoal: how does sleep affect memory?"
    content = chat(client, prompt).choices[0].message.content or ""
    lines = content.splitlines()
    assert len(lines) == 3
    for number, line in enumerate(lines, 1):
        assert line.startswith(f"{number}. ")
        assert line.endswith("?")
        assert "sleep affect memory" in line


def test_summary_prompt_gets_a_paragraph_mentioning_the_question(client: openai.OpenAI):
    content = chat(client, "Summarize the findings.\nQuestion: why is the sky blue?")
    text = content.choices[0].message.content or ""
    assert "why is the sky blue" in text
    assert "\n" not in text and len(text.split()) > 15


def test_scripted_replies_are_consumed_in_order_then_rules_take_over():
    sim = SimulatedLLM(replies=["first", {"content": "second"}])
    client = make_simulated_openai(sim)
    assert chat(client).choices[0].message.content == "first"
    assert chat(client).choices[0].message.content == "second"
    assert sim.replies_left == 0
    assert (chat(client, "third?").choices[0].message.content or "").startswith("Simulated")


def test_callable_replies_see_the_request():
    seen: list[dict[str, Any]] = []

    def reply(request: dict[str, Any]) -> str:
        seen.append(request)
        return f"{len(request['messages'])} message(s) to {request['model']}"

    client = make_simulated_openai(SimulatedLLM(replies=reply))
    assert chat(client, model="gpt-4o").choices[0].message.content == "1 message(s) to gpt-4o"
    assert seen[0]["messages"] == user("hello")


def test_max_tokens_truncates_with_finish_reason_length(client: openai.OpenAI):
    full = chat(client, "Summarize: the history of Rome")
    full_text = full.choices[0].message.content or ""
    for param in ("max_tokens", "max_completion_tokens"):
        short = chat(client, "Summarize: the history of Rome", **{param: 5})
        assert short.choices[0].finish_reason == "length"
        assert usage_of(short).completion_tokens == 5
        assert full_text.startswith(short.choices[0].message.content or "<none>")
        assert len(short.choices[0].message.content or "") < len(full_text)


def test_n_choices_multiply_output_tokens(client: openai.OpenAI):
    one = chat(client, "hi")
    three = chat(client, "hi", n=3)
    assert len(three.choices) == 3
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert usage_of(three).completion_tokens == 3 * usage_of(one).completion_tokens


@pytest.mark.parametrize("model", ["o3-mini", "o1", "gpt-5", "gpt-5-mini-2025-08-07"])
def test_reasoning_models_report_reasoning_tokens(client: openai.OpenAI, model: str):
    resp = chat(client, "Explain entropy", model=model)
    visible = count_tokens(resp.choices[0].message.content or "")
    assert reasoning_of(resp) == REASONING_TOKENS["medium"]
    assert usage_of(resp).completion_tokens == visible + reasoning_of(resp)
    low = chat(client, "Explain entropy", model=model, reasoning_effort="low")
    high = chat(client, "Explain entropy", model=model, reasoning_effort="high")
    low_r = reasoning_of(low)
    high_r = reasoning_of(high)
    assert low_r < high_r


def test_reasoning_counts_against_the_output_budget(client: openai.OpenAI):
    resp = chat(client, "Explain entropy", model="o3-mini", max_completion_tokens=100)
    assert resp.choices[0].finish_reason == "length"
    assert usage_of(resp).completion_tokens == 100
    assert reasoning_of(resp) == 100
    assert resp.choices[0].message.content == ""


def test_repeated_long_prompt_is_served_from_the_prompt_cache(client: openai.OpenAI):
    long_context = "Background: " + "the quick brown fox jumps over the lazy dog. " * 150
    first = chat(client, long_context + "Question 1?")
    second = chat(client, long_context + "Question 2?")
    assert usage_of(first).prompt_tokens >= 1024
    assert cached_of(first) == 0
    cached = cached_of(second)
    assert cached > 0 and cached % 128 == 0
    assert cached <= usage_of(second).prompt_tokens
    # Short prompts are never cached, like at OpenAI (1024-token minimum).
    chat(client, "short")
    assert cached_of(chat(client, "short")) == 0


def test_cached_prefix_tokens_option():
    client = make_simulated_openai(SimulatedLLM(cached_prefix_tokens=6))
    resp = chat(client, "x" * 400)
    assert cached_of(resp) == 6
    tiny = make_simulated_openai(SimulatedLLM(cached_prefix_tokens=10_000))
    resp = chat(tiny, "hi")
    assert cached_of(resp) == usage_of(resp).prompt_tokens


def test_simulated_usage_prices_like_the_real_model(client: openai.OpenAI):
    resp = chat(client, "Explain entropy", model="o3-mini", reasoning_effort="low")
    u = usage_of(resp)
    assert resp.model == "o3-mini"
    usd, known = PriceBook().cost(
        resp.model, u.prompt_tokens, u.completion_tokens, cached_of(resp), reasoning_of(resp)
    )
    real = calc_price(
        Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens),
        "o3-mini",
        provider_id="openai",
    )
    assert known and usd == pytest.approx(float(real.total_price))


# ----------------------------------------------------------------------------- streaming


def test_streaming_chat_with_usage_matches_the_plain_reply(client: openai.OpenAI):
    plain = chat(client, "Summarize: plate tectonics")
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("Summarize: plate tectonics"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 3  # really streamed in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert usage_of(last).prompt_tokens == usage_of(plain).prompt_tokens
    assert usage_of(last).completion_tokens == usage_of(plain).completion_tokens


def test_streaming_chat_without_include_usage_has_no_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(model="gpt-4o", messages=user("hi"), stream=True)
    assert all(chunk.usage is None and chunk.choices for chunk in stream)


def test_sdk_stream_helper_accumulates_the_final_completion(client: openai.OpenAI):
    with client.chat.completions.stream(
        model="gpt-4o-mini",
        messages=user("Summarize: rivers"),
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    assert "rivers" in (final.choices[0].message.content or "")
    assert usage_of(final).total_tokens > 0


# ----------------------------------------------------------------------------- tools


def test_scripted_tool_call_with_dict_and_raw_arguments():
    sim = SimulatedLLM(
        replies=[
            {"tool_calls": [{"name": "search", "arguments": {"query": "tides"}}]},
            {"tool_calls": [{"name": "search", "arguments": '{"query": "raw"}'}]},
        ]
    )
    client = make_simulated_openai(sim)
    first = chat(client, "find tides", tools=[SEARCH_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.type == "function"
    assert call.function.name == "search"
    assert json.loads(call.function.arguments) == {"query": "tides"}
    assert call.id.startswith("call_")
    second = chat(client, "find", tools=[SEARCH_TOOL])
    raw = second.choices[0].message.tool_calls[0].function.arguments
    assert raw == '{"query": "raw"}'


def test_forced_tool_choice_builds_arguments_from_the_schema(client: openai.OpenAI):
    resp = chat(client, "Question: moon phases", tools=[SEARCH_TOOL], tool_choice="required")
    args = json.loads(resp.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index, union-attr]
    assert args == {"query": "moon phases"}


def test_streamed_tool_call_is_reassembled_by_the_sdk():
    reply = {"tool_calls": [{"name": "search", "arguments": {"query": "a" * 40, "limit": 3}}]}
    client = make_simulated_openai(SimulatedLLM(replies=[reply]))
    with client.chat.completions.stream(
        model="gpt-4o-mini", messages=user("x"), tools=[SEARCH_TOOL]
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"query": "a" * 40, "limit": 3}
    assert final.choices[0].finish_reason == "tool_calls"


def test_scripted_tool_call_without_declared_tools_is_a_bad_request():
    client = make_simulated_openai(SimulatedLLM(replies=[{"tool_calls": [{"name": "search"}]}]))
    with pytest.raises(openai.BadRequestError, match="declared no tools"):
        chat(client)


@pytest.mark.parametrize("scripted", ["oops", 3, {"text": "x"}, {"tool_calls": [{"args": 1}]}])
def test_bad_scripted_replies_fail_at_construction(scripted: Any):
    with pytest.raises(SimulatorConfigError):
        SimulatedLLM(replies=[scripted] if scripted != "oops" else scripted)


# ----------------------------------------------------------------------------- responses API


def test_responses_api_plain(sim: SimulatedLLM, client: openai.OpenAI):
    resp = client.responses.create(
        model="gpt-4.1-mini", input="Summarize: coral reefs", instructions="Be brief."
    )
    assert isinstance(resp, Response)
    assert resp.status == "completed"
    assert resp.model == "gpt-4.1-mini"
    assert "coral reefs" in resp.output_text
    usage = resp.usage
    assert isinstance(usage, ResponseUsage)
    assert usage.output_tokens == count_tokens(resp.output_text)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert sim.calls[-1].path == "/v1/responses"


def test_responses_api_reasoning_and_truncation(client: openai.OpenAI):
    resp = client.responses.create(model="gpt-5", input="Summarize: coral reefs")
    assert resp.usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS["medium"]  # type: ignore[union-attr]
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    short = client.responses.create(model="gpt-4o", input="Summarize: reefs", max_output_tokens=16)
    assert short.status == "incomplete"
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 16  # type: ignore[union-attr]


def test_responses_api_streaming_events(client: openai.OpenAI):
    plain = client.responses.create(model="gpt-4o-mini", input="Summarize: glaciers")
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Summarize: glaciers", stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == plain.output_text
    assert final.usage.input_tokens == plain.usage.input_tokens  # type: ignore[union-attr]
    assert final.usage.output_tokens == plain.usage.output_tokens  # type: ignore[union-attr]


def test_responses_sdk_stream_helper(client: openai.OpenAI):
    with client.responses.stream(model="o4-mini", input="Summarize: deserts") as stream:
        final = stream.get_final_response()
    assert "deserts" in final.output_text
    assert final.usage.output_tokens_details.reasoning_tokens > 0  # type: ignore[union-attr]


def test_responses_tool_call_plain_and_streamed():
    reply = {"tool_calls": [{"name": "search", "arguments": {"query": "tides"}}]}
    client = make_simulated_openai(SimulatedLLM(replies=[reply, reply]))
    resp = client.responses.create(model="gpt-4o", input="x", tools=[RESPONSES_SEARCH_TOOL])
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "search"
    assert json.loads(calls[0].arguments) == {"query": "tides"}
    assert calls[0].call_id.startswith("call_")
    with client.responses.stream(
        model="gpt-4o",
        input="x",
        tools=[RESPONSES_SEARCH_TOOL],
    ) as stream:
        final = stream.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert json.loads(streamed[0].arguments) == {"query": "tides"}


# ----------------------------------------------------------------------------- faults

FAULT_EXCEPTIONS = {
    "timeout": openai.APITimeoutError,
    "connection": openai.APIConnectionError,
    "rate_limit": openai.RateLimitError,
    "server_error": openai.InternalServerError,
    "unavailable": openai.InternalServerError,
    "auth": openai.AuthenticationError,
    "forbidden": openai.PermissionDeniedError,
    "bad_request": openai.BadRequestError,
}
STATUS = {
    "rate_limit": 429,
    "server_error": 500,
    "unavailable": 503,
    "auth": 401,
    "forbidden": 403,
    "bad_request": 400,
}


@pytest.mark.parametrize("kind", list(FAULT_EXCEPTIONS))
def test_each_fault_raises_the_matching_openai_exception(kind: str):
    sim = SimulatedLLM(replies=["kept for the retry"])
    client = make_simulated_openai(sim)
    sim.fail_next(kind)
    with pytest.raises(FAULT_EXCEPTIONS[kind]) as info:
        chat(client)
    if kind == "connection":
        assert not isinstance(info.value, openai.APITimeoutError)
    if kind in STATUS:
        err = info.value
        assert isinstance(err, openai.APIStatusError)
        assert err.status_code == STATUS[kind]
        assert isinstance(err.body, dict) and {"message", "type", "code"} <= set(err.body)
    assert sim.request_count == 1  # max_retries=0: not re-sent
    assert sim.calls[0].outcome == kind
    # The fault did not eat the scripted reply: the retry gets it.
    assert chat(client).choices[0].message.content == "kept for the retry"
    assert sim.request_count == 2


def test_rate_limit_carries_retry_after_headers():
    sim = SimulatedLLM(faults=[Fault("rate_limit", retry_after_s=3)])
    with pytest.raises(openai.RateLimitError) as info:
        chat(make_simulated_openai(sim))
    headers = info.value.response.headers
    assert headers["retry-after"] == "3"
    assert headers["retry-after-ms"] == "3000"
    assert info.value.code == "rate_limit_exceeded"


def test_openai_own_retries_are_visible_in_the_request_count():
    sim = SimulatedLLM()
    sim.fail_next("rate_limit", times=2, retry_after_s=0.01)
    client = make_simulated_openai(sim, max_retries=2)
    assert chat(client).choices[0].finish_reason == "stop"
    assert sim.request_count == 3
    assert [c.outcome for c in sim.calls] == ["rate_limit", "rate_limit", "ok"]


def test_faults_from_the_constructor_apply_in_order():
    sim = SimulatedLLM(faults=["unavailable", Fault("timeout", times=2)])
    client = make_simulated_openai(sim)
    with pytest.raises(openai.InternalServerError):
        chat(client)
    for _ in range(2):
        with pytest.raises(openai.APITimeoutError):
            chat(client)
    assert chat(client).choices[0].finish_reason == "stop"
    assert [c.outcome for c in sim.calls] == ["unavailable", "timeout", "timeout", "ok"]


def test_bad_tool_args_malformed_json(sim: SimulatedLLM, client: openai.OpenAI):
    sim.fail_next("bad_tool_args")
    resp = chat(client, "find", tools=[SEARCH_TOOL])
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "search"  # type: ignore[union-attr]
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)  # type: ignore[union-attr]


def test_bad_tool_args_schema_mismatch(sim: SimulatedLLM, client: openai.OpenAI):
    sim.fail_next("bad_tool_args", mode="schema_mismatch")
    resp = chat(client, "find", tools=[SEARCH_TOOL])
    args = json.loads(resp.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index, union-attr]
    assert "query" not in args  # the required field is missing


def test_stream_cut_raises_mid_stream_and_keeps_the_reply_for_the_retry():
    sim = SimulatedLLM(replies=["one two three four five", "next"])
    client = make_simulated_openai(sim)
    sim.fail_next("stream_cut", after_events=2)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=user("Summarize: the sea"), stream=True
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 2
    assert sim.calls[-1].outcome == "stream_cut"
    assert chat(client).choices[0].message.content == "one two three four five"


def test_unknown_fault_kind_is_rejected(sim: SimulatedLLM):
    with pytest.raises(SimulatorConfigError, match="rate_limit") as info:
        sim.fail_next("ratelimit")
    assert isinstance(info.value, NbagentError)


def test_unknown_endpoint_is_a_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_authorization_header_is_never_stored():
    sim = SimulatedLLM()
    client = make_simulated_openai(sim, api_key="sk-very-secret-123")
    chat(client)
    assert "sk-very-secret-123" not in repr(vars(sim))
    assert "sk-very-secret-123" not in json.dumps(sim.requests)


def test_make_simulated_openai_refuses_a_foreign_http_client():
    with pytest.raises(SimulatorConfigError):
        make_simulated_openai(http_client=object())


def test_latency_is_simulated(client: openai.OpenAI):
    slow = make_simulated_openai(SimulatedLLM(latency_s=0.05))
    start = time.perf_counter()
    chat(slow)
    assert time.perf_counter() - start >= 0.05


# ----------------------------------------------------------------------------- async


def test_async_client_chat_stream_responses_and_faults():
    sim = SimulatedLLM(latency_s=0.01)
    client = make_simulated_openai(sim, async_=True)
    assert isinstance(client, openai.AsyncOpenAI)

    async def scenario() -> None:
        resp = await client.chat.completions.create(model="gpt-4o", messages=user("hi"))
        assert resp.choices[0].message.content
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=user("hi"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            resp.choices[0].message.content
        )
        events = [
            e async for e in await client.responses.create(model="o3", input="hi", stream=True)
        ]
        assert events[-1].type == "response.completed"
        sim.fail_next("timeout")
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o", messages=user("hi"))
        sim.fail_next("stream_cut", after_events=1)
        cut = await client.chat.completions.create(model="gpt-4o", messages=user("hi"), stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for _ in cut:
                pass
        # Concurrent requests are all served and counted.
        await asyncio.gather(
            *(
                client.chat.completions.create(model="gpt-4o", messages=user(str(i)))
                for i in range(5)
            )
        )

    asyncio.run(scenario())
    assert sim.request_count == 10


# ----------------------------------------------------------------------------- structured output


class _Source(BaseModel):
    url: str
    score: float


class _Plan(BaseModel):
    questions: list[str]
    count: int
    done: bool
    top: _Source


def test_structured_output_parses_into_the_requested_model(client: openai.OpenAI):
    chat_resp = client.chat.completions.parse(
        model="gpt-4o-mini", messages=user("Goal: tides"), response_format=_Plan
    )
    parsed = chat_resp.choices[0].message.parsed
    assert isinstance(parsed, _Plan) and isinstance(parsed.top, _Source)
    assert parsed.questions and "tides" in parsed.questions[0]
    resp = client.responses.parse(model="gpt-4o-mini", input="Goal: tides", text_format=_Plan)
    assert resp.output_parsed == parsed


def test_json_object_mode_returns_json(client: openai.OpenAI):
    resp = chat(client, "Question: tides", response_format={"type": "json_object"})
    assert "tides" in json.loads(resp.choices[0].message.content or "")["answer"]
