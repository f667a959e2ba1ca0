"""``nbagent export``: a notebook of ``%%step`` cells as a readable Python module.

What becomes what::

    notebook                                   module
    markdown cells before the first code cell  the module docstring
    code cells before the first %%step cell    module code, in order (imports, constants)
    %nbagent start RUN --cap-usd X ...         run = nbagent.Run("RUN", max_cost_usd=X, ...)
    markdown just above a %%step cell          the step function's docstring
    %%step NAME --retries N ...                @nbagent.cell_step(run, "NAME", retries=N)
                                               def NAME():  global <what it binds>; <cell>
    later cells with only imports/defs         module code, after the setup
    other later cells                          inline code in main(), in notebook order
    %load_ext, %matplotlib, !pip, %%bash ...   # dropped: <magic> (notebook-only)

``main()`` calls the steps in notebook order, and ``python agent.py`` runs
it. Step bodies are the cells themselves, so replay and commit follow the
``%%step`` rules (see :mod:`nbagent._script`).

The export is a pure function of the notebook: no timestamps, no absolute
paths, no execution counts, so re-exporting an unchanged notebook gives the
same bytes.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import io
import json
import keyword
import os
import re
import shlex
import symtable
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import NbagentError, StepError

#: Cell magics whose body is ordinary code: the header is dropped, the body kept.
TRANSPARENT_CELL_MAGICS = frozenset({"time", "capture"})

_INDENT = "    "
#: Where `%nbagent start` was, until the run's variable name is known.
_RUN_PLACEHOLDER = "run = nbagent.Run(...)"
#: What `%nbagent status` becomes.
_STATUS_LINE = "print(run.status())"
_TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


class ExportError(NbagentError):
    """The notebook cannot be exported; the message names the cell, the line and the fix."""


@dataclass
class _Chunk:
    """One code cell on its way into the module."""

    #: 1-based position of the cell in the notebook (markdown cells count)
    cell: int
    #: Python source of the cell, magics converted or dropped
    code: str
    #: cell line number of ``code``'s first line (1-based)
    first_line: int
    #: markdown cells just above, as text
    notes: list[str] = field(default_factory=list)
    #: parsed ``%%step`` options (None for plain code cells)
    step: argparse.Namespace | None = None
    #: the parsed code
    tree: ast.Module = field(default_factory=lambda: ast.Module(body=[], type_ignores=[]))

    def where(self, line: int | None = None) -> str:
        what = f"cell {self.cell}" + (f" (step {self.step.name!r})" if self.step else "")
        return what if line is None else f"{what}, line {line + self.first_line - 1}"


@dataclass
class _RunSpec:
    name: str
    options: list[str]
    store: str | None = None


# -- reading ---------------------------------------------------------------------------


def read_notebook(path: str | os.PathLike[str]) -> Any:
    """The notebook at ``path`` (nbformat 4), or an ExportError saying why not."""
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file. Pass the path of a .ipynb notebook.")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises JSON, validation and reader errors of many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"{path} is not a Jupyter notebook ({first}). Pass an .ipynb file saved by "
            "Jupyter; to run a Python module use `nbagent run agent.py`."
        ) from None


def export_notebook(path: str | os.PathLike[str]) -> str:
    """The Python module for the notebook at ``path`` (see the module docs for the mapping)."""
    path = Path(path)
    return export_cells(read_notebook(path).cells, path.name)


# -- converting cells ------------------------------------------------------------------


def export_cells(cells: list[Any], filename: str) -> str:
    """The module for a notebook's cells; ``filename`` names it in messages and the docstring."""
    from ._magics import parse_header, step_parser

    intro: list[str] = []
    notes: list[str] = []
    chunks: list[_Chunk] = []
    seen_code = False
    for number, cell in enumerate(cells, start=1):
        source = _text(cell.get("source", ""))
        if cell.get("cell_type") == "markdown":
            if source.strip():
                (notes if seen_code else intro).append(source.strip())
            continue
        if cell.get("cell_type") != "code" or not source.strip():
            continue
        seen_code = True
        lead = len(source) - len(source.lstrip("\r\n"))
        offset = source[:lead].count("\n")
        source = source[lead:]
        parsed = parse_header(source)
        step = None
        if parsed is not None:
            header, body = parsed
            try:
                step = step_parser().parse_args(shlex.split(header))
            except (StepError, ValueError) as e:
                raise ExportError(
                    f"cell {number}: cannot read `%%step {header}`: {e}\n"
                    "Fix the cell's first line in the notebook and export again."
                ) from None
            except Exception:  # --help: argparse printed the usage
                raise ExportError(
                    f"cell {number}: `%%step {header}` asks for help; give the step's options "
                    "instead, e.g. `%%step plan --retries 2`."
                ) from None
            chunk = _Chunk(number, body, offset + 2, notes, step)
        elif source.startswith("%%"):
            magic = source.split(None, 1)[0][2:]
            header, _, body = source.partition("\n")
            if magic in TRANSPARENT_CELL_MAGICS:
                chunk = _Chunk(
                    number,
                    f"# dropped: {header.strip()} (notebook-only)\n{body}",
                    offset + 1,
                    notes,
                )
            else:
                chunk = _Chunk(
                    number, f"# dropped: a {header.strip()} cell (notebook-only)", offset + 1, notes
                )
        else:
            chunk = _Chunk(number, source, offset + 1, notes)
        notes = []
        chunks.append(chunk)

    steps = [c for c in chunks if c.step is not None]
    if not steps:
        raise ExportError(
            f"{filename} has no `%%step` cells, so there is nothing durable to export. Make "
            "the cells that call the LLM steps: put `%%step NAME` as their first line "
            "(e.g. `%%step plan`), then export again."
        )
    names: dict[str, _Chunk] = {}
    for c in list(steps):
        assert c.step is not None
        first = names.get(c.step.name)
        if first is not None and (first.code.strip(), vars(first.step)) == (
            c.code.strip(),
            vars(c.step),
        ):
            # the same step cell again, unchanged: in the notebook running it replays the
            # step (a lesson shows that); in the module there is nothing to do
            steps.remove(c)
            chunks[chunks.index(c)] = _Chunk(
                c.cell,
                f"# (cell {c.cell} repeats step {c.step.name!r} unchanged: in the notebook, a "
                "replay from disk)",
                c.first_line,
            )
            continue
        if first is not None:
            raise ExportError(
                f"cell {c.cell}: step name {c.step.name!r} is already used by cell "
                f"{first.cell}; step names must be unique within a run. Rename "
                f"one, e.g. `%%step {c.step.name}-2`, and export again."
            )
        names[c.step.name] = c

    first_step = chunks.index(steps[0])
    run_spec: _RunSpec | None = None
    for i, chunk in enumerate(chunks):
        chunk.code, spec = _convert_magics(chunk, setup=i < first_step)
        if spec is not None:
            if run_spec is not None:
                raise ExportError(
                    f"cell {chunk.cell}: a second `%nbagent start`; an exported module has one "
                    "run. Keep one `%nbagent start` before the first step and export again."
                )
            run_spec = spec
        chunk.tree = _parse(chunk, in_function=i >= first_step)
    if run_spec is None:
        run_spec = _RunSpec(Path(filename).stem or "default", [])
    return _Module(filename, intro, chunks, first_step, run_spec).render()


def _text(source: Any) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


def _convert_magics(chunk: _Chunk, *, setup: bool) -> tuple[str, _RunSpec | None]:
    """The chunk's code with IPython-only lines converted or dropped, and its `%nbagent start`.

    IPython's own input transformer decides which lines are magics (it knows
    about strings and continuation lines); each such line is then replaced
    line for line, so line numbers stay those of the cell.
    """
    from IPython.core.inputtransformer2 import TransformerManager

    code = chunk.code.rstrip()
    lines = code.splitlines()
    transformed = TransformerManager().transform_cell(code).splitlines()
    if len(transformed) != len(lines):
        transformed = lines  # multi-line IPython syntax: left as is, reported if invalid
    spec: _RunSpec | None = None
    out: list[str] = []
    for number, (line, new) in enumerate(zip(lines, transformed, strict=True), start=1):
        if new == line or "get_ipython()" not in new or "get_ipython()" in line:
            out.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        magic = _magic_call(new.strip())
        if magic is None:
            raise ExportError(
                f"{chunk.where(number)}: `{line.strip()}` captures the output of a shell "
                "command or magic, which only works in Jupyter. Use subprocess.run(...) or "
                "plain Python instead, then export again."
            )
        kind, name, args = magic
        shown = line.strip()
        if kind == "line" and name == "nbagent":
            command = args.split(None, 1)[0] if args.strip() else ""
            if command == "start":
                if not setup or indent:
                    raise ExportError(
                        f"{chunk.where(number)}: `%nbagent start` must be at the top level of "
                        "a cell before the first `%%step` cell, so that the steps belong to "
                        "its run. Move it up and export again."
                    )
                spec = _run_spec(chunk, number, args)
                out.append(_RUN_PLACEHOLDER)
                continue
            if command == "status":
                out.append(f"{indent}{_STATUS_LINE}")
                continue
        if kind == "line" and name == "time":
            out.append(f"{indent}{args}  # was: %time (notebook-only)")
            continue
        dropped = f"# dropped: {shown} (notebook-only)"
        out.append(f"{indent}pass  {dropped}" if indent else dropped)
    return "\n".join(out), spec


def _magic_call(line: str) -> tuple[str, str, str] | None:
    """("line", name, args) for ``%name args``, ("shell", "", cmd) for ``!cmd``, else None."""
    try:
        node = ast.parse(line).body[0]
    except (SyntaxError, IndexError):
        return None
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return None
    call = node.value
    func = call.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)):
        return None
    strings = [a.value for a in call.args if isinstance(a, ast.Constant)]
    if func.attr == "run_line_magic" and len(strings) == 2:
        return "line", str(strings[0]), str(strings[1])
    if func.attr == "system" and len(strings) == 1:
        return "shell", "", str(strings[0])
    return None


def _run_spec(chunk: _Chunk, number: int, args: str) -> _RunSpec:
    from ._magics import nbagent_parser

    try:
        ns = nbagent_parser().parse_args(shlex.split(args))
    except (StepError, ValueError) as e:
        raise ExportError(
            f"{chunk.where(number)}: cannot read `%nbagent {args}`: {e}\n"
            "Fix the line in the notebook and export again."
        ) from None
    except Exception:  # --help
        raise ExportError(
            f"{chunk.where(number)}: `%nbagent {args}` asks for help; give the run's options."
        ) from None
    options = []
    if ns.cap_usd is not None:
        options.append(f"max_cost_usd={float(ns.cap_usd)!r}")
    for key, value in (("max_steps", ns.max_steps), ("max_llm_calls", ns.max_llm_calls)):
        if value is not None:
            options.append(f"{key}={value}")
    if ns.strict:
        options.append("strict=True")
    return _RunSpec(ns.run, options, ns.store)


def _parse(chunk: _Chunk, *, in_function: bool) -> ast.Module:
    """Parse and compile-check a chunk; errors name the cell and its line."""
    flags = ast.PyCF_ONLY_AST | (_TOP_LEVEL_AWAIT if chunk.step else 0)
    try:
        tree = compile(chunk.code, "<cell>", "exec", flags=flags, dont_inherit=True)
        compile(tree, "<cell>", "exec", flags=flags & ~ast.PyCF_ONLY_AST, dont_inherit=True)
    except SyntaxError as e:
        text = (e.text or "").rstrip()
        shown = f"\n    {text.strip()}" if text.strip() else ""
        raise ExportError(
            f"{chunk.where(e.lineno or 1)}: {e.msg}{shown}\n"
            "Fix the cell in the notebook (it would fail there too) and export again."
        ) from None
    assert isinstance(tree, ast.Module)
    for node in _top_level_nodes(tree):
        if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith) and not chunk.step:
            raise ExportError(
                f"{chunk.where(node.lineno)}: top-level `await` outside a `%%step` cell cannot "
                "run in a module. Move it into a step, or wrap it in asyncio.run(...)."
            )
        if in_function and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            raise ExportError(
                f"{chunk.where(node.lineno)}: `{node.target.id}: ...` annotates a global "
                "variable, which Python forbids inside the step's function. Drop the "
                "annotation and export again."
            )
    return tree


def _top_level_nodes(tree: ast.AST) -> list[ast.AST]:
    """Nodes that run at the cell's top level (not inside functions, lambdas or classes)."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


def _has_await(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.Await | ast.AsyncFor | ast.AsyncWith) for n in _top_level_nodes(tree)
    )


def _bound_names(code: str) -> list[str]:
    """Names a cell binds at its top level: they become the function's ``global`` names."""
    wrapped = "async def _cell():\n    pass\n" + indent_code(code)
    table = symtable.symtable(wrapped, "<cell>", "exec").get_children()[0]
    return sorted(s.get_name() for s in table.get_symbols() if s.is_local())


def _only_definitions(tree: ast.Module) -> bool:
    kinds = ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    return bool(tree.body) and all(isinstance(node, kinds) for node in tree.body)


# -- rendering ---------------------------------------------------------------------------


class _Module:
    """Lays out the module: docstring, setup, run, helpers, step functions, main()."""

    def __init__(
        self,
        filename: str,
        intro: list[str],
        chunks: list[_Chunk],
        first_step: int,
        run: _RunSpec,
    ) -> None:
        self.filename = filename
        self.intro = intro
        self.run = run
        self.setup = chunks[:first_step]
        later = chunks[first_step:]
        self.steps = [c for c in later if c.step is not None]
        self.helpers = [c for c in later if c.step is None and _only_definitions(c.tree)]
        self.body = [c for c in later if c.step is not None or c not in self.helpers]
        taken = set(dir(builtins)) | set(keyword.kwlist) | {"nbagent"}
        for c in chunks:  # the notebook's own names: generated lines left out
            user_code = c.code.replace(_RUN_PLACEHOLDER, "pass").replace(_STATUS_LINE, "pass")
            taken |= set(_bound_names(user_code)) | _names_loaded(ast.parse(user_code))
        self.run_var = _fresh("run", taken)
        self.main = _fresh("main", taken)
        self.functions: dict[int, str] = {}
        for c in self.steps:
            assert c.step is not None
            self.functions[c.cell] = _fresh(_identifier(c.step.name), taken, suffix="_step")

    def render(self) -> str:
        parts: list[str] = []
        setup = "\n\n".join(self._module_code(c) for c in self.setup)
        has_run = _RUN_PLACEHOLDER in setup
        # the run line needs nbagent: imported above it (a notebook may import it only later)
        before_run = setup.split(_RUN_PLACEHOLDER, 1)[0]
        imports = "" if re.search(r"^import nbagent$", before_run, re.M) else "import nbagent"
        top = "\n\n".join(p for p in (imports, setup) if p)
        if not has_run:
            top += "\n\n" + self._run_line()
        parts.append(top.replace(_RUN_PLACEHOLDER, self._run_line()))
        parts.extend(self._module_code(c) for c in self.helpers)
        parts.extend(self._step_function(c) for c in self.steps)
        parts.append(self._main())
        parts.append(f'if __name__ == "__main__":\n{_INDENT}{self.main}()')
        code = "\n\n\n".join(p.strip("\n") for p in parts if p.strip())
        return f"{self._docstring()}\n\n{code}\n"

    def _docstring(self) -> str:
        footer = (
            f"Exported from {self.filename} by `nbagent export`. Each `%%step` cell is a durable "
            "step:\nrun this module again after a crash and completed steps replay from disk."
        )
        text = "\n\n".join([*(_plain_markdown(t) for t in self.intro), footer])
        return _docstring(text, "")

    def _run_line(self) -> str:
        args = [_literal(self.run.name), *self.run.options]
        line = f"{self.run_var} = nbagent.Run({', '.join(args)})"
        if self.run.store:
            line = (
                f"# the notebook's store: --store {self.run.store} (set NBAGENT_DIR or "
                f"`nbagent run --store DIR` to use it)\n{line}"
            )
        return line

    def _comments(self, chunk: _Chunk, indent: str) -> str:
        lines: list[str] = []
        for note in chunk.notes:
            lines += [f"{indent}# {line}".rstrip() for line in _plain_markdown(note).splitlines()]
        return "\n".join(lines) + "\n" if lines else ""

    def _module_code(self, chunk: _Chunk) -> str:
        return self._comments(chunk, "") + self._rename_run(chunk.code).strip("\n")

    def _rename_run(self, code: str) -> str:
        if self.run_var == "run":
            return code
        return code.replace(_STATUS_LINE, f"print({self.run_var}.status())")

    def _step_function(self, chunk: _Chunk) -> str:
        step = chunk.step
        assert step is not None
        args = [self.run_var, _literal(step.name)]
        if step.retries:
            args.append(f"retries={step.retries}")
        if step.timeout is not None:
            args.append(f"timeout={_number(step.timeout)}")
        if step.rerun:
            args.append("rerun=True")
        if step.save is not None:
            args.append(f"save={_literal(step.save)}")
        if step.exclude:
            args.append(f"exclude={_literal(step.exclude)}")
        if step.strict:
            args.append("strict=True")
        lines = [f"@nbagent.cell_step({', '.join(args)})"]
        asynchronous = "async " if _has_await(chunk.tree) else ""
        lines.append(f"{asynchronous}def {self.functions[chunk.cell]}():")
        if chunk.notes:
            text = "\n\n".join(_plain_markdown(n) for n in chunk.notes)
            lines.append(_docstring(text, _INDENT))
        lines += _global_lines(_bound_names(chunk.code), _INDENT)
        body = self._rename_run(chunk.code).strip("\n")
        if body.strip():
            lines.append(indent_code(body))
        if not chunk.tree.body and not chunk.notes:
            lines.append(f"{_INDENT}pass")
        return "\n".join(lines)

    def _main(self) -> str:
        bound = sorted({n for c in self.body if c.step is None for n in _bound_names(c.code)})
        blocks: list[list[str]] = []
        calls: list[str] = []
        for chunk in self.body:
            if chunk.step is not None:
                calls.append(f"{_INDENT}{self.functions[chunk.cell]}()")
                continue
            if calls:
                blocks.append(calls)
                calls = []
            block = [self._comments(chunk, _INDENT).rstrip("\n")]
            block.append(indent_code(self._rename_run(chunk.code).strip("\n")))
            blocks.append([line for line in block if line])
        if calls:
            blocks.append(calls)
        head = "\n".join([f"def {self.main}():", *_global_lines(bound, _INDENT)])
        return head + "\n" + "\n\n".join("\n".join(b) for b in blocks)


def _names_loaded(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _fresh(base: str, taken: set[str], suffix: str = "_") -> str:
    """``base``, or ``base`` + suffix (+ a number) when a notebook name already uses it."""
    name = base
    if name in taken:
        name = base + suffix
        n = 2
        while name in taken:
            name = f"{base}{suffix}{n}"
            n += 1
    taken.add(name)
    return name


def _identifier(step_name: str) -> str:
    name = re.sub(r"\W+", "_", step_name.strip()).strip("_") or "step"
    return f"step_{name}" if name[0].isdigit() else name


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _literal(value: Any) -> str:
    """A Python literal with double quotes (json's, which Python reads the same)."""
    return json.dumps(value, ensure_ascii=False)


def _global_lines(names: list[str], indent: str, width: int = 92) -> list[str]:
    lines: list[str] = []
    current: list[str] = []
    for name in names:
        if current and len(indent) + 7 + len(", ".join([*current, name])) > width:
            lines.append(f"{indent}global {', '.join(current)}")
            current = []
        current.append(name)
    if current:
        lines.append(f"{indent}global {', '.join(current)}")
    return lines


def _plain_markdown(text: str) -> str:
    """Markdown as plain prose: a heading becomes a paragraph of its own, trailing spaces go."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if lines and lines[-1] and line.strip() and (heading or lines[-1].endswith("\0")):
            lines.append("")
        lines.append(heading.group(1).rstrip() + "\0" if heading else line.rstrip())
    return "\n".join(lines).replace("\0", "")


def _docstring(text: str, indent: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    lines = text.strip().splitlines()
    if len(lines) == 1:
        return f'{indent}"""{lines[0]}"""'
    body = "\n".join(f"{indent}{line}".rstrip() for line in lines[1:])
    return f'{indent}"""{lines[0]}\n{body}\n{indent}"""'


def indent_code(code: str, prefix: str = _INDENT) -> str:
    """Indent code one level, leaving the inside of multi-line strings untouched."""
    keep: set[int] = set()  # 1-based lines that continue a string started above
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    opened: list[int] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.STRING and tok.start[0] != tok.end[0]:
                keep.update(range(tok.start[0] + 1, tok.end[0] + 1))
            elif fstring_start is not None and tok.type == fstring_start:
                opened.append(tok.start[0])
            elif fstring_end is not None and tok.type == fstring_end and opened:
                keep.update(range(opened.pop() + 1, tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        pass
    return "\n".join(
        line if number in keep or not line.strip() else prefix + line
        for number, line in enumerate(code.split("\n"), start=1)
    )


__all__ = ["ExportError", "export_cells", "export_notebook", "indent_code", "read_notebook"]
