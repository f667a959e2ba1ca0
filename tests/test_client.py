"""The traced client, through the real openai client on httpx2 transports (no mocks of openai)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import nbagent
from nbagent import _client
from nbagent._client import (
    UNKNOWN_MODEL_RATES,
    AsyncTracedTransport,
    TracedTransport,
    UnknownModelPriceWarning,
    async_openai_client,
    default_client,
    openai_client,
    prompt_bound,
    simulated_client,
)
from nbagent._pricing import PriceBook
from nbagent._retry import breaker_for, reset_breakers
from nbagent._simulator import SIMULATED_BASE_URL, SimulatedLLM
from nbagent._store import NANO

MODEL = "gpt-4o-mini"
SECRET = "sk-test-SECRET-7f3a9c1e5b"
BOOK = PriceBook()


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")
    reset_breakers()
    _client._warned_models.clear()


@pytest.fixture
def run() -> nbagent.Run:
    return nbagent.Run("t")


def ask(client: Any, text: str = "Question: why is the sky blue?", **kw: Any) -> Any:
    return client.chat.completions.create(
        model=kw.pop("model", MODEL), messages=[{"role": "user", "content": text}], **kw
    )


def llm_rows(run: nbagent.Run) -> Any:
    df = run.trace()
    return df[df.kind == "llm"].reset_index(drop=True)


class Recording(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """Delegates to the simulator and keeps every request's headers (a user's transport)."""

    def __init__(self, sim: SimulatedLLM) -> None:
        self.sim = sim
        self.headers: list[dict[str, str]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return self.sim.handle_request(request)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return await self.sim.handle_async_request(request)


# --------------------------------------------------------------------------- traced and priced


def test_chat_row_has_tokens_and_cost(run: nbagent.Run) -> None:
    client = simulated_client()
    reply = ask(client)
    rows = llm_rows(run)
    assert len(rows) == 1
    row = rows.iloc[0]
    u = reply.usage
    assert (row.status, row.attempt, row.model, row["name"]) == ("ok", 1, MODEL, "chat.completions")
    assert (row.input_tokens, row.output_tokens) == (u.prompt_tokens, u.completion_tokens)
    cost = BOOK.cost(MODEL, u.prompt_tokens, u.completion_tokens)[0]
    assert row.cost_usd == pytest.approx(cost)
    assert run.spend_usd == pytest.approx(cost, abs=1e-9)
    assert run.reserved_usd == 0 and run.llm_calls == 1
    assert row.price_known == 1 and not row.replayed
    assert json.loads(row.request)["messages"][0]["content"].startswith("Question")
    assert json.loads(row.response)["choices"][0]["message"]["content"] == (
        reply.choices[0].message.content
    )


def test_cached_and_reasoning_tokens_priced(run: nbagent.Run) -> None:
    sim = SimulatedLLM(cached_prefix_tokens=2048)
    client = simulated_client(sim=sim)
    long = "Question: " + "context " * 2000
    reply = ask(client, long, model="o3-mini")
    u = reply.usage
    cached = u.prompt_tokens_details.cached_tokens
    reasoning = u.completion_tokens_details.reasoning_tokens
    assert cached == 2048 and reasoning > 0
    row = llm_rows(run).iloc[0]
    assert (row.cached_tokens, row.reasoning_tokens) == (cached, reasoning)
    expected = BOOK.cost("o3-mini", u.prompt_tokens, u.completion_tokens, cached, reasoning)[0]
    assert row.cost_usd == pytest.approx(expected)
    assert row.cost_usd < BOOK.cost("o3-mini", u.prompt_tokens, u.completion_tokens)[0]


def test_responses_api_priced(run: nbagent.Run) -> None:
    client = simulated_client()
    resp = client.responses.create(model=MODEL, input="Question: what is a photon?")
    row = llm_rows(run).iloc[0]
    u = resp.usage
    assert (row["name"], row.input_tokens, row.output_tokens) == (
        "responses",
        u.input_tokens,
        u.output_tokens,
    )
    assert row.cost_usd == pytest.approx(BOOK.cost(MODEL, u.input_tokens, u.output_tokens)[0])
    assert run.spend_usd == pytest.approx(row.cost_usd, abs=1e-9)


def test_streaming_chat_gets_usage_and_hides_the_extra_chunk(run: nbagent.Run) -> None:
    sim = SimulatedLLM(replies=["one two three four"])
    client = simulated_client(sim=sim)
    chunks = list(ask(client, stream=True))
    assert all(c.choices for c in chunks), "the usage chunk nbagent asked for is hidden"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three four"
    assert sim.requests[0]["stream_options"] == {"include_usage": True}
    row = llm_rows(run).iloc[0]
    assert row.status == "ok" and row.output_tokens > 0 and row.cost_usd > 0
    assert run.spend_usd == pytest.approx(row.cost_usd, abs=1e-9)
    assert run.reserved_usd == 0
    assert json.loads(row.response)["text"] == "one two three four"


def test_streaming_chat_with_usage_asked_keeps_the_usage_chunk(run: nbagent.Run) -> None:
    client = simulated_client(replies=["hello there"])
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    row = llm_rows(run).iloc[0]
    assert row.input_tokens == chunks[-1].usage.prompt_tokens
    assert row.output_tokens == chunks[-1].usage.completion_tokens


def test_streaming_responses_priced(run: nbagent.Run) -> None:
    client = simulated_client(replies=["streamed answer"])
    with client.responses.stream(model=MODEL, input="Question: stream?") as stream:
        final = stream.get_final_response()
    row = llm_rows(run).iloc[0]
    assert row.status == "ok"
    assert (row.input_tokens, row.output_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert row.cost_usd == pytest.approx(
        BOOK.cost(MODEL, final.usage.input_tokens, final.usage.output_tokens)[0]
    )
    assert json.loads(row.response)["text"] == "streamed answer"


def test_stream_closed_early_is_settled_not_leaked(run: nbagent.Run) -> None:
    client = simulated_client(replies=["a b c d e f g h"])
    stream = ask(client, stream=True, max_tokens=50)
    next(iter(stream))
    stream.close()
    assert run.reserved_usd == 0, "the reservation is settled when the stream is closed"
    row = llm_rows(run).iloc[0]
    assert row.status == "error" and "closed before it completed" in row.error
    # no usage arrived: billed at the reservation, an upper bound of what the server billed
    assert row.cost_usd >= BOOK.cost(MODEL, 10, 50)[0]
    assert "billed at the reservation" in row.detail
    assert run.spend_usd == pytest.approx(row.cost_usd, abs=1e-9)


def test_stream_cut_mid_way_is_an_error_row_and_not_ledgered(run: nbagent.Run) -> None:
    sim = SimulatedLLM(replies=["a b c d e f g h", "a b c d e f g h"])
    sim.fail_next("stream_cut", after_events=3)
    client = simulated_client(sim=sim)

    @run.step("s")
    def s() -> str:
        return "".join(c.choices[0].delta.content or "" for c in ask(client, stream=True))

    with pytest.raises(openai.APIConnectionError):
        s()
    row = llm_rows(run).iloc[0]
    assert row.status == "error" and "RemoteProtocolError" in row.error
    assert run.reserved_usd == 0
    again = nbagent.Run("t")

    @again.step("s")
    def s_again() -> str:
        return "".join(c.choices[0].delta.content or "" for c in ask(client, stream=True))

    assert s_again() == "a b c d e f g h"
    assert sim.request_count == 2, "a cut stream is not replayed from the ledger"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tool_calls_traced(run: nbagent.Run) -> None:
    client = simulated_client(
        replies=[{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]
    )
    reply = ask(client, tools=[WEATHER_TOOL])
    call = reply.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    row = llm_rows(run).iloc[0]
    assert row.status == "ok" and row.cost_usd > 0
    assert "get_weather" in row.response


# --------------------------------------------------------------------------- the cost ceiling


def _worst(body: dict[str, Any]) -> float:
    worst = BOOK.worst_case(body["model"], prompt_bound("chat", body), body["max_tokens"])
    return float(-(-worst * NANO // 1)) / NANO  # the nano-dollars the run reserves


def test_reservation_refuses_exactly_the_call_that_could_cross(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    for _ in range(2):
        ask(client, "hi", max_tokens=200)
    spent = run.spend_usd
    worst = _worst(body)
    assert worst > 0
    run.set_cap(usd=spent + worst - 2e-9)
    with pytest.raises(nbagent.CostCapExceeded) as info:
        ask(client, "hi", max_tokens=200)
    assert sim.request_count == 2, "the refused call never reached the server"
    message = str(info.value)
    assert "has spent $" in message and "could cost up to" in message
    assert "%nbagent cap --usd" in message and "run.set_cap(usd=" in message
    assert run.spend_usd == spent and run.reserved_usd == 0
    rows = llm_rows(run)
    assert rows.iloc[-1].status == "refused" and rows.iloc[-1].cost_usd == 0
    # the refusal is in the trace as a cap event and as an alert (what the dashboard shows)
    trace = run.trace()
    assert len(trace.query("kind == 'cap' and status == 'refused'")) == 1
    assert len(trace.query("kind == 'alert' and name == 'cap'")) == 1
    assert [a["kind"] for a in run.alerts()] == ["cap"]

    run.set_cap(usd=spent + worst + 2e-9)  # now it fits exactly
    ask(client, "hi", max_tokens=200)
    assert sim.request_count == 3
    assert run.spend_usd <= (run.max_cost_usd or 0)


def test_spend_never_ends_above_the_cap(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    run.set_cap(usd=0.0002)
    sent = 0
    with pytest.raises(nbagent.CostCapExceeded):
        for i in range(1000):
            ask(client, f"Question: {i}?", max_tokens=300)
            sent += 1
    assert sim.request_count == sent > 0
    assert run.spend_usd <= 0.0002
    assert run.reserved_usd == 0


def test_a_call_that_fits_once_waiting_settlements_count_is_sent(tmp_path: Path) -> None:
    """A settlement waits in the step log (no transaction on the call's path) and gives
    back more reservation than it spends; the cap check counts what waits there, so it
    sees exactly what is committed (SQLite's counters alone would refuse this call)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    worst = _worst(body)
    probe = nbagent.Run("probe", store=tmp_path / "probe")
    ask(simulated_client(sim=SimulatedLLM(), run=probe), "hi", max_tokens=200)
    actual = probe.spend_usd  # what the same call really costs
    assert 0 < actual < worst

    run = nbagent.Run("t", store=tmp_path / "s", max_cost_usd=actual + worst + 1e-9)
    sim = SimulatedLLM()
    client = simulated_client(sim=sim, run=run)
    ask(client, "hi", max_tokens=200)
    assert run.store._log is not None and run.store._log.pending()  # its settlement waits
    ask(client, "hi", max_tokens=200)  # fits: actual + worst <= cap
    assert sim.request_count == 2
    assert run.spend_usd == pytest.approx(2 * actual) and run.reserved_usd == 0
    with pytest.raises(nbagent.CostCapExceeded):  # and the next one does not
        ask(client, "hi", max_tokens=200)
    assert sim.request_count == 2


def test_a_batch_that_raises_writes_nothing(tmp_path: Path) -> None:
    store = nbagent.Run("t", store=tmp_path / "s").store
    with pytest.raises(RuntimeError), store.batch():
        store.set_record("llm", "k", {"a": 1})
        store.incr_blind("t", {"spend_nusd": 5})
        raise RuntimeError("boom")
    assert store.get_record("llm", "k") is None
    assert store.counter("t", "spend_nusd") == 0
    with store.batch():
        store.set_record("llm", "k", {"a": 1})
        store.incr_blind("t", {"spend_nusd": 5})
        store.incr_blind("t", {"spend_nusd": 2})
    assert store.get_record("llm", "k") == {"a": 1}
    assert store.counter("t", "spend_nusd") == 7


def test_no_max_tokens_reserves_the_model_output_limit(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    # gpt-4o-mini may write 16,384 tokens at $0.60/M: ~$0.0098 worst case
    run.set_cap(usd=0.009)
    with pytest.raises(nbagent.CostCapExceeded):
        ask(client, "hi")
    assert sim.request_count == 0
    ask(client, "hi", max_tokens=100)
    assert sim.request_count == 1


def test_max_llm_calls_raises_step_cap(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    run.set_cap(llm_calls=2)
    ask(client)
    ask(client)
    with pytest.raises(nbagent.StepCapExceeded, match="possible loop"):
        ask(client)
    assert sim.request_count == 2


def test_unknown_model_reserved_and_billed_conservatively(run: nbagent.Run) -> None:
    client = simulated_client()
    with pytest.warns(UnknownModelPriceWarning, match="no price for model 'my-local-llm'"):
        reply = ask(client, model="my-local-llm", max_tokens=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ask(client, model="my-local-llm", max_tokens=50)  # warned once only
    rows = llm_rows(run)
    assert list(rows.price_known) == [0, 0]
    u = reply.usage
    i, o = UNKNOWN_MODEL_RATES
    assert rows.iloc[0].cost_usd == pytest.approx(
        (u.prompt_tokens * i + u.completion_tokens * o) / 1e6
    )
    # with its price given (a local model is free) the flag goes away
    free = simulated_client(prices={"my-local-llm": {"input_per_mtok": 0, "output_per_mtok": 0}})
    ask(free, model="my-local-llm")
    last = llm_rows(run).iloc[-1]
    assert last.price_known == 1 and last.cost_usd == 0


def test_spend_survives_a_new_process(run: nbagent.Run) -> None:
    client = simulated_client()
    ask(client)
    ask(client)
    code = "import nbagent; r = nbagent.Run('t'); print(repr(r.spend_usd), r.llm_calls)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout.split()
    assert float(out[0]) == run.spend_usd > 0 and int(out[1]) == 2


# --------------------------------------------------------------------------- no re-billing


def test_crash_after_three_of_five_calls_resends_only_two() -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    answers: list[str] = []

    def make_step(r: nbagent.Run, crash: bool) -> Any:
        @r.step("five")
        def five() -> list[str]:
            out = []
            for i in range(5):
                reply = ask(client, f"Question: part {i}?", max_tokens=100)
                out.append(reply.choices[0].message.content)
                answers.append(out[-1])
                if crash and i == 2:
                    raise RuntimeError("kernel died")
            return out

        return five

    first = nbagent.Run("t")
    with pytest.raises(RuntimeError):
        make_step(first, crash=True)()
    assert sim.request_count == 3
    spent = first.spend_usd

    again = nbagent.Run("t")  # a restarted kernel opens the run again
    result = make_step(again, crash=False)()
    assert sim.request_count == 5, "only the two unanswered calls were sent"
    assert result[:3] == answers[:3]
    rows = llm_rows(again)
    assert list(rows.status) == ["ok"] * 3 + ["replayed"] * 3 + ["ok"] * 2
    replayed = rows[rows.status == "replayed"]
    assert (replayed.cost_usd == 0).all() and replayed.replayed.all()
    assert again.llm_calls == 5
    assert again.spend_usd == pytest.approx(spent + rows.iloc[-2:].cost_usd.sum(), abs=1e-9)
    # the same key as the first time: idempotency keys come from run state
    assert list(replayed.idempotency_key) == list(rows.iloc[:3].idempotency_key)


def test_a_finished_step_rerun_asks_again() -> None:
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    r = nbagent.Run("t")

    @r.step("one", rerun=True)
    def one() -> str:
        return str(ask(client, max_tokens=20).choices[0].message.content)

    one()
    nbagent.Run("t")  # fresh occurrences
    r2 = nbagent.Run("t")

    @r2.step("one", rerun=True)
    def one_again() -> str:
        return str(ask(client, max_tokens=20).choices[0].message.content)

    one_again()
    assert sim.request_count == 2


def test_replayed_stream_is_restreamed() -> None:
    sim = SimulatedLLM(replies=["alpha beta gamma"])
    client = simulated_client(sim=sim)

    def body(r: nbagent.Run, crash: bool) -> Any:
        @r.step("s")
        def s() -> str:
            text = "".join(c.choices[0].delta.content or "" for c in ask(client, stream=True))
            if crash:
                raise RuntimeError("crash")
            return text

        return s

    with pytest.raises(RuntimeError):
        body(nbagent.Run("t"), True)()
    again = nbagent.Run("t")
    assert body(again, False)() == "alpha beta gamma"
    assert sim.request_count == 1
    assert llm_rows(again).iloc[-1].status == "replayed"


SIGKILL_SCRIPT = """
import os, sys, httpx2, nbagent
from nbagent._client import openai_client
from nbagent._simulator import SimulatedLLM

count_file, crash = sys.argv[1], sys.argv[2] == "crash"

class Counting(httpx2.BaseTransport):
    def __init__(self):
        self.sim = SimulatedLLM()
    def handle_request(self, request):
        with open(count_file, "a") as f:
            f.write("x\\n")
        return self.sim.handle_request(request)

client = openai_client(api_key="sk-x", base_url="https://sim.invalid/v1",
                       http_client=httpx2.Client(transport=Counting()))
run = nbagent.Run("killed")

@run.step("five")
def five():
    out = []
    for i in range(5):
        r = client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
            messages=[{"role": "user", "content": f"Question: part {i}?"}])
        out.append(r.choices[0].message.content)
        if crash and i == 2:
            os.kill(os.getpid(), 9)
    return out

print(len(five()))
"""


def test_sigkill_mid_step_then_rerun_resends_only_unanswered(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(SIGKILL_SCRIPT)
    count = tmp_path / "count.txt"
    killed = subprocess.run(
        [sys.executable, str(script), str(count), "crash"], capture_output=True, env=os.environ
    )
    assert killed.returncode == -9
    assert count.read_text().count("x") == 3
    done = subprocess.run(
        [sys.executable, str(script), str(count), "ok"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    )
    assert done.stdout.strip() == "5"
    assert count.read_text().count("x") == 5
    rows = llm_rows(nbagent.Run("killed"))
    assert list(rows.status) == ["ok"] * 3 + ["replayed"] * 3 + ["ok"] * 2


# --------------------------------------------------------------------------- the retry table


def test_timeouts_retry_with_waits_1_5_30(run: nbagent.Run) -> None:
    sim = SimulatedLLM(faults=["timeout"] * 3)
    client = simulated_client(sim=sim)
    ask(client, max_tokens=20)
    assert sim.request_count == 4
    rows = llm_rows(run)
    assert list(rows.status) == ["error"] * 3 + ["ok"]
    assert list(rows.wait_s[:3]) == [1, 5, 30]
    assert list(rows.attempt) == [1, 2, 3, 4]
    assert rows.error[0].startswith("ReadTimeout")
    assert run.llm_calls == 1  # one call, four attempts


@pytest.mark.parametrize(
    ("fault", "raised"),
    [("timeout", openai.APITimeoutError), ("connection", openai.APIConnectionError)],
)
def test_exhausted_network_errors_keep_openai_types(
    run: nbagent.Run, fault: str, raised: type[Exception]
) -> None:
    sim = SimulatedLLM(faults=[fault] * 4)
    client = simulated_client(sim=sim)
    with pytest.raises(raised):
        ask(client, max_tokens=20)
    assert sim.request_count == 4
    assert run.reserved_usd == 0 and run.spend_usd == 0
    assert list(llm_rows(run).wait_s.fillna(-1)) == [1, 5, 30, -1]


def test_rate_limit_waits_retry_after_and_opens_the_circuit(run: nbagent.Run) -> None:
    now = [1000.0]
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    breaker = breaker_for(str(client.base_url), clock=lambda: now[0])
    sim.fail_next("rate_limit", times=1, retry_after_s=7)
    ask(client, max_tokens=20)
    assert sim.request_count == 2
    assert llm_rows(run).wait_s[0] == 7

    sim.fail_next("rate_limit", times=5, retry_after_s=2)
    with pytest.raises(openai.RateLimitError):
        ask(client, max_tokens=20)
    assert sim.request_count == 7
    assert breaker.state == "open"
    assert any(a["kind"] == "circuit" for a in run.alerts())

    with pytest.raises(nbagent.CircuitOpenError):
        ask(client, max_tokens=20)
    assert sim.request_count == 7, "an open circuit fails fast, no request sent"
    assert llm_rows(run).iloc[-1].status == "refused"

    now[0] += 31  # cool-down over: half-open lets one trial call through
    assert breaker.state == "half_open"
    ask(client, max_tokens=20)
    assert sim.request_count == 8
    assert breaker.state == "closed"


def test_server_errors_retry_and_repeated_503_alerts(run: nbagent.Run) -> None:
    sim = SimulatedLLM(faults=["unavailable", "unavailable", "server_error"])
    client = simulated_client(sim=sim)
    seen: list[dict[str, Any]] = []
    run.on_alert(seen.append)
    ask(client, max_tokens=20)
    assert sim.request_count == 4
    assert list(llm_rows(run).wait_s[:3]) == [1, 5, 30]
    assert [a["kind"] for a in seen] == ["server_error"]

    sim.fail_next("server_error", times=4)
    with pytest.raises(openai.InternalServerError):
        ask(client, max_tokens=20)
    assert sim.request_count == 8


def test_client_error_is_not_retried(run: nbagent.Run) -> None:
    sim = SimulatedLLM(faults=["bad_request"])
    client = simulated_client(sim=sim)
    with pytest.raises(openai.BadRequestError):
        ask(client, max_tokens=20)
    assert sim.request_count == 1
    row = llm_rows(run).iloc[0]
    assert row.status == "error" and "HTTP 400" in row.error and row.cost_usd == 0
    assert run.reserved_usd == 0


@pytest.mark.parametrize(
    ("fault", "raised"),
    [("auth", openai.AuthenticationError), ("forbidden", openai.PermissionDeniedError)],
)
def test_auth_failure_stops_the_run(run: nbagent.Run, fault: str, raised: type[Exception]) -> None:
    sim = SimulatedLLM(faults=[fault])
    client = simulated_client(sim=sim)
    with pytest.raises(raised):
        ask(client, max_tokens=20)
    assert sim.request_count == 1
    assert run.stopped and "auth failure" in run.stopped and "fix the API key" in run.stopped
    assert any(a["kind"] == "auth" for a in run.alerts())
    with pytest.raises(nbagent.RunStopped):
        ask(client, max_tokens=20)
    assert sim.request_count == 1

    @run.step("later")
    def later() -> int:
        return 1

    with pytest.raises(nbagent.RunStopped):
        later()
    run.resume()
    ask(client, max_tokens=20)
    assert sim.request_count == 2


@pytest.mark.parametrize("mode", ["malformed_json", "schema_mismatch"])
def test_tool_schema_mismatch_fed_back_once(run: nbagent.Run, mode: str) -> None:
    sim = SimulatedLLM(
        replies=[{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}]
    )
    sim.fail_next("bad_tool_args", mode=mode)
    client = simulated_client(sim=sim)
    reply = ask(client, "Question: weather in Oslo?", tools=[WEATHER_TOOL], max_tokens=200)
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert sim.request_count == 2
    second = sim.requests[1]["messages"]
    assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"]
    assert second[-1]["role"] == "tool"
    assert second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert "rejected" in second[-1]["content"] and "schema" in second[-1]["content"]
    rows = llm_rows(run)
    assert list(rows.status) == ["error", "ok"]
    assert rows.error[0].startswith("ToolValidationError")
    assert (rows.cost_usd > 0).all(), "both responses were billed"
    assert run.spend_usd == pytest.approx(rows.cost_usd.sum(), abs=1e-9)
    assert run.llm_calls == 2


def test_tool_schema_mismatch_twice_returns_the_second_as_is(run: nbagent.Run) -> None:
    sim = SimulatedLLM(faults=["bad_tool_args", "bad_tool_args"])
    client = simulated_client(sim=sim)
    reply = ask(client, "Question: weather?", tools=[WEATHER_TOOL], max_tokens=200)
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
    assert sim.request_count == 2
    rows = llm_rows(run)
    assert list(rows.status) == ["error", "ok"]
    assert "returned as is" in rows.error[1]


def test_idempotency_key_same_across_retries_different_per_call(run: nbagent.Run) -> None:
    sim = SimulatedLLM(faults=["unavailable", "timeout"])
    rec = Recording(sim)
    client = openai_client(
        api_key="sk-x", base_url=SIMULATED_BASE_URL, http_client=httpx2.Client(transport=rec)
    )
    ask(client, max_tokens=20)
    ask(client, max_tokens=20)
    keys = [h["idempotency-key"] for h in rec.headers]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert [h["x-stainless-retry-count"] for h in rec.headers] == ["0", "1", "2", "0"]

    @run.step("plan")
    def plan() -> None:
        ask(client, max_tokens=20)
        ask(client, max_tokens=20)

    plan()
    assert [h["idempotency-key"] for h in rec.headers[-2:]] == [
        "run:t:step:plan:1:call:1",
        "run:t:step:plan:1:call:2",
    ]


def test_events_have_the_dashboard_shapes(run: nbagent.Run) -> None:
    events: list[dict[str, Any]] = []
    run.subscribe(events.append)
    client = simulated_client(faults=["timeout"])
    ask(client, max_tokens=20)
    calls = [e for e in events if e["type"] == "llm_call"]
    retrying = [e for e in events if e["type"] == "llm_retrying"]
    keys = {
        "type", "step", "attempt", "status", "model", "input_tokens", "cached_tokens",
        "output_tokens", "reasoning_tokens", "cost_usd", "latency_s", "error", "wait_s",
        "replayed", "run", "ts",
    }  # fmt: skip
    assert [set(e) for e in calls] == [keys, keys]
    assert [e["status"] for e in calls] == ["error", "ok"]
    assert len(retrying) == 1
    assert set(retrying[0]) == {"type", "step", "attempt", "wait_s", "error", "run", "ts"}
    assert retrying[0]["wait_s"] == 1


# --------------------------------------------------------------------------- secrets, clients


def test_api_key_never_reaches_the_store(run: nbagent.Run, isolated_nbagent: Path) -> None:
    sim = SimulatedLLM()
    client = openai_client(
        api_key=SECRET, base_url=SIMULATED_BASE_URL, http_client=httpx2.Client(transport=sim)
    )

    @run.step("s")
    def s() -> None:
        ask(client, max_tokens=20, extra_body={"api_key": SECRET})
        ask(client, "stream", max_tokens=20, stream=True).close()

    s()
    sim.fail_next("auth", message=f"Incorrect API key provided: {SECRET}")
    with pytest.raises(openai.AuthenticationError):
        ask(client, max_tokens=20)
    run.store.close()
    needle = SECRET.encode()
    files = [p for p in isolated_nbagent.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert needle not in path.read_bytes(), path
    df = nbagent.Run("t").trace()
    assert SECRET not in df.to_csv()
    assert "[REDACTED]" in df.to_csv()


def test_user_http_client_keeps_its_transport_wrapped(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    rec = Recording(sim)
    other = Recording(SimulatedLLM())
    hc = httpx2.Client(transport=rec, mounts={"https://other.invalid": other})
    client = openai_client(api_key="sk-x", base_url=SIMULATED_BASE_URL, http_client=hc)
    assert client._client is hc
    assert isinstance(hc._transport, TracedTransport) and hc._transport.inner is rec
    assert all(isinstance(t, TracedTransport) for t in hc._mounts.values())
    again = openai_client(api_key="sk-x", base_url=SIMULATED_BASE_URL, http_client=hc)
    assert isinstance(hc._transport, TracedTransport) and hc._transport.inner is rec
    ask(again, max_tokens=20)
    ask(client.with_options(timeout=5), max_tokens=20)
    assert len(rec.headers) == 2 and len(llm_rows(run)) == 2
    assert client.max_retries == 0


def test_sdk_retries_forced_off(run: nbagent.Run) -> None:
    with pytest.warns(UserWarning, match="max_retries=3 ignored"):
        client = openai_client(
            api_key="sk-x",
            base_url=SIMULATED_BASE_URL,
            max_retries=3,
            http_client=httpx2.Client(transport=SimulatedLLM()),
        )
    assert client.max_retries == 0


def test_other_endpoints_pass_through_traced(run: nbagent.Run) -> None:
    client = simulated_client()
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    row = llm_rows(run).iloc[0]
    assert row.status == "error" and row.price_known is None  # unpriced
    assert run.llm_calls == 0


def test_async_client(run: nbagent.Run) -> None:
    sim = SimulatedLLM(replies=["async one", "async two", "async three"], faults=["timeout"])

    async def main() -> list[str]:
        client = simulated_client(sim=sim, async_=True)
        assert isinstance(client, openai.AsyncOpenAI)
        assert isinstance(client._client._transport, AsyncTracedTransport)
        a = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True
        )
        b = "".join([c.choices[0].delta.content or "" async for c in stream])
        r = await client.responses.create(model=MODEL, input="hi", max_output_tokens=20)
        return [a.choices[0].message.content or "", b, r.output_text]

    assert asyncio.run(main()) == ["async one", "async two", "async three"]
    rows = llm_rows(run)
    assert list(rows.status) == ["error", "ok", "ok", "ok"]
    assert (rows.cost_usd[1:] > 0).all()
    assert run.spend_usd == pytest.approx(rows.cost_usd.sum(), abs=1e-9)
    assert run.reserved_usd == 0


def test_async_openai_client_factory(run: nbagent.Run) -> None:
    sim = SimulatedLLM()
    client = async_openai_client(
        api_key="sk-x", base_url=SIMULATED_BASE_URL, http_client=httpx2.AsyncClient(transport=sim)
    )
    assert client.max_retries == 0
    asyncio.run(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
    )
    assert sim.request_count == 1 and len(llm_rows(run)) == 1


def test_default_client_says_once_it_simulates(
    run: nbagent.Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(_client, "_notice_shown", False)
    first = default_client()
    default_client()
    out = capsys.readouterr().out
    assert out.count("simulated LLM") == 1 and "OPENAI_API_KEY" in out
    assert isinstance(first.nbagent_sim, SimulatedLLM)
    ask(first, max_tokens=20)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-looking")
    real = default_client()
    assert not hasattr(real, "nbagent_sim") and real.max_retries == 0
    assert isinstance(real._client._transport, TracedTransport)


def test_no_run_open_is_a_clear_error() -> None:
    client = simulated_client()
    with pytest.raises(nbagent.NbagentError, match="no nbagent run is open"):
        ask(client)


def test_public_names() -> None:
    for name in (
        "openai_client",
        "async_openai_client",
        "simulated_client",
        "default_client",
        "SimulatedLLM",
        "PriceBook",
        "FakePayments",
    ):
        assert name in nbagent.__all__ and hasattr(nbagent, name)


def test_prompt_bound_is_an_upper_bound_of_simulated_tokens(run: nbagent.Run) -> None:
    client = simulated_client()
    text = (
        textwrap.dedent("""\
        Ünïcödé text, emoji 🚀🚀, and a long line of words to count.
    """)
        * 20
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "tools": [WEATHER_TOOL],
    }
    reply = client.chat.completions.create(**body, max_tokens=10)
    assert reply.usage.prompt_tokens <= prompt_bound("chat", body)


def test_a_retried_step_replays_the_calls_its_first_attempt_paid_for(run: nbagent.Run) -> None:
    """The step reads its call ledger once, at its first call; the calls it makes are
    added as they are answered, so attempt 2 finds attempt 1's answer without a read."""
    sim = SimulatedLLM()
    client = simulated_client(sim=sim)
    attempts: list[str] = []

    @run.step("s", retries=1)
    def s() -> str:
        answer = ask(client, "Question: what is paid once?").choices[0].message.content
        attempts.append(answer)
        if len(attempts) == 1:
            raise TimeoutError("the step fails after its call")  # retried
        return answer

    assert s() == attempts[0] == attempts[1]
    assert sim.request_count == 1, "attempt 2 sent the answered call again"
    assert list(llm_rows(run).status) == ["ok", "replayed"]
