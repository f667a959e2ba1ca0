"""The IPython front-end: ``%load_ext nbagent``, ``%nbagent ...`` and ``%%step NAME``.

How a ``%%step`` cell runs (see docs in the README for the why):

1. An input transformer replaces the ``%%step ...`` header line with
   ``pass  # %%step ...``. The body then runs as an ordinary top-level cell:
   top-level ``await``, the last expression's ``Out[]``, tracebacks with the
   cell's own line numbers and KeyboardInterrupt all behave as usual. The
   transformer is pure (IPython also calls it to check completeness).
2. ``pre_run_cell`` recognises the header and arms a one-shot override of
   ``shell.transform_ast`` for this cell. When IPython has parsed the cell, the
   override fingerprints the parsed body (normalized source + hashes of the
   values it reads; the cell is not parsed twice) and asks the engine: replay
   or execute. A replay restores the stored variables, shows the recorded
   output and swaps the body for the recorded result (an exception in
   ``pre_run_cell`` cannot skip a cell). An execution tees stdout/stderr and
   display output while the body runs live.
3. The same override appends the commit as the cell's last statement, so a
   commit error (``--strict``, a full disk) fails the cell: every variable the
   cell bound or rebound, and every earlier variable whose value it changed in
   place, is stored. ``post_run_cell`` releases a step whose body failed,
   storing nothing.

Ordinary cells pay one ``str.startswith`` in ``pre_run_cell``: nothing stays
registered with IPython's AST machinery.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import html
import os
import shlex
import sys
import time
import types
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import _engine
from . import _fingerprint as fp
from ._dashboard import summary_text, widgets_available
from ._engine import (
    Execution,
    NamespaceSnapshot,
    NamespaceWatch,
    Run,
    current_run,
    format_usd,
    names_to_store,
    restore_into,
    step_attempts,
)
from ._errors import StepError

HEADER = "%%step"

_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


# -- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise StepError(
            f"{self.prog}: {message}\n{self.format_usage().strip()}  (see `{self.prog} --help`)"
        )

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def _csv(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def step_parser() -> _Parser:
    p = _Parser(
        prog="%%step",
        description="Make this cell a durable step of the current run: it executes once, is "
        "checkpointed on disk, and replays from disk (variables and output) when it is run "
        "again with the same source and inputs, e.g. after a kernel restart.",
        epilog="Example:  %%step plan --retries 2 --timeout 60",
    )
    p.add_argument("name", help="the step's name, unique within the run")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="re-run a failed body up to N times with backoff",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the body after SECONDS (TimeoutError)",
    )
    p.add_argument("--rerun", action="store_true", help="execute even if a matching record exists")
    p.add_argument(
        "--save", type=_csv, default=None, metavar="a,b", help="store only these variables"
    )
    p.add_argument(
        "--exclude", type=_csv, default=[], metavar="c,d", help="never store these variables"
    )
    p.add_argument("--strict", action="store_true", help="fail if a variable cannot be stored")
    return p


_step_parser: _Parser | None = None


def parse_step_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``%%step`` options; a bare NAME (the common case) skips argparse."""
    global _step_parser
    if len(argv) == 1 and not argv[0].startswith("-"):  # (SimpleNamespace: made in C)
        return types.SimpleNamespace(  # type: ignore[return-value]
            name=argv[0], retries=0, timeout=None, rerun=False, save=None, exclude=[], strict=False
        )
    if _step_parser is None:
        _step_parser = step_parser()
    return _step_parser.parse_args(argv)


def nbagent_parser() -> _Parser:
    p = _Parser(prog="%nbagent", description="Open, inspect and control nbagent runs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    s = sub.add_parser("start", help="open or resume a run")
    s.add_argument("run", help="run name, e.g. research-1")
    s.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="store folder (default: NBAGENT_DIR or .nbagent/)",
    )
    s.add_argument(
        "--cap-usd", type=float, default=None, metavar="X", help="hard ceiling on LLM spend"
    )
    s.add_argument(
        "--max-steps", type=int, default=None, metavar="N", help="ceiling on step executions"
    )
    s.add_argument(
        "--max-llm-calls", type=int, default=None, metavar="N", help="ceiling on LLM calls"
    )
    s.add_argument("--strict", action="store_true", help="unsaveable step variables are errors")
    s.add_argument("--no-dashboard", action="store_true", help="do not show the live dashboard")
    sub.add_parser("status", help="spend, caps and steps of the current run")
    sub.add_parser("runs", help="the runs in the current store")
    r = sub.add_parser("reset", help="forget completed steps so they execute again (spend is kept)")
    r.add_argument("steps", nargs="*", metavar="STEP")
    r.add_argument("--all", action="store_true", help="forget every step of the run")
    c = sub.add_parser("cap", help="change a cap on purpose (recorded in the trace)")
    c.add_argument("--usd", type=float, default=None)
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--llm-calls", type=int, default=None)
    st = sub.add_parser("stop", help="stop the run: the next LLM call or step raises RunStopped")
    st.add_argument("reason", nargs="*")
    sub.add_parser("resume", help="let a stopped run go on")
    t = sub.add_parser("trace", help="the run's trace table")
    t.add_argument("--last", type=int, default=20, metavar="N", help="show the last N rows")
    sub.add_parser("dashboard", help="show the live dashboard")
    pl = sub.add_parser("plot", help="plot the run: spend, latency or tokens")
    pl.add_argument("what", choices=["spend", "latency", "tokens"])
    return p


def parse_header(raw_cell: str) -> tuple[str, str] | None:
    """(header arguments, body) of a ``%%step`` cell, or None for other cells."""
    cell = raw_cell.lstrip("\n\r\t ")
    if not cell.startswith(HEADER):
        return None
    first, newline, body = cell.partition("\n")
    lines = first.splitlines(keepends=True)  # IPython also breaks lines at \r, \x1e, \u2028...
    if len(lines) > 1:
        first, body = (
            lines[0].rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
            "".join(lines[1:]) + newline + body,
        )
    rest = first[len(HEADER) :]
    if rest and not rest[0].isspace():
        return None  # e.g. %%steps: not ours
    return rest.strip(), body


def transform_header(lines: list[str]) -> list[str]:
    """Input transformer: ``%%step ...`` header -> ``pass  # %%step ...`` (line numbers kept)."""
    if (
        lines
        and lines[0].startswith(HEADER)
        and (len(lines[0]) == len(HEADER) or lines[0][len(HEADER)].isspace())
    ):
        # a comment keeps the header visible in tracebacks; characters Python cannot compile
        # (a NUL byte) are masked so the cell still reaches nbagent's own name check
        header = "".join(c if c.isprintable() else "?" for c in lines[0].rstrip("\r\n"))
        return ["pass  # " + header + "\n", *lines[1:]]
    return lines


# -- the extension ---------------------------------------------------------------------


_POSITION = ("lineno", "col_offset", "end_lineno", "end_col_offset")


def _position(node: ast.AST) -> dict[str, Any]:
    return {k: getattr(node, k, None) for k in _POSITION}


_HEADER_LINE = {"lineno": 1, "col_offset": 0, "end_lineno": 1, "end_col_offset": 0}


def _nbagent_attr(attr: str, at: dict[str, Any]) -> ast.Attribute:
    """``__nbagent__.<attr>``, located ``at`` (nodes nbagent adds carry their positions:
    IPython's ``fix_missing_locations`` pass over the whole cell is skipped)."""
    return ast.Attribute(ast.Name("__nbagent__", ast.Load(), **at), attr, ast.Load(), **at)


def _show_last(body: list[ast.stmt], show: bool) -> list[ast.stmt]:
    """Body whose last expression is displayed through ``__nbagent__._show`` (as ``Out[n]``)."""
    if not show or not body or not isinstance(body[-1], ast.Expr):
        return body
    last = body[-1]
    at = _position(last.value)
    call = ast.Call(_nbagent_attr("_show", at), [last.value], [], **at)
    return [*body[:-1], ast.Expr(call, **_position(last))]  # keep end_lineno


def _raise(exc: ast.expr) -> ast.Raise:
    """``raise <exc>`` on the cell's first line (the ``%%step`` header)."""
    return ast.Raise(exc=exc, cause=None, **_HEADER_LINE)


@functools.lru_cache(maxsize=8)
def _call(attr: str) -> ast.Expr:
    """``__nbagent__.<attr>()`` on the cell's first line (one node, shared by the cells:
    compiling reads a tree and changes nothing, and no transformer runs after nbagent's)."""
    call = ast.Call(_nbagent_attr(attr, _HEADER_LINE), [], [], **_HEADER_LINE)
    return ast.Expr(call, **_HEADER_LINE)


def _one_node(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements as one ``if True:`` block on the header line: IPython compiles and
    runs each top-level statement of a cell on its own (a compile, an ``exec`` and their
    bookkeeping each); the step's body and its commit are one. ``from __future__`` must
    stay a top-level statement: such a body is left as it is."""
    if any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in body):
        return body
    last = max((getattr(n, "end_lineno", None) or 1 for n in body), default=1)
    test = ast.Constant(True, lineno=1, col_offset=0, end_lineno=1, end_col_offset=0)
    return [ast.If(test, body, [], lineno=1, col_offset=0, end_lineno=last, end_col_offset=0)]


class _Pending:
    """What the extension knows about the step cell that is running now."""

    def __init__(self, ex: Execution | None, args: argparse.Namespace | None) -> None:
        self.ex = ex
        self.args = args
        self.error: BaseException | None = None
        self.last_value: Any = None
        self.before: dict[str, Any] | NamespaceSnapshot = {}
        self.candidates: list[str] = []
        self.outputs: list[dict[str, Any]] = []
        self.restore: list[Any] = []
        self.line: Any = None  # the step's status line, finished after the cell


class NbagentExtension:
    """State of nbagent inside one IPython shell."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.run: Run | None = None
        self.pending: _Pending | None = None
        self.make_body: Any = None  # see _replace_body
        self.watch: NamespaceWatch | None = None
        self.cells: dict[tuple[str, str], str] = {}
        shell.input_transformers_cleanup.append(transform_header)
        shell.events.register("pre_run_cell", self.pre_run_cell)
        shell.events.register("post_run_cell", self.post_run_cell)
        shell.push({"__nbagent__": self}, interactive=False)

    def unload(self) -> None:
        with contextlib.suppress(ValueError):
            self.shell.input_transformers_cleanup.remove(transform_header)
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("pre_run_cell", self.pre_run_cell)
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("post_run_cell", self.post_run_cell)
        self._remove_transformer()

    # -- runs ------------------------------------------------------------------------

    def notebook_name(self) -> str:
        session = self.shell.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME") or ""
        stem = Path(str(session)).stem if session else ""
        return stem or "default"

    def current(self) -> Run:
        """The run opened with ``%nbagent start``, else a default run named after the notebook."""
        if self.run is None:
            run = current_run(required=False)
            self.run = (
                run if run is not None else Run(self.notebook_name(), notebook=self.notebook_name())
            )
        return self.run

    # -- display helpers -------------------------------------------------------------

    def show_text(self, text: str, html_text: str | None = None) -> None:
        from IPython.display import display

        bundle = {"text/plain": text}
        if html_text is not None:
            bundle["text/html"] = html_text
        display(bundle, raw=True)

    # -- the cell hooks --------------------------------------------------------------

    def pre_run_cell(self, info: Any) -> None:
        raw = getattr(info, "raw_cell", None) or ""
        if "%%step" not in raw[:64]:
            return
        parsed = parse_header(raw)
        if parsed is None:
            return
        cell_id = getattr(info, "cell_id", None)
        # the step begins when IPython has parsed the cell (its tree is fingerprinted, not
        # parsed again); a body IPython cannot parse begins nothing, IPython reports it
        self._replace_body(lambda body: self._step_body(parsed, cell_id, body))

    def _step_body(
        self, parsed: tuple[str, str], cell_id: str | None, body: list[ast.stmt]
    ) -> list[ast.stmt]:
        """The statements a ``%%step`` cell runs instead of its body (begins the step)."""
        try:
            return self._begin_step(parsed, cell_id, body)
        except _HelpShown:  # argparse printed the help
            return []
        except BaseException as e:  # surfaces as the cell's error, with a normal traceback
            self.pending = _Pending(None, None)
            self.pending.error = e
            return [_raise(_call("_pending_error").value)]

    def _begin_step(
        self, parsed: tuple[str, str], cell_id: str | None, body: list[ast.stmt]
    ) -> list[ast.stmt]:
        header, text = parsed
        argv = header.split()
        if "'" in header or '"' in header or "\\" in header:  # quoting: shlex
            try:
                argv = shlex.split(header)
            except ValueError as e:
                raise StepError(f"%%step: cannot read the options {header!r} ({e})") from None
        args = parse_step_args(argv)
        tree = ast.Module(body=body, type_ignores=[])
        run = self.current()
        name = args.name
        key = (run.name, name)
        if cell_id and self.cells.get(key, cell_id) != cell_id:
            raise StepError(
                f"step name {name!r} is already used by another cell of run {run.name!r}: "
                f"step names must be unique within a run. Rename this one, e.g. `%%step {name}-2`."
            )
        ns = self.shell.user_ns
        source_hash, reads = fp.fingerprint(tree)
        candidates = sorted(n for n in fp.reachable_names(reads, ns) if fp.is_user_name(n))
        inputs = {n: fp.hash_value(ns[n]) for n in candidates}
        ex = run.begin(
            name,
            1,
            source_hash,
            inputs,
            rerun=args.rerun,
            cell_id=cell_id,
            legacy_hash=lambda: fp.legacy_tree_hash(tree),
        )
        if cell_id:
            self.cells[key] = cell_id
        pending = self.pending = _Pending(ex, args)
        if ex.replay:
            self._replay(ex)
            return [_call("_replay_result")]
        if ex.reason:
            print(f"▶ step {name!r} runs again: {ex.reason}")
        pending.candidates = candidates
        if widgets_available():  # a live line; it prints the summary after the cell
            from ._dashboard import step_status_line

            pending.line = step_status_line(run, ex.step_id, hook=False, lazy=True)
        # The commit runs inside the cell, after the body, so that a commit error
        # (--strict, a full disk) fails the cell; the last expression is shown
        # explicitly (a trailing `;` still hides it, as in IPython).
        show_last = not text.rstrip().endswith(";")
        if args.retries or args.timeout:
            body = _one_node([*self._wrap_attempts(body, show_last), _call("_commit_in_cell")])
        else:
            ex.attempts = 1
            ex.context.new_attempt(1)
            _engine_set_notebook_step(ex)
            body = _one_node([*_show_last(body, show_last), _call("_commit_in_cell")])
        if self.watch is None or self.watch.namespace is not ns:
            self.watch = NamespaceWatch(ns)
        pending.before = self.watch.snapshot()  # last: what the body binds is what changes
        self._capture(pending)
        return body

    # -- replay --------------------------------------------------------------------

    def _replay(self, ex: Execution) -> None:
        values = restore_into(ex, self.shell.user_ns)
        marker = ex.replay_marker()
        self.show_text(
            marker, f'<div style="color:#777;font-size:smaller">{html.escape(marker)}</div>'
        )
        for item in (ex.record or {}).get("outputs", []):
            if item.get("type") == "stream":
                stream = sys.stderr if item.get("name") == "stderr" else sys.stdout
                stream.write(item["text"])
                stream.flush()
            elif item.get("type") == "display":
                self.shell.display_pub.publish(
                    data=item["data"], metadata=item.get("metadata") or {}
                )
        self._replay_values = values
        ex.replayed()

    def _replay_result(self) -> Any:
        """The recorded value of the cell's last expression (shown as ``Out[n]``)."""
        pending = self.pending
        values = getattr(self, "_replay_values", {})
        if "(result)" in values:
            return values["(result)"]
        bundle = pending and pending.ex and (pending.ex.record or {}).get("result")
        if bundle:
            self.shell.display_pub.publish(data=bundle, metadata={})
        return None

    def _pending_error(self) -> BaseException:
        """The error found before the body ran; the cell raises it from its header line."""
        error = self.pending.error if self.pending else None
        assert error is not None
        return error.with_traceback(None)

    # -- retries and timeouts --------------------------------------------------------

    def _wrap_attempts(self, body: list[ast.stmt], show_last: bool = True) -> list[ast.stmt]:
        body = _show_last(body, show_last)
        loop = ast.parse(
            "for __nbagent_attempt in __nbagent__._attempts():\n with __nbagent_attempt:\n  pass"
        ).body[0]
        assert isinstance(loop, ast.For) and isinstance(loop.body[0], ast.With)
        loop.body[0].body = body or [ast.Pass()]
        ast.increment_lineno(loop, 0)
        return [loop]

    def _attempts(self) -> Any:
        pending = self.pending
        assert pending is not None and pending.ex is not None and pending.args is not None
        for attempt in step_attempts(
            pending.ex, retries=pending.args.retries, timeout=pending.args.timeout
        ):
            _engine_set_notebook_step(pending.ex)
            yield attempt

    def _show(self, value: Any) -> None:
        if self.pending is not None:
            self.pending.last_value = value
        self.shell.displayhook(value)

    # -- output capture --------------------------------------------------------------

    def _capture(self, pending: _Pending) -> None:
        shell = self.shell

        def tee(stream: Any, name: str) -> None:
            had_own = "write" in vars(stream) if hasattr(stream, "__dict__") else False
            original = stream.write

            def write(data: Any, *args: Any, **kwargs: Any) -> Any:
                result = original(data, *args, **kwargs)
                if data and not (
                    shell.display_pub.is_publishing
                    or shell.displayhook.is_active
                    or shell.showing_traceback
                ):
                    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                    outs = pending.outputs
                    if outs and outs[-1].get("type") == "stream" and outs[-1].get("name") == name:
                        outs[-1]["text"] += text
                    else:
                        outs.append({"type": "stream", "name": name, "text": text})
                return result

            try:
                stream.write = write
            except (AttributeError, TypeError):
                return
            pending.restore.append((stream, "write", original if had_own else None))

        tee(sys.stdout, "stdout")
        tee(sys.stderr, "stderr")
        pub = shell.display_pub
        original_publish = pub.publish

        def publish(data: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("update") and not kwargs.get("transient"):
                kept = {k: v for k, v in (data or {}).items() if k != _WIDGET_MIME}
                if kept:
                    pending.outputs.append(
                        {"type": "display", "data": kept, "metadata": metadata or {}}
                    )
            return original_publish(data, metadata, *args, **kwargs)

        pub.publish = publish
        pending.restore.append((pub, "publish", None))

    def _uncapture(self, pending: _Pending) -> None:
        for obj, attr, original in reversed(pending.restore):
            if original is None:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
            else:
                setattr(obj, attr, original)
        pending.restore.clear()

    # -- commit ----------------------------------------------------------------------

    def post_run_cell(self, result: Any) -> None:
        pending, self.pending = self.pending, None
        self._remove_transformer()
        self._replay_values = {}
        if pending is None or pending.ex is None:
            return
        self._uncapture(pending)
        _engine_set_notebook_step(None)
        ex = pending.ex
        error = None
        try:
            if not (ex.replay or ex.finished):
                # the body failed or was interrupted (else _commit_in_cell finished the step)
                error = result and (result.error_before_exec or result.error_in_exec)
                error = error or RuntimeError("the cell did not finish")
                ex.abort(error)
        finally:
            if pending.line is not None:
                pending.line.finish()  # prints the step's one-line summary
            elif not ex.replay:  # text only: the same summary, without a live line
                sys.stdout.write(_summary(ex, error) + "\n")  # one write (print makes two)

    def _commit_in_cell(self) -> None:
        """Commit the step; the last statement of a step cell, so its errors fail the cell."""
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame
        pending = self.pending
        assert pending is not None and pending.ex is not None and pending.args is not None
        self._uncapture(pending)  # what commit prints is not part of the step's output
        ex, args, ns = pending.ex, pending.args, self.shell.user_ns
        names, deleted = names_to_store(
            ns, pending.before, pending.candidates, ex.inputs, save=args.save, exclude=args.exclude
        )
        values = {n: ns[n] for n in names}
        bundle = None
        if pending.last_value is not None:
            data, _ = self.shell.display_formatter.format(pending.last_value)
            bundle = {k: v for k, v in data.items() if k != _WIDGET_MIME}
            values["(result)"] = pending.last_value
        unsaved = ex.commit(
            values,
            outputs=pending.outputs,
            result=bundle,
            deleted=deleted,
            strict=args.strict or None,
            warn=False,
        )
        unsaved.pop("(result)", None)
        if unsaved:
            listed = ", ".join(f"{n} ({v['reason']})" for n, v in sorted(unsaved.items()))
            print(
                f"⚠ nbagent: step {ex.name!r} completed, but these values cannot be stored and will be "
                f"missing after a restart: {listed}. Make them in a setup cell outside the step, or use "
                "--exclude; --strict makes this an error.",
                file=sys.stderr,
            )

    def _replace_body(self, make_body: Any) -> None:
        """Run ``make_body(statements)`` on the next cell's parsed body; run what it returns.

        A one-shot override of ``shell.transform_ast`` (an instance attribute,
        removed on first use and in post_run_cell): unlike a registered AST
        transformer it spares the cell IPython's ``fix_missing_locations`` walk,
        and exceptions stay nbagent's to report (IPython unregisters a raising
        transformer with a warning).
        """
        self.make_body = make_body
        self.shell.transform_ast = self._transform_ast

    def _transform_ast(self, node: Any) -> Any:
        self._remove_transformer()
        node = self.shell.transform_ast(node)  # other extensions' AST transformers
        make_body, self.make_body = self.make_body, None
        if make_body is not None and isinstance(node, ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Pass) and body[0].lineno == 1:
                body = body[1:]  # the header's `pass`: one statement less to compile and run
            node.body = make_body(body)
        return node

    def _remove_transformer(self) -> None:
        if "transform_ast" in vars(self.shell):
            del self.shell.transform_ast


def _summary(ex: Execution, error: BaseException | None) -> str:
    """The one-line summary of a step that executed (as its live line would print it)."""
    rec = ex.record if ex.record is not None and error is None else None
    if rec is not None:
        state, elapsed = "done", rec.get("duration_s", 0.0)
        calls, cost = rec.get("llm_calls", 0), rec.get("cost_usd", 0.0)
    else:
        state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        elapsed = time.perf_counter() - ex._t0
        calls, cost = ex.context.llm_calls, ex.context.cost_usd
    shown = f"{type(error).__name__}: {error}" if error is not None else None
    return summary_text(ex.name, state, ex.attempts or 1, elapsed, calls, cost, shown)


def _engine_set_notebook_step(ex: Execution | None) -> None:
    _engine._notebook_step = ex.context if ex is not None else None


@magics_class
class NbagentMagics(Magics):
    """``%nbagent`` and the ``%%step`` fallback (cells normally never reach it)."""

    def __init__(self, shell: Any, ext: NbagentExtension) -> None:
        super().__init__(shell)
        self.ext = ext

    @line_magic
    def nbagent(self, line: str) -> Any:
        """Open, inspect and control nbagent runs. See `%nbagent --help`."""
        try:
            args = nbagent_parser().parse_args(shlex.split(line))
        except _HelpShown:  # argparse printed the help
            return None
        except ValueError as e:
            raise StepError(f"%nbagent: cannot read {line!r} ({e})") from None
        command = args.command or "status"
        return getattr(self, f"_cmd_{command}")(args)

    @cell_magic
    def step(self, line: str, cell: str) -> Any:
        """Make this cell a durable step. See `%%step --help`."""
        assert self.shell is not None
        return self.shell.run_cell(f"{HEADER} {line}\n{cell}")

    # -- subcommands -----------------------------------------------------------------

    def _cmd_start(self, args: argparse.Namespace) -> Any:
        run = Run(
            args.run,
            store=args.store,
            max_cost_usd=args.cap_usd,
            max_steps=args.max_steps,
            max_llm_calls=args.max_llm_calls,
            strict=args.strict,
            notebook=self.ext.notebook_name(),
        )
        self.ext.run = run
        self.ext.cells.clear()
        done = len(run.steps())
        verb = "resumed" if done else "opened"
        cap = format_usd(run.max_cost_usd) if run.max_cost_usd is not None else "no cap"
        print(
            f"nbagent: {verb} run {run.name!r} · {done} completed step{'s' if done != 1 else ''} · "
            f"spend {format_usd(run.spend_usd)} / {cap}"
        )
        if not args.no_dashboard:
            self._show_dashboard(run)
        return None

    def _show_dashboard(self, run: Run) -> None:
        try:
            from ._dashboard import show_dashboard
        except ImportError:
            return
        show_dashboard(run)

    def _cmd_dashboard(self, args: argparse.Namespace) -> Any:
        from ._dashboard import show_dashboard

        show_dashboard(self.ext.current())

    def _cmd_status(self, args: argparse.Namespace) -> Any:
        return self.ext.current().status()

    def _cmd_runs(self, args: argparse.Namespace) -> Any:
        store = self.ext.current().store
        names = store.runs()
        if not names:
            print(f"no runs in {store.path}")
        for name in names:
            run = Run(name, store=store, activate=False)
            mark = "*" if name == self.ext.current().name else " "
            print(f"{mark} {name:<24} {len(run.steps()):>3} steps  {format_usd(run.spend_usd):>9}")
        return None

    def _cmd_reset(self, args: argparse.Namespace) -> Any:
        run = self.ext.current()
        if not args.steps and not args.all:
            raise StepError(
                "%nbagent reset: name the steps to forget, or pass --all (e.g. `%nbagent reset plan`)."
            )
        dropped = run.reset(None if args.all else args.steps)
        if dropped:
            print(
                f"nbagent: dropped {len(dropped)} step record{'s' if len(dropped) != 1 else ''} of run "
                f"{run.name!r}: {', '.join(dropped)}. They execute again next time; spend "
                f"({format_usd(run.spend_usd)}) and the trace are kept."
            )
        else:
            print(f"nbagent: run {run.name!r} has no completed steps; nothing was dropped.")
        return None

    def _cmd_cap(self, args: argparse.Namespace) -> Any:
        run = self.ext.current()
        changes = {
            k: v
            for k, v in (("usd", args.usd), ("steps", args.steps), ("llm_calls", args.llm_calls))
            if v is not None
        }
        if not changes:
            raise StepError(
                "%nbagent cap: give a new cap, e.g. `%nbagent cap --usd 5` or `--steps 100`."
            )
        new = run.set_cap(**changes)
        print(
            f"nbagent: caps of run {run.name!r} are now "
            + ", ".join(f"{k}={v}" for k, v in new.items())
        )
        return None

    def _cmd_stop(self, args: argparse.Namespace) -> Any:
        run = self.ext.current()
        run.stop(" ".join(args.reason) or "stopped by the user")
        print(f"nbagent: run {run.name!r} is stopped; `%nbagent resume` lets it go on.")

    def _cmd_resume(self, args: argparse.Namespace) -> Any:
        run = self.ext.current()
        run.resume()
        print(f"nbagent: run {run.name!r} resumed.")

    def _cmd_trace(self, args: argparse.Namespace) -> Any:
        frame = self.ext.current().trace()
        return frame.tail(args.last) if args.last else frame

    def _cmd_plot(self, args: argparse.Namespace) -> Any:
        from . import _plots

        return getattr(_plots, f"plot_{args.what}")(self.ext.current())


_extensions: dict[int, NbagentExtension] = {}


def load_ipython_extension(shell: Any) -> None:
    if id(shell) in _extensions:
        return
    ext = _extensions[id(shell)] = NbagentExtension(shell)
    shell.register_magics(NbagentMagics(shell, ext))


def unload_ipython_extension(shell: Any) -> None:
    ext = _extensions.pop(id(shell), None)
    if ext is not None:
        ext.unload()
