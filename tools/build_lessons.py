#!/usr/bin/env python3
"""Build the lesson notebooks from their percent-format sources, with outputs from a clean run.

    python tools/build_lessons.py            # every lessons/NN-slug.py -> notebooks/NN-slug.ipynb
    python tools/build_lessons.py 00 03      # only lessons 00 and 03
    python tools/build_lessons.py --no-execute 02   # sources only (no outputs)

Source format (``lessons/NN-slug.py``), a subset of jupytext's percent format:

* ``# %% [markdown]`` starts a markdown cell; its lines are ``# text`` comments (a bare ``#``
  is an empty line); the ``# `` prefix is removed.
* ``# %%`` starts a code cell; its lines are copied as they are.
* Blank lines at the start and end of a cell are dropped; anything before the first marker is
  ignored (use it for a comment about the file).

The notebook is nbformat 4.5 with cell ids derived from the lesson and the cell index, a
python3 kernelspec, fixed ``language_info`` (no Python version) and no execution timestamps,
so building twice gives the same bytes (where only a masked value, e.g. a duration, changed,
the committed output is kept). It is executed with nbclient in a fresh temporary
``NBAGENT_DIR`` / ``NBAGENT_KEY_DIR`` with ``NBAGENT_TIME_SCALE=0`` and without
``OPENAI_API_KEY`` (the simulated LLM), the same environment the nbval run gets from
the repository's ``conftest.py``. Cells with a ``# NBVAL_SKIP`` comment line are not executed (a cell that kills
the kernel on purpose); an error in a cell fails the build unless the cell is marked
``# NBVAL_RAISES_EXCEPTION``. Widget state is not saved (it holds timings) and widget views are
dropped from the outputs (they name random model ids that would point at nothing): a committed
notebook shows each widget's text/plain summary, on GitHub too, and the live widget once run.
nbval ignores widget views, so validation is unaffected.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = NOTEBOOKS / "nbval-sanitize.cfg"

MARKER = re.compile(r"^# %%(?P<rest>.*)$")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3},
    "file_extension": ".py",
    "mimetype": "text/x-python",
    "name": "python",
    "nbconvert_exporter": "python",
    "pygments_lexer": "ipython3",
}
#: seconds one cell may run before the build fails
CELL_TIMEOUT = 600


def lesson_sources(selected: list[str] | None = None) -> list[Path]:
    """``lessons/NN-slug.py`` files, sorted, optionally only those whose NN is in ``selected``."""
    paths = sorted(p for p in LESSONS.glob("[0-9][0-9]-*.py"))
    if selected:
        paths = [p for p in paths if p.name[:2] in selected or p.stem in selected]
    return paths


def notebook_path(source: Path) -> Path:
    return NOTEBOOKS / f"{source.stem}.ipynb"


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``(cell_type, source)`` pairs of a percent-format lesson."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            rest = m.group("rest").strip()
            if rest == "[markdown]":
                cells.append(("markdown", []))
            elif rest == "":
                cells.append(("code", []))
            else:
                raise ValueError(f"unknown cell marker {line!r} (use '# %%' or '# %% [markdown]')")
            continue
        if not cells:
            continue  # a header before the first cell
        kind, lines = cells[-1]
        if kind == "markdown":
            if line == "#":
                line = ""
            elif line.startswith("# "):
                line = line[2:]
            elif line.strip():
                raise ValueError(f"markdown line without '# ' prefix: {line!r}")
        lines.append(line)
    out = []
    for kind, lines in cells:
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        out.append((kind, "\n".join(lines)))
    return out


def cell_id(slug: str, index: int) -> str:
    return hashlib.sha1(f"{slug}:{index}".encode()).hexdigest()[:16]


def source_notebook(source: Path) -> Any:
    """The lesson as an unexecuted notebook (sources, ids, metadata; no outputs)."""
    nb = new_notebook()
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    for i, (kind, text) in enumerate(parse_cells(source.read_text(encoding="utf-8"))):
        cell = new_markdown_cell(text) if kind == "markdown" else new_code_cell(text)
        cell.id = cell_id(source.stem, i)
        nb.cells.append(cell)
    return nb


def has_marker(source: str, marker: str) -> bool:
    """nbval's rule: a comment line that is exactly ``# MARKER`` (any number of ``#``)."""
    return any(
        line.strip().startswith("#") and line.strip().lstrip("#").strip() == marker
        for line in source.splitlines()
    )


def is_skipped(source: str) -> bool:
    return has_marker(source, "NBVAL_SKIP")


def execution_env(store: Path) -> dict[str, str]:
    """The environment lessons are built and validated in: fresh store, no waits, simulator."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        NBAGENT_DIR=str(store / "store"),
        NBAGENT_KEY_DIR=str(store / "keys"),
        NBAGENT_TIME_SCALE="0",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    env.pop("NBAGENT_MODEL", None)
    return env


def execute(nb: Any, cwd: Path, env: dict[str, str]) -> None:
    """Run every cell not marked NBVAL_SKIP, in order, in one fresh kernel."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        store_widget_state=False,
        record_timing=False,
    )
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits the environment of this process
    try:
        with client.setup_kernel(env=env):
            index = 0
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                if is_skipped(cell.source):
                    continue
                index += 1
                try:
                    client.execute_cell(cell, i, execution_count=index)
                except CellExecutionError:
                    if not has_marker(cell.source, "NBVAL_RAISES_EXCEPTION"):
                        raise  # an unexpected error: the lesson is broken
    finally:
        os.environ.clear()
        os.environ.update(saved)


def clean(nb: Any) -> Any:
    """Make the executed notebook byte-stable: no timing metadata, numbered executions."""
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        # the kernel sends a print as one or several stream messages depending on timing:
        # merge neighbouring pieces of one stream (nbval compares streams merged anyway)
        merged: list[Any] = []
        for out in cell.outputs:
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and out.output_type == "stream"
                and prev.output_type == "stream"
                and prev.name == out.name
            ):
                prev.text += out.text
            else:
                merged.append(out)
        cell.outputs = merged
        for out in cell.outputs:
            data = out.get("data")
            if data and WIDGET_VIEW in data and len(data) > 1:
                # the view names a random model id whose state is not saved: drop it, so the
                # committed notebook shows the widget's text/plain (nbval ignores views anyway)
                del data[WIDGET_VIEW]
    return nb


def sanitize_patterns() -> list[tuple[str, str]]:
    """The ``regex:``/``replace:`` pairs of ``notebooks/nbval-sanitize.cfg`` (as nbval reads them)."""
    text = SANITIZE.read_text(encoding="utf-8") if SANITIZE.exists() else ""
    return re.findall(r"^regex: (.*)$\n^replace: (.*)$", text, flags=re.MULTILINE)


def _masked(outputs: list[Any], patterns: list[tuple[str, str]]) -> str:
    text = json.dumps(outputs, sort_keys=True, ensure_ascii=False)
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


def keep_stable_outputs(nb: Any, old_path: Path) -> None:
    """Where a cell's new outputs equal the committed ones up to the sanitize patterns (only a
    duration or a temporary path changed), keep the committed outputs: a rebuild that changes
    nothing a learner would notice leaves the file byte-identical."""
    if not old_path.exists():
        return
    old = nbformat.read(old_path, as_version=4)
    by_id = {c.get("id"): c for c in old.cells}
    patterns = sanitize_patterns()
    for cell in nb.cells:
        prev = by_id.get(cell.get("id"))
        if cell.cell_type != "code" or prev is None or prev.source != cell.source:
            continue
        if _masked(prev.outputs, patterns) == _masked(cell.outputs, patterns):
            cell.outputs = prev.outputs


def build(source: Path, *, run: bool = True) -> Path:
    nb = source_notebook(source)
    target = notebook_path(source)
    if run:
        with tempfile.TemporaryDirectory(prefix="nbagent-lesson-") as tmp:
            execute(nb, NOTEBOOKS, execution_env(Path(tmp)))
    nb = clean(nb)
    if run:
        keep_stable_outputs(nb, target)
    nbformat.validate(nb)
    target.parent.mkdir(exist_ok=True)
    text = nbformat.writes(nb) + "\n"
    target.write_text(text, encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers (00 03) or stems; default all")
    parser.add_argument("--no-execute", action="store_true", help="write sources without outputs")
    args = parser.parse_args(argv)
    sources = lesson_sources(args.lessons)
    if not sources:
        print(f"no lessons match {args.lessons} in {LESSONS}", file=sys.stderr)
        return 1
    for source in sources:
        target = build(source, run=not args.no_execute)
        print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
