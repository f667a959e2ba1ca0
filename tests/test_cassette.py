"""Cassettes: record through a simulated LLM (standing in for the network), replay without it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import nbagent
from nbagent._cassette import REPLAY_HEADER, Cassette, CassetteError, CassetteMiss, request_key
from nbagent._simulator import SimulatedLLM

BASE = "https://api.example.invalid/v1"
KEY = "sk-test-SECRET-4242424242"
Q = [{"role": "user", "content": "What is the capital of France?"}]


def recorder(path: Path, sim: SimulatedLLM, **kw: Any) -> openai.OpenAI:
    client: openai.OpenAI = nbagent.cassette_client(
        path, mode="record", inner=sim, api_key=KEY, base_url=BASE, **kw
    )
    return client


def player(path: Path, **kw: Any) -> openai.OpenAI:
    client: openai.OpenAI = nbagent.cassette_client(path, base_url=BASE, **kw)
    return client


def chat(client: Any, messages: Any = Q, **kw: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, **kw)


def dumps(items: Any) -> list[dict[str, Any]]:
    return [x.model_dump() for x in items]


def test_record_then_replay_offline_identical(tmp_path: Path) -> None:
    path = tmp_path / "lesson.cassette.jsonl"
    sim = SimulatedLLM(replies=["Paris.", "Paris, of course.", "Streamed answer here.", "Resp."])
    rec = recorder(path, sim)
    first, second = chat(rec), chat(rec)  # the same request twice
    streamed = list(
        chat(
            rec,
            [{"role": "user", "content": "stream it"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    resp = rec.responses.create(model="gpt-4o-mini", input="Say hi", max_output_tokens=50)
    resp_stream = list(rec.responses.create(model="gpt-4o-mini", input="Stream hi", stream=True))
    assert first.choices[0].message.content == "Paris."
    assert second.choices[0].message.content == "Paris, of course."
    assert sim.request_count == 5

    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["nbagent_cassette"] == 1
    exchanges = [json.loads(line) for line in lines[1:]]
    assert len(exchanges) == 5
    assert (
        exchanges[0]["key"]
        == exchanges[1]["key"]
        == request_key(json.dumps(exchanges[0]["request"]).encode())
    )
    assert exchanges[2]["stream"] is True and exchanges[2]["text"].startswith("data: ")
    assert exchanges[2]["text"].rstrip().endswith("data: [DONE]")
    assert all(e["complete"] for e in exchanges)

    del sim  # the "network" is gone
    play = player(path)
    assert chat(play).model_dump() == first.model_dump()  # in recorded order
    assert chat(play).model_dump() == second.model_dump()
    replayed = list(
        chat(
            play,
            [{"role": "user", "content": "stream it"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert dumps(replayed) == dumps(streamed)
    assert replayed[-1].usage is not None and replayed[-1].usage.completion_tokens > 0
    assert (
        play.responses.create(
            model="gpt-4o-mini", input="Say hi", max_output_tokens=50
        ).model_dump()
        == resp.model_dump()
    )
    again = list(play.responses.create(model="gpt-4o-mini", input="Stream hi", stream=True))
    assert dumps(again) == dumps(resp_stream)
    # all recordings of a request served: they come round again (a re-run notebook cell)
    assert chat(play).model_dump() == first.model_dump()


def test_key_order_and_whitespace_do_not_matter(tmp_path: Path) -> None:
    assert request_key(b'{"a": 1, "b": [1, 2]}') == request_key(b'{"b":[1,2],"a":1}')
    path = tmp_path / "c.jsonl"
    chat(recorder(path, SimulatedLLM(replies=["ok"])), temperature=0)
    raw = httpx2.Client(transport=Cassette(path))
    body = {"temperature": 0, "messages": Q, "model": "gpt-4o-mini"}
    r = raw.post(f"{BASE}/chat/completions", content=json.dumps(body, indent=3))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert r.headers[REPLAY_HEADER] == "replayed"


def test_unmatched_request_is_a_clear_error_openai_passes_through(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    chat(recorder(path, SimulatedLLM(replies=["ok"])))
    long_prompt = "Explain durable execution " + "in great detail " * 20
    for retries in (0, 2):  # even with the SDK's own retries on, it is not retried or wrapped
        play = player(path, max_retries=retries)
        with pytest.raises(CassetteMiss) as info:
            chat(play, [{"role": "user", "content": long_prompt}])
        message = str(info.value)
        assert str(path) in message
        assert "'gpt-4o-mini'" in message
        assert long_prompt[:80] in message and long_prompt[:81] not in message
        assert "mode='record'" in message and "OPENAI_API_KEY" in message
        assert "differs in: messages" in message
    assert isinstance(info.value, nbagent.NbagentError)
    assert not isinstance(info.value, httpx2.RequestError)


def test_repeat_false_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    chat(recorder(path, SimulatedLLM(replies=["once"])))
    play = player(path, repeat=False)
    assert chat(play).choices[0].message.content == "once"
    with pytest.raises(CassetteMiss, match="already served"):
        chat(play)
    with pytest.raises(CassetteError, match="does not exist.*mode='record'"):
        player(tmp_path / "nope.jsonl")
    with pytest.raises(CassetteError, match="not valid"):
        Cassette(path, mode="play")  # type: ignore[arg-type]


def test_no_secrets_in_the_file(tmp_path: Path) -> None:
    def server(request: httpx2.Request) -> httpx2.Response:
        # a server that echoes the key back and sends account headers
        token = request.headers["authorization"].split()[1]
        return httpx2.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"your key is {token}"},
                    }
                ],
            },
            headers={
                "x-request-id": "req_1",
                "openai-organization": "org-SECRETORG",
                "openai-project": "proj_SECRETPROJ",
                "set-cookie": "__cf_bm=SECRETCOOKIE; path=/",
                "x-ratelimit-limit-requests": "10000",
            },
        )

    path = tmp_path / "c.jsonl"
    client = nbagent.cassette_client(
        path,
        mode="record",
        inner=httpx2.MockTransport(server),
        api_key=KEY,
        organization="org-SECRETORG",
        project="proj_SECRETPROJ",
        base_url=BASE,
        default_headers={"Cookie": "session=SECRETCOOKIE"},
    )
    out = chat(client)
    assert KEY in (out.choices[0].message.content or "")  # the caller saw the real reply
    text = path.read_text()
    for secret in (KEY, "SECRET", "Bearer", "authorization", "cookie", "organization"):
        assert secret.lower() not in text.lower()
    headers = json.loads(text.splitlines()[1])["headers"]
    assert headers == {"x-request-id": "req_1", "content-type": "application/json"}


def test_auto_mode_records_once_then_replays(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "auto.jsonl"
    sim = SimulatedLLM(replies=["first run"])
    c1 = Cassette(path, mode="auto", inner=sim)
    assert c1.mode == "record"
    client = openai.OpenAI(
        http_client=httpx2.Client(transport=c1), api_key=KEY, base_url=BASE, max_retries=0
    )
    assert chat(client).choices[0].message.content == "first run"
    c2 = Cassette(path, mode="auto", inner=sim)
    assert c2.mode == "replay"
    client2 = openai.OpenAI(
        http_client=httpx2.Client(transport=c2), api_key=KEY, base_url=BASE, max_retries=0
    )
    assert chat(client2).choices[0].message.content == "first run"
    assert sim.request_count == 1  # the second "session" never reached the network
    assert len(c2.exchanges) == 1


def test_error_responses_and_cut_streams_replay_the_same(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    sim = SimulatedLLM(replies=["after the retry", "cut short stream text"])
    sim.fail_next("rate_limit", retry_after_s=2)
    rec = recorder(path, sim)
    with pytest.raises(openai.RateLimitError):
        chat(rec)
    assert chat(rec).choices[0].message.content == "after the retry"
    sim.fail_next("stream_cut", after_events=2)
    with pytest.raises(openai.APIConnectionError):
        list(chat(rec, [{"role": "user", "content": "s"}], stream=True))
    records = Cassette(path).exchanges
    assert [r["status"] for r in records] == [429, 200, 200]
    assert records[0]["headers"].get("retry-after") == "2"
    assert records[2]["complete"] is False and "RemoteProtocolError" in records[2]["error"]

    play = player(path)
    with pytest.raises(openai.RateLimitError):
        chat(play)
    assert chat(play).choices[0].message.content == "after the retry"
    with pytest.raises(openai.APIConnectionError):
        list(chat(play, [{"role": "user", "content": "s"}], stream=True))


def test_stream_closed_early_is_recorded_as_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rec = recorder(path, SimulatedLLM(replies=["one two three four five six"]))
    stream = chat(rec, stream=True)
    next(iter(stream))
    stream.close()
    (record,) = Cassette(path).exchanges
    assert record["complete"] is False and record["text"].startswith("data: ")


def test_async_record_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "async.jsonl"

    async def go(client: Any) -> tuple[Any, list[Any]]:
        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=Q)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=Q + Q, stream=True
        )
        return plain, [chunk async for chunk in stream]

    sim = SimulatedLLM(replies=["async reply", "async stream reply"])
    rec = nbagent.cassette_client(
        path, mode="record", inner=sim, async_=True, api_key=KEY, base_url=BASE
    )
    assert isinstance(rec, openai.AsyncOpenAI)
    p1, s1 = asyncio.run(go(rec))
    play = nbagent.cassette_client(path, async_=True, base_url=BASE)
    p2, s2 = asyncio.run(go(play))
    assert p1.model_dump() == p2.model_dump() and dumps(s1) == dumps(s2)
    assert "".join(c.choices[0].delta.content or "" for c in s2 if c.choices) == (
        "async stream reply"
    )


def test_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    chat(recorder(path, SimulatedLLM(replies=["kept"])))
    with path.open("a") as f:
        f.write('{"method": "POST", "pa')  # a crash mid-append
    assert chat(player(path)).choices[0].message.content == "kept"


def test_replay_needs_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.jsonl"
    chat(recorder(path, SimulatedLLM(replies=["no key needed"])))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = nbagent.cassette_client(path, base_url=BASE)
    assert client.max_retries == 0
    assert chat(client).choices[0].message.content == "no key needed"


def test_end_to_end_traced_client_over_a_cassette(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented composition: nbagent.openai_client(http_client=Client(Cassette))."""
    client_mod = pytest.importorskip("nbagent._client")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")
    path = tmp_path / "traced.jsonl"

    def session(run_name: str, cassette: Cassette) -> tuple[nbagent.Run, str, str]:
        run = nbagent.Run(run_name)
        client = client_mod.openai_client(
            http_client=httpx2.Client(transport=cassette), api_key=KEY, base_url=BASE
        )

        @run.step("ask")
        def ask() -> tuple[str, str]:
            plain = chat(client, max_tokens=50)
            stream = chat(client, [{"role": "user", "content": "stream"}], stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return plain.choices[0].message.content or "", text

        plain, streamed = ask()
        return run, plain, streamed

    sim = SimulatedLLM(replies=["Recorded answer.", "Recorded stream."])
    run1, p1, s1 = session("rec", Cassette(path, mode="record", inner=sim))
    run2, p2, s2 = session("play", Cassette(path))  # a new run, no simulator
    assert (p1, s1) == (p2, s2) == ("Recorded answer.", "Recorded stream.")
    assert sim.request_count == 2
    assert KEY not in path.read_text()
    assert run2.llm_calls == 2 and run2.spend_usd == pytest.approx(run1.spend_usd)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    nbagent.export_otel(run2, tracer_provider=provider)
    chats = [s for s in exporter.get_finished_spans() if s.name == "chat gpt-4o-mini"]
    assert len(chats) == 2
    for span in chats:
        attrs: dict[str, Any] = dict(span.attributes or {})
        assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
        assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
        assert attrs["nbagent.step"] == "ask#1"

    # a miss under the traced client: one clear error, not retried
    run3 = nbagent.Run("miss")
    client = client_mod.openai_client(
        http_client=httpx2.Client(transport=Cassette(path)), api_key=KEY, base_url=BASE
    )
    with pytest.raises(CassetteMiss, match="Something new"):
        chat(client, [{"role": "user", "content": "Something new"}])
    errors = run3.trace().query("kind == 'llm'")
    assert len(errors) == 1
