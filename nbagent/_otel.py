"""Exports of a run's trace: OpenTelemetry spans (GenAI semantic conventions) and JSON Lines.

``export_otel(run)`` turns the stored trace into spans after the fact, with the
timestamps of the original calls::

    from opentelemetry.sdk.trace import TracerProvider
    provider = TracerProvider()              # + a span processor / exporter of your choice
    nbagent.export_otel(run, tracer_provider=provider)

The span tree of one export (one trace)::

    invoke_agent <run>                       gen_ai.operation.name=invoke_agent
      step <name>                            one per step execution (or replay)
        chat <model>                         one per LLM-call attempt
        execute_tool <tool>                  one per tool call
      chat <model> / execute_tool <tool>     calls made outside any step

Retries of a step, alerts, cap refusals and cap changes become span *events* on the
step (or run) span. LLM and tool spans carry the GenAI attribute names
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.response.finish_reasons``,
``error.type``, ``gen_ai.tool.name``) plus ``nbagent.*`` attributes (``run``, ``step``,
``attempt``, ``status``, ``cost_usd``, ``replayed``, ``idempotency_key``, ...).

A trace row's ``ts`` is when it was recorded, i.e. when the call ended; a span runs
from ``ts - latency_s`` to ``ts``. Exporting twice exports the spans twice.

OpenTelemetry is an optional extra: ``pip install 'nbagent[otel]'``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import NbagentError

if TYPE_CHECKING:
    from ._engine import Run

__all__ = ["OtelNotInstalled", "export_jsonl", "export_otel"]

#: Step statuses that end one execution of a step.
_STEP_END = frozenset({"done", "failed", "interrupted", "replayed"})
#: Trace-row kinds that become LLM / tool spans.
_CALL_KINDS = frozenset({"llm", "tool"})
_ERROR_TYPE = re.compile(r"^([A-Za-z_][\w.]*)\s*:")


class OtelNotInstalled(NbagentError, ImportError):
    """OpenTelemetry (the ``otel`` extra) is not installed."""


def export_jsonl(run: Run, path: str | Path) -> Path:
    """Write the run's trace as JSON Lines (one object per trace row); returns the path."""
    from ._trace import to_jsonl

    return to_jsonl(run.store, run.name, path)


# --------------------------------------------------------------------------- rows


def _clean(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        try:
            return _clean(value.item())
        except (TypeError, ValueError):
            return value
    return value


def _rows(source: Any) -> list[dict[str, Any]]:
    """Trace rows as dicts (ts in seconds) from a Run or a ``run.trace()`` DataFrame."""
    if hasattr(source, "store") and hasattr(source, "name"):
        columns, rows = source.store.trace_rows(source.name)
        return [dict(zip(columns, row, strict=True)) for row in rows]
    if hasattr(source, "to_dict") and hasattr(source, "columns"):
        frame = source.reset_index() if "seq" not in source.columns else source
        out = []
        for record in frame.to_dict("records"):
            row = {k: _clean(v) for k, v in record.items()}
            ts = record.get("ts")
            if hasattr(ts, "timestamp"):
                row["ts"] = ts.timestamp()
            out.append(row)
        return out
    raise TypeError(f"export_otel() takes an nbagent.Run or its trace DataFrame, got {source!r}")


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _interval(row: dict[str, Any]) -> tuple[int, int]:
    end = float(row.get("ts") or 0.0)
    latency = _clean(row.get("latency_s")) or 0.0
    return int((end - float(latency)) * 1e9), int(end * 1e9)


def _error_type(row: dict[str, Any]) -> str | None:
    error = row.get("error")
    if not error or row.get("status") in ("ok", "done", "replayed"):
        return None
    match = _ERROR_TYPE.match(str(error))
    return match.group(1) if match else "_OTHER"


def _finish_reasons(row: dict[str, Any]) -> list[str] | None:
    sources = [_json(row.get("detail")), _json(row.get("response"))]
    for source in sources:
        if not isinstance(source, dict):
            continue
        if isinstance(source.get("response"), dict):  # a streamed Responses call, assembled
            sources.append(source["response"])
        reasons = source.get("finish_reasons")
        if isinstance(reasons, list) and reasons:
            return [str(r) for r in reasons]
        if isinstance(source.get("finish_reason"), str):
            return [source["finish_reason"]]
        choices = source.get("choices")
        if isinstance(choices, list):
            found = [
                str(c["finish_reason"])
                for c in choices
                if isinstance(c, dict) and c.get("finish_reason")
            ]
            if found:
                return found
        if source.get("object") == "response" and isinstance(source.get("status"), str):
            details = source.get("incomplete_details") or {}
            reason = details.get("reason") if isinstance(details, dict) else None
            return [reason or source["status"]]
    return None


def _put(attrs: dict[str, Any], key: str, value: Any) -> None:
    value = _clean(value)
    if value is None:
        return
    if isinstance(value, bool | str | float):
        attrs[key] = value
    elif isinstance(value, int):
        attrs[key] = int(value)
    elif isinstance(value, list | tuple):
        attrs[key] = [str(v) for v in value]
    else:
        attrs[key] = str(value)


def _nbagent_attrs(row: dict[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    _put(attrs, "nbagent.run", row.get("run"))
    _put(attrs, "nbagent.step", row.get("step"))
    _put(attrs, "nbagent.status", row.get("status"))
    _put(attrs, "nbagent.attempt", row.get("attempt"))
    _put(attrs, "nbagent.cost_usd", None if row.get("cost_usd") is None else float(row["cost_usd"]))
    _put(attrs, "nbagent.replayed", bool(_clean(row.get("replayed")) or False))
    _put(attrs, "nbagent.idempotency_key", row.get("idempotency_key"))
    _put(attrs, "nbagent.wait_s", row.get("wait_s"))
    _put(attrs, "nbagent.seq", row.get("seq"))
    return attrs


def _llm_span(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    detail = _json(row.get("detail"))
    detail = detail if isinstance(detail, dict) else {}
    request = _json(row.get("request"))
    request = request if isinstance(request, dict) else {}
    response = _json(row.get("response"))
    response = response if isinstance(response, dict) else {}
    operation = detail.get("operation") or "chat"
    model = row.get("model") or request.get("model")
    attrs: dict[str, Any] = {}
    _put(attrs, "gen_ai.operation.name", operation)
    _put(attrs, "gen_ai.provider.name", detail.get("provider") or "openai")
    _put(attrs, "gen_ai.request.model", model)
    for key in ("max_tokens", "temperature", "top_p", "seed"):
        _put(attrs, f"gen_ai.request.{key}", request.get(key))
    if "max_tokens" not in request:
        _put(
            attrs,
            "gen_ai.request.max_tokens",
            request.get("max_completion_tokens", request.get("max_output_tokens")),
        )
    _put(attrs, "gen_ai.response.model", response.get("model"))
    _put(attrs, "gen_ai.response.id", response.get("id"))
    _put(attrs, "gen_ai.usage.input_tokens", row.get("input_tokens"))
    _put(attrs, "gen_ai.usage.output_tokens", row.get("output_tokens"))
    _put(attrs, "gen_ai.usage.cache_read.input_tokens", row.get("cached_tokens"))
    _put(attrs, "gen_ai.response.finish_reasons", _finish_reasons(row))
    _put(attrs, "error.type", _error_type(row))
    _put(attrs, "nbagent.reasoning_tokens", row.get("reasoning_tokens"))
    if row.get("price_known") is not None:
        _put(attrs, "nbagent.price_known", bool(row["price_known"]))
    attrs.update(_nbagent_attrs(row))
    return f"{operation} {model}" if model else str(operation), attrs


def _tool_span(row: dict[str, Any], include_content: bool) -> tuple[str, dict[str, Any]]:
    attrs: dict[str, Any] = {}
    _put(attrs, "gen_ai.operation.name", "execute_tool")
    _put(attrs, "gen_ai.tool.name", row.get("name"))
    _put(attrs, "gen_ai.tool.type", "function")
    _put(attrs, "error.type", _error_type(row))
    if include_content:
        _put(attrs, "gen_ai.tool.call.arguments", row.get("request"))
        _put(attrs, "gen_ai.tool.call.result", row.get("response"))
    attrs.update(_nbagent_attrs(row))
    return f"execute_tool {row.get('name')}", attrs


# --------------------------------------------------------------------------- grouping


class _Execution:
    """One execution (or replay) of a step: its end row, its calls and its events."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.end: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def interval(self) -> tuple[int, int]:
        spans = [_interval(r) for r in self.calls]
        if self.end is not None:
            spans.append(_interval(self.end))
        spans += [(_interval(e)[1], _interval(e)[1]) for e in self.events]
        return min(s for s, _ in spans), max(e for _, e in spans)


def _group(
    rows: Iterable[dict[str, Any]],
) -> tuple[list[_Execution], list[dict[str, Any]], list[dict[str, Any]]]:
    """Step executions in order, calls outside steps, and run-level events."""
    executions: list[_Execution] = []
    open_: dict[str, _Execution] = {}
    loose_calls: list[dict[str, Any]] = []
    run_events: list[dict[str, Any]] = []
    for row in rows:
        step, kind = row.get("step"), row.get("kind")
        if not step:
            (loose_calls if kind in _CALL_KINDS else run_events).append(row)
            continue
        ex = open_.get(step)
        if ex is None:
            ex = open_[step] = _Execution(step)
            executions.append(ex)
        if kind in _CALL_KINDS:
            ex.calls.append(row)
        elif kind == "step" and row.get("status") in _STEP_END:
            ex.end = row
            del open_[step]
        else:
            ex.events.append(row)
    return executions, loose_calls, run_events


# --------------------------------------------------------------------------- export


def _import_otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as e:
        raise OtelNotInstalled(
            "export_otel() needs OpenTelemetry, which is not installed. Install the extra: "
            "pip install 'nbagent[otel]'"
        ) from e
    return trace


def export_otel(
    run: Run | Any,
    tracer_provider: Any = None,
    *,
    include_content: bool = False,
) -> int:
    """Export a run's trace as OpenTelemetry spans; returns how many spans were made.

    :param run: an :class:`nbagent.Run`, or a (possibly filtered) ``run.trace()`` DataFrame.
    :param tracer_provider: where the spans go (default: the global tracer provider).
    :param include_content: also record tool arguments and results
        (``gen_ai.tool.call.arguments`` / ``gen_ai.tool.call.result``; opt-in, as they
        may hold user data).
    """
    trace = _import_otel()
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from . import __version__

    rows = _rows(run)
    if not rows:
        return 0
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer("nbagent", __version__)
    executions, loose_calls, run_events = _group(rows)
    count = 0

    def event(span: Any, row: dict[str, Any]) -> None:
        attrs: dict[str, Any] = {}
        _put(attrs, "nbagent.status", row.get("status"))
        _put(attrs, "nbagent.error", row.get("error"))
        _put(attrs, "nbagent.attempt", row.get("attempt"))
        _put(attrs, "nbagent.wait_s", row.get("wait_s"))
        _put(attrs, "nbagent.cost_usd", row.get("cost_usd"))
        detail = row.get("detail")
        _put(attrs, "nbagent.detail", detail if isinstance(detail, str) else None)
        name = f"{row.get('kind')} {row.get('name')}" if row.get("name") else str(row.get("kind"))
        span.add_event(name, attributes=attrs, timestamp=_interval(row)[1])

    def call_span(row: dict[str, Any], parent_ctx: Any) -> None:
        nonlocal count
        if row.get("kind") == "llm":
            name, attrs = _llm_span(row)
            kind = SpanKind.CLIENT
        else:
            name, attrs = _tool_span(row, include_content)
            kind = SpanKind.INTERNAL
        start, end = _interval(row)
        span = tracer.start_span(
            name, context=parent_ctx, kind=kind, attributes=attrs, start_time=start
        )
        if "error.type" in attrs:
            span.set_status(Status(StatusCode.ERROR, str(row.get("error") or "")[:500]))
        span.end(end_time=end)
        count += 1

    starts, ends = zip(*(_interval(r) for r in rows), strict=True)
    run_name = str(rows[0].get("run"))
    root_attrs: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": run_name,
        "nbagent.run": run_name,
    }
    root = tracer.start_span(
        f"invoke_agent {run_name}", attributes=root_attrs, start_time=min(starts)
    )
    count += 1
    root_ctx = trace.set_span_in_context(root)
    for row in loose_calls:
        call_span(row, root_ctx)
    for row in run_events:
        event(root, row)
    for ex in executions:
        start, end = ex.interval()
        end_row = ex.end or {}
        attrs: dict[str, Any] = {}
        _put(attrs, "nbagent.run", run_name)
        _put(attrs, "nbagent.step", ex.step)
        _put(attrs, "nbagent.status", end_row.get("status", "unfinished"))
        _put(attrs, "nbagent.attempt", end_row.get("attempt"))
        _put(attrs, "nbagent.cost_usd", end_row.get("cost_usd"))
        _put(attrs, "nbagent.replayed", end_row.get("status") == "replayed")
        step_span = tracer.start_span(
            f"step {ex.step.rsplit('#', 1)[0]}",
            context=root_ctx,
            attributes=attrs,
            start_time=start,
        )
        count += 1
        if end_row.get("status") in ("failed", "interrupted"):
            step_span.set_attribute("error.type", _error_type(end_row) or "_OTHER")
            step_span.set_status(Status(StatusCode.ERROR, str(end_row.get("error") or "")[:500]))
        step_ctx = trace.set_span_in_context(step_span)
        for row in ex.calls:
            call_span(row, step_ctx)
        for row in ex.events:
            event(step_span, row)
        step_span.end(end_time=end)
    root.end(end_time=max(ends))
    return count
