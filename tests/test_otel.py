"""OpenTelemetry export (GenAI semantic conventions) and JSONL export of a run's trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import nbagent
from nbagent._otel import OtelNotInstalled


@nbagent.tool
def lookup(city: str) -> dict[str, Any]:
    """Look a city up."""
    return {"city": city, "population": 2_100_000}


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBAGENT_TIME_SCALE", "0")


def llm_row(run: nbagent.Run, **kw: Any) -> None:
    row: dict[str, Any] = {
        "kind": "llm",
        "name": "chat.completions",
        "model": "gpt-4o-mini",
        "attempt": 1,
        "status": "ok",
        "input_tokens": 120,
        "cached_tokens": 64,
        "output_tokens": 30,
        "reasoning_tokens": 0,
        "cost_usd": 0.000036,
        "latency_s": 0.4,
        "price_known": 1,
        "request": {"model": "gpt-4o-mini", "max_tokens": 200, "temperature": 0.2},
        "response": {"id": "chatcmpl-1", "model": "gpt-4o-mini-2024-07-18",
                     "choices": [{"index": 0, "finish_reason": "stop"}]},
    }  # fmt: skip
    row.update(kw)
    run.record_event(**row)


def define(run: nbagent.Run) -> Any:
    @run.step("research", retries=1)
    def research(state: list[int]) -> str:
        ctx = nbagent.current_step()
        assert ctx is not None
        if ctx.attempt == 1 and not state:
            state.append(1)
            llm_row(
                run,
                status="error",
                error="RateLimitError: Error code: 429 - rate limited",
                input_tokens=None,
                output_tokens=None,
                cached_tokens=None,
                cost_usd=0.0,
                response=None,
                idempotency_key="run:otel-1:step:research:1:call:1",
            )
            raise RuntimeError("transient")
        llm_row(run, attempt=2, idempotency_key="run:otel-1:step:research:1:call:1")
        lookup("Paris")
        return "ok"

    return research


def make_run() -> nbagent.Run:
    assert define(nbagent.Run("otel-1"))([]) == "ok"  # fails once, retried, done
    run = nbagent.Run("otel-1")  # as after a kernel restart: the step replays from the store
    assert define(run)([]) == "ok"
    llm_row(run, model="gpt-4.1", latency_s=1.0, response=None)  # outside any step
    return run


def export(run: Any, **kw: Any) -> tuple[int, list[ReadableSpan]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    n = nbagent.export_otel(run, tracer_provider=provider, **kw)
    return n, list(exporter.get_finished_spans())


def test_spans_attributes_and_parents() -> None:
    run = make_run()
    n, spans = export(run)
    names = sorted(s.name for s in spans)
    assert n == len(spans) == 7
    assert names == [
        "chat gpt-4.1",
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
        "execute_tool lookup",
        "invoke_agent otel-1",
        "step research",
        "step research",
    ]
    by_id = {s.context.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "invoke_agent otel-1")
    assert root.parent is None
    assert (
        root.attributes is not None and root.attributes["gen_ai.operation.name"] == "invoke_agent"
    )
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}

    executed, replayed = sorted(
        (s for s in spans if s.name == "step research"), key=lambda s: s.start_time or 0
    )
    assert executed.attributes is not None and replayed.attributes is not None
    assert executed.attributes["nbagent.status"] == "done"
    assert executed.attributes["nbagent.step"] == "research#1"
    assert replayed.attributes["nbagent.replayed"] is True
    assert executed.parent is not None and executed.parent.span_id == root.context.span_id
    # the retry of the step is an event on its span
    assert [e.name for e in executed.events] == ["step research"]
    assert executed.events[0].attributes is not None
    assert executed.events[0].attributes["nbagent.status"] == "retrying"

    failed, ok = sorted(
        (s for s in spans if s.name == "chat gpt-4o-mini"), key=lambda s: s.start_time or 0
    )
    for span in (failed, ok):
        assert span.kind == SpanKind.CLIENT
        assert span.parent is not None and by_id[span.parent.span_id] is executed
    attrs = dict(ok.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.request.max_tokens"] == 200
    assert attrs["gen_ai.request.temperature"] == 0.2
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["gen_ai.response.id"] == "chatcmpl-1"
    assert attrs["gen_ai.usage.input_tokens"] == 120
    assert attrs["gen_ai.usage.output_tokens"] == 30
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 64
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["nbagent.run"] == "otel-1"
    assert attrs["nbagent.step"] == "research#1"
    assert attrs["nbagent.attempt"] == 2
    assert attrs["nbagent.cost_usd"] == pytest.approx(0.000036)
    assert attrs["nbagent.replayed"] is False
    assert attrs["nbagent.idempotency_key"] == "run:otel-1:step:research:1:call:1"
    assert "error.type" not in attrs
    assert ok.end_time is not None and ok.start_time is not None
    assert (ok.end_time - ok.start_time) / 1e9 == pytest.approx(0.4, abs=1e-3)
    assert ok.status.status_code != StatusCode.ERROR

    fattrs = dict(failed.attributes or {})
    assert fattrs["error.type"] == "RateLimitError"
    assert "gen_ai.usage.input_tokens" not in fattrs  # unknown, not zero
    assert failed.status.status_code == StatusCode.ERROR

    tool = next(s for s in spans if s.name == "execute_tool lookup")
    tattrs = dict(tool.attributes or {})
    assert tattrs["gen_ai.operation.name"] == "execute_tool"
    assert tattrs["gen_ai.tool.name"] == "lookup"
    assert "gen_ai.tool.call.arguments" not in tattrs  # content is opt-in
    assert tool.parent is not None and by_id[tool.parent.span_id] is executed

    loose = next(s for s in spans if s.name == "chat gpt-4.1")
    assert loose.parent is not None and loose.parent.span_id == root.context.span_id
    assert "gen_ai.response.finish_reasons" not in (loose.attributes or {})
    assert root.start_time is not None and root.end_time is not None
    assert all(
        root.start_time <= (s.start_time or 0) <= (s.end_time or 0) <= root.end_time for s in spans
    )


def test_include_content_and_dataframe_input() -> None:
    run = make_run()
    trace = run.trace()
    n, spans = export(trace[trace["kind"] == "tool"], include_content=True)
    assert n == 3  # root, the step (synthesized: its end row was filtered out), the tool
    tool = next(s for s in spans if s.name == "execute_tool lookup")
    attrs = dict(tool.attributes or {})
    assert json.loads(str(attrs["gen_ai.tool.call.arguments"])) == {"city": "Paris"}
    assert json.loads(str(attrs["gen_ai.tool.call.result"]))["population"] == 2_100_000


def test_missing_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run()
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(OtelNotInstalled, match=r"pip install 'nbagent\[otel\]'"):
        nbagent.export_otel(run)


def test_export_jsonl(tmp_path: Path) -> None:
    run = make_run()
    path = nbagent.export_jsonl(run, tmp_path / "trace.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("llm") == 3 and kinds.count("tool") == 1
    tool = next(r for r in rows if r["kind"] == "tool")
    assert tool["request"] == {"city": "Paris"} and tool["step"] == "research#1"
