"""``@nbagent.tool``: traced tool functions with an OpenAI tool schema.

::

    @nbagent.tool
    def search(query: str, limit: int = 5) -> list[str]:
        '''Search the web.

        Args:
            query: what to look for.
            limit: how many results to return.
        '''

    client.chat.completions.create(..., tools=[search.openai_tool])
    search("durable agents")       # traced as kind="tool" in the run's trace
    search.call_json('{"query": "x"}')  # a model's tool-call arguments, validated

Every call inside a run appends one trace row (``kind="tool"``, name, arguments as
``request``, result as ``response``, ``latency_s``, ``status`` ok/error, ``error``) and
emits a ``tool_call`` event; outside a run the function just runs. Errors are recorded
and re-raised unchanged. ``async def`` tools are traced the same way.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import re
import time
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, overload

from ._errors import NbagentError

__all__ = ["ToolDefinitionError", "function_schema", "tool"]

F = TypeVar("F", bound=Callable[..., Any])

#: Longest JSON text stored for one tool argument set or result (longer: a truncated preview).
MAX_STORED_CHARS = 16_000
_PREVIEW_CHARS = 2_000


class ToolDefinitionError(NbagentError, TypeError):
    """A tool's signature cannot be described as a JSON schema."""


# --------------------------------------------------------------------------- schema

_SIMPLE: Mapping[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    tuple: "array",
    set: "array",
    frozenset: "array",
}


def _type_schema(tp: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one annotation."""
    if tp is Any or tp is inspect.Parameter.empty:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        schema = _type_schema(args[0], where)
        for meta in args[1:]:
            if isinstance(meta, str):
                schema["description"] = meta
        return schema
    if origin is Literal:
        values = list(args)
        kinds = {_literal_type(v, where) for v in values}
        schema = {"enum": values}
        if len(kinds) == 1:
            schema = {"type": kinds.pop(), "enum": values}
        return schema
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        nullable = len(members) < len(args)
        if len(members) == 1:
            schema = _type_schema(members[0], where)
            if nullable:
                if isinstance(schema.get("type"), str) and "enum" not in schema:
                    schema["type"] = [schema["type"], "null"]
                else:
                    schema = {"anyOf": [schema, {"type": "null"}]}
            return schema
        options = [_type_schema(m, where) for m in members]
        if nullable:
            options.append({"type": "null"})
        return {"anyOf": options}
    if origin in (list, set, frozenset, tuple) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, abc.Sequence)
    ):
        schema = {"type": "array"}
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            schema["prefixItems"] = [_type_schema(a, where) for a in args]
            schema["minItems"] = schema["maxItems"] = len(args)
        elif args:
            schema["items"] = _type_schema(args[0], where)
        return schema
    if origin is dict or (
        origin is not None and isinstance(origin, type) and issubclass(origin, abc.Mapping)
    ):
        schema = {"type": "object"}
        if len(args) == 2 and args[1] is not Any:
            schema["additionalProperties"] = _type_schema(args[1], where)
        return schema
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            values = [m.value for m in tp]
            kinds = {_literal_type(v, where) for v in values}
            return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
        for base, name in _SIMPLE.items():
            if tp is base:
                return {"type": name}
        if issubclass(tp, bool):
            return {"type": "boolean"}
        for base, name in _SIMPLE.items():
            if issubclass(tp, base):
                return {"type": name}
        schema_fn = getattr(tp, "model_json_schema", None)  # pydantic models
        if callable(schema_fn):
            schema = dict(schema_fn())
            if "$defs" not in schema:
                return schema
    raise ToolDefinitionError(
        f"{where}: the annotation {tp!r} has no JSON-schema equivalent nbagent knows. Use str, "
        "int, float, bool, list[...], dict[str, ...], Literal[...], an Enum, or Optional[...]."
    )


def _literal_type(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    raise ToolDefinitionError(f"{where}: Literal value {value!r} is not a JSON scalar.")


_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?)\s*:?\s*$"
)


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description (text before any section) and per-parameter descriptions.

    Understands Google style (``Args:`` / ``name (type): text``), Sphinx style
    (``:param name: text``) and NumPy style (``Parameters`` / ``----------``).
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        sphinx = re.match(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$", stripped)
        if sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2).strip()
            i += 1
            continue
        if stripped.startswith(":"):  # :returns:, :raises:, :type x: ...
            section, current = "other", None
            i += 1
            continue
        head = _SECTION.match(line)
        if head:
            is_params = head.group(1).startswith(("Param", "Arg"))
            section = "params" if is_params else "other"
            current = None
            if i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
                i += 1  # NumPy underline
                section = "numpy" if is_params else "other"
            i += 1
            continue
        if section is None:
            description.append(line)
        elif section == "params" and stripped:
            google = re.match(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            indent = len(line) - len(line.lstrip())
            if google and (current is None or indent <= _indent_of(lines, current)):
                current = google.group(1).lstrip("*")
                params[current] = google.group(3).strip()
            elif current is not None:
                params[current] = (params[current] + " " + stripped).strip()
        elif section == "numpy" and stripped:
            numpy = re.match(r"^(\*{0,2}\w+)\s*(:.*)?$", stripped)
            if numpy and len(line) - len(line.lstrip()) == 0:
                current = numpy.group(1).lstrip("*")
                params[current] = ""
            elif current is not None:
                params[current] = (params[current] + " " + stripped).strip()
        elif section == "sphinx" and stripped and current is not None:
            params[current] = (params[current] + " " + stripped).strip()
        i += 1
    text = "\n".join(description).strip()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(paragraphs), params


def _indent_of(lines: list[str], name: str) -> int:
    for line in lines:
        if re.match(rf"^\s*\*{{0,2}}{re.escape(name)}\s*(\(|:)", line):
            return len(line) - len(line.lstrip())
    return 0


def _parameter_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Type hints of the parameters only (the return annotation may well be unresolvable)."""
    target = inspect.unwrap(fn)
    target = getattr(target, "__func__", target)
    annotations = dict(getattr(target, "__annotations__", None) or {})
    annotations.pop("return", None)
    if not annotations:
        return {}
    localns: dict[str, Any] = {}
    with contextlib.suppress(TypeError, ValueError):
        localns.update(inspect.getclosurevars(target).nonlocals)

    def shim() -> None: ...

    shim.__annotations__ = annotations
    return typing.get_type_hints(
        shim, globalns=getattr(target, "__globals__", {}), localns=localns, include_extras=True
    )


def function_schema(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> dict[str, Any]:
    """The OpenAI function-tool definition of ``fn``: ``{"name", "description", "parameters"}``.

    Parameters come from the signature and type hints (``self``, ``*args`` and
    ``**kwargs`` are skipped); ``required`` lists those without defaults.
    Descriptions come from the docstring (Google, Sphinx or NumPy style).
    """
    tool_name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
        raise ToolDefinitionError(
            f"tool name {tool_name!r} is not valid for OpenAI: use 1-64 letters, digits, "
            "'_' or '-' (pass @nbagent.tool(name='...'))."
        )
    try:
        hints = _parameter_hints(fn)
    except Exception as e:  # noqa: BLE001 - unresolvable forward references, etc.
        raise ToolDefinitionError(
            f"tool {tool_name!r}: cannot resolve its type hints ({type(e).__name__}: {e})."
        ) from e
    doc_text, doc_params = parse_docstring(inspect.getdoc(fn))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for i, (pname, param) in enumerate(inspect.signature(fn).parameters.items()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if i == 0 and pname in ("self", "cls"):
            continue
        prop = _type_schema(hints.get(pname, param.annotation), f"tool {tool_name!r} {pname!r}")
        if pname in doc_params and doc_params[pname]:
            prop.setdefault("description", doc_params[pname])
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    parameters = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return {
        "name": tool_name,
        "description": description if description is not None else doc_text,
        "parameters": parameters,
    }


# --------------------------------------------------------------------------- tracing


def _json_text(value: Any) -> str:
    """JSON text for the trace: the value itself if JSON-able, else a truncated repr."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps({"repr": _short(repr(value)), "type": type(value).__name__})
    if len(text) > MAX_STORED_CHARS:
        return json.dumps({"truncated": True, "chars": len(text), "preview": text[:_PREVIEW_CHARS]})
    return text


def _short(text: str) -> str:
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "..."


class _ToolCall:
    """Bookkeeping of one traced call."""

    __slots__ = ("run", "name", "arguments", "t0", "started")

    def __init__(self, name: str, sig: inspect.Signature, args: Any, kwargs: Any) -> None:
        from ._engine import current_run

        self.run = current_run(required=False)
        self.name = name
        self.arguments: str | None = None
        if self.run is not None:
            try:
                bound = sig.bind(*args, **kwargs)
                arguments: Any = dict(bound.arguments)
                first = next(iter(sig.parameters), None)
                if first in ("self", "cls"):  # a method: the instance is not an argument
                    arguments.pop(first, None)
            except TypeError:
                arguments = {"args": list(args), "kwargs": kwargs}
            self.arguments = _json_text(arguments)
        self.started = time.time()
        self.t0 = time.perf_counter()

    def done(self, result: Any = None, error: BaseException | None = None) -> None:
        run = self.run
        if run is None:
            return
        latency = time.perf_counter() - self.t0
        status = "ok" if error is None else "error"
        error_text = f"{type(error).__name__}: {error}" if error is not None else None
        try:
            run.record_event(
                kind="tool",
                name=self.name,
                status=status,
                error=error_text,
                latency_s=latency,
                request=self.arguments,
                response=_json_text(result) if error is None else None,
            )
            from ._engine import current_step

            ctx = current_step()
            run._emit(
                {
                    "type": "tool_call",
                    "step": ctx.step_id if ctx is not None else None,
                    "name": self.name,
                    "status": status,
                    "latency_s": latency,
                    "error": error_text,
                }
            )
        except Exception:  # tracing must never change what the tool returns or raises
            import logging

            logging.getLogger("nbagent").exception("nbagent: tracing tool %r failed", self.name)


def _decorate(
    fn: Callable[..., Any], name: str | None, description: str | None
) -> Callable[..., Any]:
    definition = function_schema(fn, name=name, description=description)
    tool_name = definition["name"]
    sig = inspect.signature(fn)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = _ToolCall(tool_name, sig, args, kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                call.done(error=e)
                raise
            call.done(result)
            return result

        wrapper: Callable[..., Any] = async_wrapper
    else:

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = _ToolCall(tool_name, sig, args, kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                call.done(error=e)
                raise
            call.done(result)
            return result

        wrapper = sync_wrapper

    def call_json(arguments: str | Mapping[str, Any]) -> Any:
        """Call the tool with a model's tool-call arguments (JSON text or a dict), validated.

        Raises :class:`nbagent.ToolSchemaError` when they do not match :attr:`schema`.
        """
        from ._retry import validate_tool_arguments

        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        values = validate_tool_arguments(text, definition["parameters"], tool_name=tool_name)
        return wrapper(**values)

    w: Any = wrapper
    w.tool_name = tool_name
    w.description = definition["description"]
    w.schema = definition["parameters"]
    w.openai_tool = {"type": "function", "function": definition}
    w.call_json = call_json
    w.__nbagent_tool__ = tool_name
    return wrapper


@overload
def tool(fn: F, /) -> F: ...


@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[F], F]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Any:
    """Make a function a traced tool: ``@nbagent.tool`` or ``@nbagent.tool(name="web_search")``.

    The decorated function behaves as before and gains:

    * ``.schema`` -- the JSON schema of its parameters (from type hints and docstring);
    * ``.openai_tool`` -- ``{"type": "function", "function": {"name", "description",
      "parameters"}}`` for ``tools=[...]`` of the OpenAI API;
    * ``.call_json(arguments)`` -- call it with a model's tool-call arguments, validated
      against the schema (:class:`nbagent.ToolSchemaError` when they do not match);
    * ``.tool_name`` and ``.description``.

    Inside a run every call is a ``kind="tool"`` trace row and a ``tool_call`` event.
    """
    if fn is not None:
        if not callable(fn):
            raise ToolDefinitionError(
                f"@nbagent.tool decorates a function, got {fn!r}; for a custom name use "
                "@nbagent.tool(name='...')."
            )
        return _decorate(fn, name, description)

    def decorate(f: F) -> F:
        return _decorate(f, name, description)  # type: ignore[return-value]

    return decorate
