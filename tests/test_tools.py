"""@nbagent.tool: trace rows and events inside a run, errors, async tools, schemas."""

from __future__ import annotations

import asyncio
import enum
import json
from typing import Annotated, Any, Literal, Optional

import pandas as pd
import pytest

import nbagent
from nbagent._tools import ToolDefinitionError, function_schema, parse_docstring


@nbagent.tool
def search(query: str, limit: int = 3, lang: Literal["en", "fr"] = "en") -> list[str]:
    """Search the web for pages.

    Args:
        query: what to look for.
        limit: how many results
            to return at most.
        lang: result language.
    """
    return [f"{query} result {i}" for i in range(limit)]


@nbagent.tool(name="fail_hard")
def failing(reason: str) -> None:
    """Always fails."""
    raise ValueError(f"cannot: {reason}")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Custom:
    pass


def tool_rows(run: nbagent.Run) -> list[dict[str, Any]]:
    trace = run.trace()
    return trace[trace["kind"] == "tool"].to_dict("records")  # type: ignore[no-any-return]


def test_outside_a_run_the_tool_just_runs() -> None:
    assert nbagent.current_run(required=False) is None
    assert search("x", limit=2) == ["x result 0", "x result 1"]
    assert search.__name__ == "search" and search.__doc__ and "Search" in search.__doc__


def test_calls_inside_a_step_are_traced_with_events() -> None:
    run = nbagent.Run("tools-1")
    events: list[dict[str, Any]] = []
    run.subscribe(events.append)

    @run.step("research")
    def research() -> list[str]:
        return search("durable agents", limit=2)

    assert research() == ["durable agents result 0", "durable agents result 1"]
    (row,) = tool_rows(run)
    assert row["name"] == "search" and row["step"] == "research#1" and row["status"] == "ok"
    assert json.loads(row["request"]) == {"query": "durable agents", "limit": 2}
    assert json.loads(row["response"]) == ["durable agents result 0", "durable agents result 1"]
    assert row["latency_s"] >= 0 and pd.isna(row["error"])
    calls = [e for e in events if e["type"] == "tool_call"]
    assert calls == [
        {
            "type": "tool_call",
            "step": "research#1",
            "name": "search",
            "status": "ok",
            "latency_s": pytest.approx(row["latency_s"], abs=0.01),
            "error": None,
            "run": "tools-1",
            "ts": calls[0]["ts"],
        }
    ]
    search("outside a step")  # in the run, outside any step: traced with no step
    assert pd.isna(tool_rows(run)[-1]["step"])


def test_errors_are_recorded_and_reraised() -> None:
    run = nbagent.Run("tools-2")
    events: list[dict[str, Any]] = []
    run.subscribe(events.append)

    @run.step("act")
    def act() -> None:
        failing("no network")

    with pytest.raises(ValueError, match="cannot: no network"):
        act()
    (row,) = tool_rows(run)
    assert row["name"] == "fail_hard" and row["status"] == "error"
    assert row["error"] == "ValueError: cannot: no network"
    assert pd.isna(row["response"])
    (event,) = [e for e in events if e["type"] == "tool_call"]
    assert event["status"] == "error" and event["error"] == "ValueError: cannot: no network"


def test_async_tool_and_non_json_result() -> None:
    class Page:
        def __repr__(self) -> str:
            return "<Page " + "x" * 5000 + ">"

    @nbagent.tool
    async def fetch(url: str) -> Page:
        """Fetch a page."""
        await asyncio.sleep(0)
        return Page()

    run = nbagent.Run("tools-3")
    page = asyncio.run(fetch("https://example.org"))
    assert isinstance(page, Page)
    (row,) = tool_rows(run)
    assert row["name"] == "fetch" and row["status"] == "ok"
    stored = json.loads(row["response"])
    assert stored["type"] == "Page" and stored["repr"].startswith("<Page xxx")
    assert len(stored["repr"]) < 2100  # truncated
    assert fetch.openai_tool["function"]["name"] == "fetch"  # type: ignore[attr-defined]


def test_schema_from_signature_hints_and_docstring() -> None:
    assert search.openai_tool == {  # type: ignore[attr-defined]
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web for pages.",
            "parameters": search.schema,  # type: ignore[attr-defined]
        },
    }
    assert search.schema == {  # type: ignore[attr-defined]
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for."},
            "limit": {"type": "integer", "description": "how many results to return at most."},
            "lang": {"type": "string", "enum": ["en", "fr"], "description": "result language."},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    assert failing.tool_name == "fail_hard"  # type: ignore[attr-defined]


def test_schema_types() -> None:
    def f(
        a: float,
        b: bool,
        c: list[str],
        d: Optional[int],  # noqa: UP045 - both spellings of optional are supported
        e: dict[str, float],
        g: Color,
        h: Annotated[str, "a described string"],
        i: int | str | None = None,
        j: list[Literal[1, 2]] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Kitchen sink.

        :param a: a float
        :param b: a flag
        """

    schema = function_schema(f)
    props = schema["parameters"]["properties"]
    assert props["a"] == {"type": "number", "description": "a float"}
    assert props["b"] == {"type": "boolean", "description": "a flag"}
    assert props["c"] == {"type": "array", "items": {"type": "string"}}
    assert props["d"] == {"type": ["integer", "null"]}
    assert props["e"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["g"] == {"type": "string", "enum": ["red", "blue"]}
    assert props["h"] == {"type": "string", "description": "a described string"}
    assert props["i"] == {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
    assert props["j"] == {"type": ["array", "null"], "items": {"type": "integer", "enum": [1, 2]}}
    assert schema["parameters"]["required"] == ["a", "b", "c", "d", "e", "g", "h"]
    assert schema["description"] == "Kitchen sink."


def test_methods_numpy_docstrings_and_bad_definitions() -> None:
    class Agent:
        def lookup(self, key: str) -> str:
            """Look a key up.

            Parameters
            ----------
            key : str
                the key.
            """
            return key

    schema = function_schema(Agent.lookup)
    assert list(schema["parameters"]["properties"]) == ["key"]
    Agent.traced = nbagent.tool(Agent.lookup)  # type: ignore[attr-defined]
    run = nbagent.Run("tools-5")
    assert Agent().traced("k") == "k"  # type: ignore[attr-defined]
    assert json.loads(tool_rows(run)[0]["request"]) == {"key": "k"}
    assert parse_docstring(Agent.lookup.__doc__)[1] == {"key": "the key."}

    def bad(x: Custom) -> None: ...

    with pytest.raises(ToolDefinitionError, match="no JSON-schema equivalent"):
        nbagent.tool(bad)
    with pytest.raises(ToolDefinitionError, match="not valid for OpenAI"):
        nbagent.tool(name="has space")(search)


def test_call_json_validates_model_arguments() -> None:
    run = nbagent.Run("tools-4")
    assert search.call_json('{"query": "q", "limit": 1}') == ["q result 0"]  # type: ignore[attr-defined]
    with pytest.raises(nbagent.ToolSchemaError, match="limit"):
        search.call_json('{"query": "q", "limit": "many"}')  # type: ignore[attr-defined]
    assert len(tool_rows(run)) == 1  # the rejected call never ran


def test_tool_schema_is_accepted_by_the_openai_client() -> None:
    from nbagent._simulator import SimulatedLLM, make_simulated_openai

    sim = SimulatedLLM()
    client: Any = make_simulated_openai(sim)
    out = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "find durable agents"}],
        tools=[search.openai_tool],  # type: ignore[attr-defined]
        tool_choice={"type": "function", "function": {"name": "search"}},
    )
    call = (out.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "search"  # type: ignore[union-attr]
    assert isinstance(search.call_json(call.function.arguments), list)  # type: ignore[attr-defined,union-attr]
