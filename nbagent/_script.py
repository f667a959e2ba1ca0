"""Notebook cells as durable steps of a plain Python module.

A ``%%step`` cell works on the notebook's globals: it reads ``goal``, binds
``plan``, appends to ``findings``. ``nbagent export`` keeps that shape: each
step cell becomes a function whose body *is* the cell, with a ``global``
statement naming what the cell binds, wrapped by :func:`cell_step`::

    @nbagent.cell_step(run, "plan", retries=2)
    def plan_step():
        global plan
        plan = ask_llm(goal).split("\\n")

:func:`cell_step` applies the rules of the ``%%step`` magic to the module's
globals instead of the kernel's namespace:

* identity and fingerprint: the step NAME (plus its occurrence in the run),
  the normalized source of the body (the docstring and the ``global``
  statement do not count, so an exported cell hashes like the cell) and the
  hashes of the globals the body reads, following the module's own functions;
* replay: the stored variables are put back into the module's globals (and
  names the cell deleted are removed), and the recorded output is printed
  again after a one-line "replayed" marker;
* commit, only on success: every global the body bound or rebound, and
  every global it read whose value it changed in place.

Why a decorator over a function and not ``exec`` of a code string: the
exported module stays ordinary Python that a reviewer can read, lint and
step through in a debugger, with tracebacks pointing at its own lines.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

from . import _fingerprint as fp
from ._engine import (
    Execution,
    Run,
    _Tee,
    check_name,
    function_source_hash,
    names_to_store,
    restore_into,
    step_attempts,
    user_globals,
)


def cell_step(
    run: Run,
    name: str,
    *,
    retries: int = 0,
    timeout: float | None = None,
    rerun: bool = False,
    save: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    strict: bool = False,
) -> Callable[[Callable[[], Any]], Callable[[], None]]:
    """Make a function whose body is a notebook cell a durable step over its module's globals.

    The options are those of ``%%step NAME [--retries N] [--timeout S] [--rerun]
    [--save a,b] [--exclude c,d] [--strict]``. The decorated function takes no
    arguments and returns nothing: its results are the globals it binds or
    changes. An ``async def`` body (a cell with top-level ``await``) runs in
    its own event loop.

    :param run: the run the step belongs to.
    :param name: the step's NAME, as in ``%%step NAME``.
    """
    step_name = check_name("step", name)
    saved_only = None if save is None else frozenset(save)
    excluded = frozenset(exclude)

    def decorate(fn: Callable[[], Any]) -> Callable[[], None]:
        body = cell_body(fn)
        source_hash = (
            fp.source_hash(ast.unparse(body)) if body is not None else function_source_hash(fn)
        )

        def legacy_hash() -> str:  # the hash older nbagents recorded
            if body is not None:
                return fp.legacy_source_hash(ast.unparse(body))
            return function_source_hash(fn, legacy=True)

        reads = fp.names_read(body) if body is not None else set(fp._code_globals(fn.__code__))
        namespace: dict[str, Any] = fn.__globals__  # type: ignore[attr-defined]

        @functools.wraps(fn)
        def step() -> None:
            occurrence = run.next_occurrence(step_name)
            candidates = sorted(
                n for n in fp.reachable_names(reads, namespace) if fp.is_user_name(n)
            )
            inputs = {n: fp.hash_value(namespace[n]) for n in candidates}
            ex = run.begin(
                step_name, occurrence, source_hash, inputs, rerun=rerun, legacy_hash=legacy_hash
            )
            if ex.replay:
                _replay(ex, namespace)
                return
            before = user_globals(namespace)
            out = _Tee(sys.stdout)
            try:
                with contextlib.redirect_stdout(out):  # type: ignore[type-var]
                    for attempt in step_attempts(ex, retries=retries, timeout=timeout):
                        with attempt:
                            result = fn()
                            if inspect.iscoroutine(result):
                                asyncio.run(result)
            except BaseException as e:
                ex.abort(e)
                raise
            names, deleted = names_to_store(
                namespace, before, candidates, inputs, save=saved_only, exclude=excluded
            )
            outputs = (
                [{"type": "stream", "name": "stdout", "text": out.captured()}]
                if out.captured()
                else []
            )
            ex.commit(
                {n: namespace[n] for n in names},
                outputs=outputs,
                result=None,
                deleted=deleted,
                strict=strict or None,
            )

        step.__nbagent_step__ = step_name  # type: ignore[attr-defined]
        # the run of another engine may execute the step inside its own durable
        # step (a DbosRun: a DBOS step of the run's workflow)
        wrap = getattr(run, "wrap_cell_step", None)
        return wrap(step_name, step) if wrap is not None else step

    return decorate


def cell_body(fn: Callable[..., Any]) -> ast.Module | None:
    """The cell inside a step function: its body without the docstring and ``global`` lines.

    None when the source is not available (the fingerprint then falls back to
    the bytecode).
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    statements = list(node.body)
    if (
        statements
        and isinstance(statements[0], ast.Expr)
        and isinstance(statements[0].value, ast.Constant)
        and isinstance(statements[0].value.value, str)
    ):
        statements = statements[1:]
    statements = [s for s in statements if not isinstance(s, ast.Global)]
    return ast.Module(body=statements, type_ignores=[])


def _replay(ex: Execution, namespace: dict[str, Any]) -> None:
    restore_into(ex, namespace)
    ex.print_replay()


__all__ = ["cell_step"]
