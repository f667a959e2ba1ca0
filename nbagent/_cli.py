"""The ``nbagent`` command (also ``python -m nbagent``).

::

    nbagent export NOTEBOOK.ipynb [-o agent.py]
    nbagent run NOTEBOOK.ipynb|agent.py [--run NAME] [--store DIR] [-p KEY=VALUE ...]
    nbagent demo
    nbagent runs | show RUN | trace RUN [--format table|csv|jsonl] | gc [--older-than 30d]

``run`` executes a module (a notebook is exported in memory first) the way
``python agent.py`` does, as ``__main__``, so its steps fingerprint the same
under both and either one resumes a run the other started. The module's
``if __name__ == "__main__":`` block runs after the module body, once the
terminal progress is subscribed to the runs the body opened.

On DBOS (``--engine dbos --db URL``, or NBAGENT_ENGINE=dbos and
NBAGENT_DB_URL): the module body runs with ``Run(...)`` making a DbosRun (its
store is the database's; its steps, exported cells included, are DBOS steps)
and the ``__main__`` block runs as the run's DBOS workflow. Killed, the same
command recovers the workflow: DBOS skips the steps it recorded. ``runs``,
``show`` and ``trace`` with ``--db postgresql://...`` read that database.
``python agent.py`` itself always runs on the embedded engine: the exported
module stays plain Python, and the launcher (``nbagent run``) picks the engine.

Exit codes: 0 done, 1 a step failed, 2 bad input, 3 a cap refused, 4 the run
is stopped, 130 interrupted (Ctrl-C; the run is resumable).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import functools
import hashlib
import linecache
import os
import re
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._engine import Run, current_run, format_duration, format_usd, on_run_opened
from ._errors import CapExceeded, NbagentError, RunStopped
from ._store import Store, default_store_dir, open_store

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CAP = 3
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130

ENGINES = ("embedded", "dbos")

#: What ``--older-than`` understands: ``90s``, ``45m``, ``12h``, ``30d``, ``2w``.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(NbagentError):
    """Bad input on the command line: exit code 2, the message names the fix."""


# -- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="store folder (default: $NBAGENT_DIR, else ./.nbagent)",
    )
    store.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="execution engine (default: $NBAGENT_ENGINE, else embedded)",
    )
    store.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="database URL of the dbos engine (default: $NBAGENT_DB_URL)",
    )

    parser = argparse.ArgumentParser(
        prog="nbagent",
        description="Durable, cost-capped LLM agents: export notebooks of %%step cells to "
        "Python modules, run them headless and resumable, inspect their runs.",
        epilog="Exit codes: 0 done, 1 a step failed, 2 bad input, 3 a cap refused, "
        "4 the run is stopped, 130 interrupted (the run stays resumable).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "export",
        help="write a notebook's %%step cells as a Python module",
        description="Write a notebook as a readable Python module: each %%step cell becomes "
        "a durable step function, setup cells become module code, the run's caps carry over, "
        "notebook-only magics are dropped with a comment.",
    )
    p.add_argument("notebook", metavar="NOTEBOOK.ipynb")
    p.add_argument(
        "-o", "--output", metavar="FILE", default="-", help="module to write (default: stdout)"
    )

    p = sub.add_parser(
        "run",
        parents=[store],
        help="run a notebook or module headless, with terminal progress",
        description="Run a notebook (exported in memory) or a Python module headless. Steps "
        "that completed in an earlier run replay from disk; Ctrl-C leaves the run resumable.",
        epilog="-p KEY=VALUE replaces the value of a module-level constant `KEY = <literal>` "
        "(a setup cell's `GOAL = '...'`, say) before the module runs, like papermill's "
        "parameters: a str constant takes VALUE as text; numbers, bools, None, lists and dicts "
        "take VALUE as a Python literal.",
    )
    p.add_argument("program", metavar="NOTEBOOK.ipynb|agent.py")
    p.add_argument(
        "--run",
        dest="run_name",
        metavar="NAME",
        default=None,
        help="run name (replaces the name in the module's nbagent.Run(...))",
    )
    p.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a module-level constant (repeatable)",
    )

    p = sub.add_parser(
        "demo",
        parents=[store],
        help="run the quickstart research agent headless",
        description="Run nbagent's quickstart research agent (plan -> research -> synthesize) "
        "headless with terminal progress. Run it twice: the second run replays from disk.",
    )
    p.add_argument("--run", dest="run_name", metavar="NAME", default=None, help="run name")

    sub.add_parser("runs", parents=[store], help="list the runs in a store")

    p = sub.add_parser("show", parents=[store], help="spend, caps and steps of a run")
    p.add_argument("run", metavar="RUN")

    p = sub.add_parser("trace", parents=[store], help="a run's trace")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    p.add_argument("--last", type=int, default=None, metavar="N", help="only the last N rows")
    p.add_argument(
        "-o", "--output", metavar="FILE", default="-", help="file to write (default: stdout)"
    )

    p = sub.add_parser(
        "gc",
        parents=[store],
        help="drop runs whose last activity is older than a duration",
        description="Drop runs (steps, stored values, counters and trace) whose last activity "
        "is older than --older-than. Prints what was dropped.",
    )
    p.add_argument(
        "--older-than",
        default="30d",
        metavar="AGE",
        type=parse_age,
        help="e.g. 90s, 45m, 12h, 30d, 2w (default: 30d)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be dropped")
    return parser


def parse_age(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``45m``, ``90s``, ``2w``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: use a number and a unit, e.g. 90s, 45m, 12h, 30d or 2w"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# -- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``nbagent`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        if hasattr(args, "engine"):
            check_engine(args)
        command: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
        return command(args)
    except UsageError as e:
        print(f"nbagent {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NbagentError as e:  # ExportError, StoreError: bad input named with its fix
        print(f"nbagent {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE


def check_engine(args: argparse.Namespace) -> None:
    """Resolve ``--engine``/``--db`` (or NBAGENT_ENGINE/NBAGENT_DB_URL).

    ``--db URL`` alone means the dbos engine. With a PostgreSQL URL the dbos
    engine keeps nbagent's store in that database (``--store`` has no
    meaning); with a ``sqlite:///`` URL (one machine) DBOS uses the SQLite
    file and nbagent the embedded store (``--store DIR`` or NBAGENT_DIR).
    """
    from ._pgstore import is_postgres_url

    engine = args.engine or os.environ.get("NBAGENT_ENGINE") or ("dbos" if args.db else "embedded")
    if engine not in ENGINES:
        raise UsageError(
            f"NBAGENT_ENGINE={engine!r} is not an engine: use one of {', '.join(ENGINES)}."
        )
    args.engine = engine
    args.db = args.db or (os.environ.get("NBAGENT_DB_URL") if engine == "dbos" else None)
    if engine == "dbos":
        if not args.db:
            raise UsageError(
                "the dbos engine needs a database: pass --db URL or set NBAGENT_DB_URL "
                "(postgresql://user:password@host:5432/db, or sqlite:///nbagent.sqlite for one "
                "machine)."
            )
        if not (is_postgres_url(args.db) or args.db.startswith("sqlite:")):
            raise UsageError(
                f"--db {_masked(args.db)} is neither a PostgreSQL nor a SQLite URL: use "
                "postgresql://user:password@host:5432/db or sqlite:///path/to/file.sqlite."
            )
        if args.store and is_postgres_url(args.db):
            raise UsageError(
                "--store DIR is for the embedded store; with a PostgreSQL --db URL the runs "
                "live in that database. Leave out --store."
            )
        return
    if args.db:
        raise UsageError(
            "--db URL is for --engine dbos; the embedded engine keeps runs in a folder "
            "(--store DIR or NBAGENT_DIR)."
        )


def _masked(url: str) -> str:
    """A database URL for messages: a PostgreSQL URL's password masked."""
    from ._pgstore import is_postgres_url, mask_url

    return mask_url(url) if is_postgres_url(url) or "@" in url else url


# -- export ------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from ._export import export_notebook

    source = export_notebook(args.notebook)
    if args.output == "-":
        sys.stdout.write(source)
    else:
        Path(args.output).write_text(source, encoding="utf-8")
        print(f"nbagent: wrote {args.output}", file=sys.stderr)
    return EXIT_OK


# -- run ---------------------------------------------------------------------------------


@dataclass
class Program:
    """A module to run: its source, and the file name its code and tracebacks carry."""

    source: str
    filename: str
    path: Path
    #: module-level constants that -p may replace
    parameters: dict[str, list[ast.expr]] = field(default_factory=dict)


def load_program(path_text: str) -> Program:
    from ._export import export_notebook

    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"{path}: no such file. Pass a .ipynb notebook or a .py module.")
    if path.suffix == ".ipynb":
        source = export_notebook(path)
        filename = f"<nbagent export of {path.name}>"
        # tracebacks and inspect.getsource (step fingerprints) read the source from here
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        return Program(source, filename, path)
    if path.suffix != ".py":
        raise UsageError(
            f"{path}: expected a .ipynb notebook or a .py module. Export a notebook with "
            "`nbagent export NOTEBOOK.ipynb -o agent.py`."
        )
    return Program(path.read_text(encoding="utf-8"), str(path.resolve()), path)


def apply_run_name(tree: ast.Module, name: str, params: dict[str, str], where: str) -> None:
    """Replace the name in the module's top-level ``nbagent.Run("NAME", ...)`` call.

    When the name is a constant (``Run(RUN_NAME, ...)``) the constant is
    overridden like a ``-p`` parameter instead.
    """
    for node in tree.body:
        value = getattr(node, "value", None)
        if not isinstance(node, ast.Assign | ast.AnnAssign | ast.Expr) or not isinstance(
            value, ast.Call
        ):
            continue
        func = value.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called != "Run" or not value.args:
            continue
        first = value.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            value.args[0] = ast.copy_location(ast.Constant(name), first)
            return
        if isinstance(first, ast.Name):
            params.setdefault(first.id, name)
            return
    raise UsageError(
        f'--run: {where} has no top-level `run = nbagent.Run("NAME", ...)` to rename. Give '
        "the run's name as a module constant (RUN_NAME = '...') and pass -p RUN_NAME=..."
    )


def apply_parameters(tree: ast.Module, params: dict[str, str], where: str) -> None:
    """Replace module-level ``KEY = <literal>`` values, papermill-style (see ``run --help``)."""
    found: dict[str, list[ast.Assign | ast.AnnAssign]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name) and _literal(node.value) is not _NOT_LITERAL:
            found.setdefault(target.id, []).append(node)
    for key, text in params.items():
        if key not in found:
            known = ", ".join(sorted(found)) or "none"
            raise UsageError(
                f"-p {key}=...: {where} has no module-level constant {key!r} to override "
                f"(constants: {known})."
            )
        for node in found[key]:
            assert node.value is not None
            value = _coerce(key, text, _literal(node.value))
            new = ast.parse(repr(value), mode="eval").body
            node.value = ast.fix_missing_locations(ast.copy_location(new, node.value))
    ast.fix_missing_locations(tree)


_NOT_LITERAL = object()


def _literal(node: ast.expr | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else _NOT_LITERAL
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _coerce(key: str, text: str, original: Any) -> Any:
    if isinstance(original, str):
        return text
    if isinstance(original, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"-p {key}={text}: {key} is a bool; use true or false.")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if original is None:
            return text
        raise UsageError(
            f"-p {key}={text}: {key} is a {type(original).__name__}; give a Python literal "
            f"like {original!r}."
        ) from None
    if isinstance(original, int | float) and not isinstance(value, int | float):
        raise UsageError(f"-p {key}={text}: {key} is a number; give a number like {original!r}.")
    return value


def _split_params(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"-p {item!r}: write KEY=VALUE, e.g. -p GOAL='why is the sky blue'.")
        params[key.strip()] = value
    return params


def _split_main_guard(tree: ast.Module) -> ast.If | None:
    """Take the module's last ``if __name__ == "__main__":`` block out of its body."""
    for i in range(len(tree.body) - 1, -1, -1):
        node = tree.body[i]
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
            and len(node.test.comparators) == 1
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == "__main__"
        ):
            del tree.body[i]
            return node
    return None


@contextlib.contextmanager
def _as_main(module: types.ModuleType, argv0: str, folder: Path) -> Iterator[None]:
    """Run code as ``python agent.py`` would: as ``__main__``, its folder first on sys.path."""
    saved_main = sys.modules.get("__main__")
    saved_argv = sys.argv
    sys.modules["__main__"] = module
    sys.argv = [argv0]
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        sys.argv = saved_argv
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def run_program(
    path_text: str,
    *,
    run_name: str | None = None,
    params: dict[str, str] | None = None,
    out: TextIO | None = None,
    engine: str = "embedded",
    db_url: str | None = None,
) -> int:
    """Execute a notebook or module headless with terminal progress; returns the exit code.

    ``engine="dbos"``: the module body runs with :func:`nbagent.dbos_engine.program_runs`
    (its ``Run`` is a DbosRun on the database's store, its steps DBOS steps) and its
    ``if __name__ == "__main__":`` block runs as the run's DBOS workflow, so a crashed
    run is recovered by DBOS when the same command runs again.
    """
    out = out or sys.stdout
    program = load_program(path_text)
    params = dict(params or {})
    try:
        tree = ast.parse(program.source, program.filename)
    except SyntaxError as e:
        raise UsageError(
            f"{program.path}, line {e.lineno}: {e.msg}. Fix it and run again."
        ) from None
    where = program.path.name
    if run_name is not None:
        apply_run_name(tree, run_name, params, where)
    if params:
        apply_parameters(tree, params, where)
    guard = _split_main_guard(tree)

    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    if program.path.suffix == ".py":
        module.__file__ = program.filename
    progress = Progress(out)
    folder = program.path.resolve().parent
    dbos: Any = None
    if engine == "dbos":
        from . import dbos_engine as dbos

        dbos.launch(db_url)  # errors name the URL and the fix: exit 2
    unhook = on_run_opened(lambda run: progress.watch([run]))
    try:
        with (
            _as_main(module, str(program.path), folder),
            dbos.program_runs() if dbos is not None else contextlib.nullcontext(),
        ):
            exec(compile(tree, program.filename, "exec", dont_inherit=True), module.__dict__)
            progress.watch(_runs_in(module.__dict__))
            if dbos is not None:
                _run_on_dbos(dbos, program, module.__dict__, guard, progress)
            elif guard is not None:
                code = compile(
                    ast.Module(body=[guard], type_ignores=[]),
                    program.filename,
                    "exec",
                    dont_inherit=True,
                )
                exec(code, module.__dict__)
            progress.watch(_runs_in(module.__dict__))
    except UsageError:
        raise
    except KeyboardInterrupt:
        progress.stop_countdown()
        progress.line(
            "■ interrupted — the run is resumable: run the same command again and completed "
            "steps replay from disk."
        )
        progress.summary()
        return EXIT_INTERRUPTED
    except CapExceeded as e:
        progress.stop_countdown()
        progress.line(f"✗ stopped by a cap: {e}")
        progress.summary()
        return EXIT_CAP
    except RunStopped as e:
        progress.stop_countdown()
        progress.line(f"✗ {e}")
        progress.summary()
        return EXIT_STOPPED
    except SystemExit as e:
        progress.summary()
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        print(e.code, file=sys.stderr)
        return EXIT_FAILED
    except BaseException as e:
        progress.stop_countdown()
        traceback.print_exception(type(e), e, _user_frames(e.__traceback__, program.filename))
        progress.line(f"✗ failed: {type(e).__name__}: {e}")
        progress.summary()
        return EXIT_FAILED
    finally:
        unhook()
        if dbos is not None:
            dbos.shutdown()
    progress.summary()
    return EXIT_OK


def _run_on_dbos(
    dbos: Any,
    program: Program,
    namespace: dict[str, Any],
    guard: ast.If | None,
    progress: Progress,
) -> None:
    """Run the program's main block as the DBOS workflow of its module-level run."""
    where = program.path.name
    runs = list({id(v): v for v in namespace.values() if isinstance(v, Run)}.values())
    if len(runs) != 1:
        found = f"{len(runs)} ({', '.join(repr(r.name) for r in runs)})" if runs else "none"
        raise UsageError(
            f"--engine dbos runs one module-level run as a DBOS workflow, and {where} opens "
            f'{found}. Open exactly one `run = nbagent.Run("NAME", ...)` at module level.'
        )
    if guard is None:
        raise UsageError(
            f'{where} has no `if __name__ == "__main__":` block to run as the DBOS workflow. '
            "Call the steps from one (an exported notebook has it)."
        )
    code = compile(ast.Module(body=[guard], type_ignores=[]), program.filename, "exec")

    def main_block() -> None:
        exec(code, namespace)

    # The workflow names its function by module and file: a run recovered by a later
    # `nbagent run` of the same program finds this block again (see _dbos.target_of).
    path = str(program.path.resolve())
    shim = types.ModuleType("nbagent_agent_" + hashlib.sha1(path.encode()).hexdigest()[:12])
    shim.__file__ = path
    main_block.__module__ = shim.__name__
    main_block.__qualname__ = main_block.__name__
    sys.modules[shim.__name__] = shim
    engine = dbos.current_engine()
    name = runs[0].name
    status = engine.status(name)
    where_db = _masked(engine.db_url)
    if status is None:
        progress.line(f"◆ DBOS on {where_db}: run {name!r} is workflow {engine.workflow_id(name)}")
    elif status.status == "PENDING":
        progress.line(
            f"◆ DBOS on {where_db}: workflow {status.workflow_id} of run {name!r} did not "
            "finish; DBOS recovers it (completed steps are not executed again)"
        )
    else:
        progress.line(
            f"◆ DBOS on {where_db}: run {name!r} ran before (workflow {status.workflow_id}, "
            f"{status.status}); a new workflow replays its completed steps from the store"
        )
    try:
        dbos.run_workflow(name, main_block, pass_run=False)
    finally:
        sys.modules.pop(shim.__name__, None)


def _runs_in(namespace: dict[str, Any]) -> list[Run]:
    runs = [v for v in namespace.values() if isinstance(v, Run)]
    active = current_run(required=False)
    if active is not None:
        runs.append(active)
    return runs


def _user_frames(tb: types.TracebackType | None, filename: str) -> types.TracebackType | None:
    """The traceback from the program's first frame on (nbagent's runner frames left out)."""
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb


def cmd_run(args: argparse.Namespace) -> int:
    _use_store(args)
    return run_program(
        args.program,
        run_name=args.run_name,
        params=_split_params(args.params),
        engine=args.engine,
        db_url=args.db,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    _use_store(args)
    path = Path(__file__).parent / "examples" / "quickstart.py"
    code = run_program(str(path), run_name=args.run_name, engine=args.engine, db_url=args.db)
    if code == EXIT_OK:
        print(
            "\nRun `python -m nbagent demo` again: every step replays from disk and no LLM "
            "call is paid twice. A fresh run: `python -m nbagent demo --run quickstart-2`."
        )
    return code


def _use_store(args: argparse.Namespace) -> None:
    """``--store DIR`` for the program and anything it starts: it reads NBAGENT_DIR."""
    if args.store:
        os.environ["NBAGENT_DIR"] = str(Path(args.store).expanduser().resolve())


# -- progress ----------------------------------------------------------------------------


class Progress:
    """Terminal lines for run events: a line per step, spend versus cap, retry countdowns.

    Replays print their own line (the engine's ``↺ replayed step ...`` marker,
    the same as in a notebook), so they are not repeated here.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.runs: dict[int, Run] = {}
        self.counts = {"done": 0, "replayed": 0, "failed": 0}
        self._countdown: threading.Event | None = None
        self._lock = threading.Lock()

    def watch(self, runs: list[Run]) -> None:
        for run in runs:
            if id(run) not in self.runs:
                self.runs[id(run)] = run
                run.subscribe(functools.partial(self.on_event, run))

    def line(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    # -- events ------------------------------------------------------------------------

    def on_event(self, run: Run, event: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event.get('type')}", None)
        if handler is not None:
            self.stop_countdown()
            handler(run, event)

    def _label(self, event: dict[str, Any]) -> str:
        step = str(event.get("step") or event.get("name") or "?")
        return step[:-2] if step.endswith("#1") else step

    def _on_step_started(self, run: Run, event: dict[str, Any]) -> None:
        reason = event.get("reason")
        self.line(f"▶ {self._label(event)}" + (f" (runs again: {reason})" if reason else ""))

    def _on_step_done(self, run: Run, event: dict[str, Any]) -> None:
        self.counts["done"] += 1
        rec = event.get("record") or {}
        calls = rec.get("llm_calls", 0)
        self.line(
            f"✓ {self._label(event)} {format_duration(rec.get('duration_s', 0.0))} · "
            f"{calls} call{'s' if calls != 1 else ''} · {format_usd(rec.get('cost_usd', 0.0))}"
            f" · spend {_spend(run)}"
        )

    def _on_step_replayed(self, run: Run, event: dict[str, Any]) -> None:
        self.counts["replayed"] += 1

    def _on_step_failed(self, run: Run, event: dict[str, Any]) -> None:
        self.counts["failed"] += 1
        error = event.get("error")
        what = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        self.line(f"✗ {self._label(event)} failed: {what}")

    def _on_step_retrying(self, run: Run, event: dict[str, Any]) -> None:
        from ._retry import time_scale_from_env

        error = event.get("error")
        wait = float(event.get("wait_s") or 0.0) * time_scale_from_env()
        label = self._label(event)
        attempt = int(event.get("attempt") or 1)
        self.line(
            f"↻ {label} attempt {attempt} failed ({type(error).__name__}: {error}); "
            f"attempt {attempt + 1} in {wait:.0f} s"
        )
        if wait >= 2 and _isatty(self.out):
            self._start_countdown(label, attempt + 1, wait)

    def _on_cap_refused(self, run: Run, event: dict[str, Any]) -> None:
        self.line(f"⛔ cap {event.get('cap')}: refused · spend {_spend(run)}")

    def _on_alert(self, run: Run, event: dict[str, Any]) -> None:
        if event.get("kind") != "cap":  # the cap refusal has its own line
            self.line(f"⚠ {event.get('kind')}: {event.get('message')}")

    def _on_stopped(self, run: Run, event: dict[str, Any]) -> None:
        self.line(f"■ run {run.name!r} stopped: {event.get('reason')}")

    # -- retry countdown (terminals only) ----------------------------------------------

    def _start_countdown(self, label: str, attempt: int, wait: float) -> None:
        stop = self._countdown = threading.Event()
        deadline = time.monotonic() + wait

        def tick() -> None:
            while not stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with self._lock:
                    self.out.write(f"\r  {label}: attempt {attempt} in {left:.0f} s ")
                    self.out.flush()
            with self._lock:
                self.out.write("\r\033[K")
                self.out.flush()

        threading.Thread(target=tick, daemon=True, name="nbagent-countdown").start()

    def stop_countdown(self) -> None:
        if self._countdown is not None:
            self._countdown.set()
            self._countdown = None

    # -- the end -----------------------------------------------------------------------

    def summary(self) -> None:
        for run in self.runs.values():
            status = run.status()
            self.line(
                f"run {run.name!r}: {len(status.steps)} steps stored ({self.counts['done']} "
                f"executed, {self.counts['replayed']} replayed now) · {status.llm_calls} LLM calls"
                f" · spend {_spend(run)} · store {status.store}"
            )


def _spend(run: Run) -> str:
    cap = run.max_cost_usd
    return f"{format_usd(run.spend_usd)} / {format_usd(cap) if cap is not None else 'no cap'}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- runs, show, trace, gc -----------------------------------------------------------------


def _store(args: argparse.Namespace) -> Store:
    """The store named by --store or NBAGENT_DIR; an error if there is none (nothing created).

    With the dbos engine on PostgreSQL (``--db postgresql://...``): nbagent's
    store in that database.
    """
    from ._pgstore import is_postgres_url

    if getattr(args, "engine", None) == "dbos" and is_postgres_url(args.db or ""):
        from .dbos_engine import open_pg_store

        return open_pg_store(args.db)  # unreachable: a StoreError naming the fix (exit 2)
    folder = Path(args.store).expanduser() if args.store else default_store_dir()
    if not folder.is_dir():
        raise UsageError(
            f"no nbagent store at {folder}. Pass --store DIR or set NBAGENT_DIR to the folder "
            "your runs use (a notebook's is .nbagent/ beside it)."
        )
    return open_store(folder)


def _open_run(store: Store, name: str) -> Run:
    if store.get_run(name) is None:
        known = ", ".join(store.runs()) or "none"
        raise UsageError(f"no run {name!r} in {store.path} (runs: {known}).")
    return Run(name, store=store, activate=False)


def last_activity(store: Store, name: str) -> float:
    """When the run last did anything: its newest trace row, step or creation time."""
    times = [float((store.get_run(name) or {}).get("created") or 0.0)]
    columns, rows = store.trace_rows(name)
    if rows:
        ts = columns.index("ts")
        times.append(max(float(r[ts] or 0.0) for r in rows))
    for step_id in store.step_ids(name):
        record = store.get_step(name, step_id) or {}
        times.append(float(record.get("finished_at") or 0.0))
    return max(times)


def cmd_runs(args: argparse.Namespace) -> int:
    store = _store(args)
    names = store.runs()
    if not names:
        print(f"no runs in {store.path}")
        return EXIT_OK
    rows = [("RUN", "STEPS", "LLM CALLS", "SPEND", "CAP", "LAST ACTIVITY", "STATUS")]
    for name in names:
        run = Run(name, store=store, activate=False)
        cap = run.max_cost_usd
        rows.append(
            (
                name,
                str(len(store.step_ids(name))),
                str(run.llm_calls),
                format_usd(run.spend_usd),
                format_usd(cap) if cap is not None else "-",
                _when(last_activity(store, name)),
                f"stopped: {run.stopped}" if run.stopped else "ok",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    run = _open_run(store, args.run)
    print(run.status())
    print(f"last activity {_when(last_activity(store, run.name))}")
    return EXIT_OK


def cmd_trace(args: argparse.Namespace) -> int:
    from ._trace import to_jsonl, trace_frame

    store = _store(args)
    run = _open_run(store, args.run)
    if args.format == "jsonl":
        with tempfile.TemporaryDirectory() as tmp:
            path = to_jsonl(store, run.name, Path(tmp) / "trace.jsonl")
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        text = "".join(lines[-args.last :] if args.last else lines)
    else:
        frame = trace_frame(store, run.name)
        if args.last:
            frame = frame.tail(args.last)
        if args.format == "csv":
            text = frame.to_csv()
        elif frame.empty:
            text = f"run {run.name!r} has no trace rows yet\n"
        else:
            text = _table(frame)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return EXIT_OK


def _table(frame: Any) -> str:
    """The trace's readable columns as text: no empty cells shown as None/NaN."""
    table = frame[[c for c in _TABLE_COLUMNS if c in frame.columns]].copy()
    table["ts"] = table["ts"].dt.strftime("%Y-%m-%d %H:%M:%S")
    for column in ("attempt", "input_tokens", "output_tokens"):
        table[column] = table[column].astype("Int64")
    return table.astype(object).fillna("").to_string(max_colwidth=60) + "\n"


_TABLE_COLUMNS = (
    "ts",
    "step",
    "kind",
    "name",
    "attempt",
    "status",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_s",
    "error",
)


def cmd_gc(args: argparse.Namespace) -> int:
    store = _store(args)
    cutoff = time.time() - args.older_than
    dropped = 0
    for name in store.runs():
        when = last_activity(store, name)
        if when >= cutoff:
            continue
        run = Run(name, store=store, activate=False)
        spend = format_usd(run.spend_usd)
        verb = "would drop" if args.dry_run else "dropped"
        steps = len(store.step_ids(name)) if args.dry_run else store.drop_run(name)
        print(f"{verb} run {name!r}: last activity {_when(when)}, {steps} steps, spend {spend}")
        dropped += 1
    if not dropped:
        print(f"no runs in {store.path} are older than {_age(args.older_than)}")
    return EXIT_OK


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _age(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": cmd_export,
    "run": cmd_run,
    "demo": cmd_demo,
    "runs": cmd_runs,
    "show": cmd_show,
    "trace": cmd_trace,
    "gc": cmd_gc,
}
