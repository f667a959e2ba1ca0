"""The lesson notebooks match their sources in ``lessons/`` and are listed in the index.

Outputs are not compared here (nbval does that: ``make test``); this test only rebuilds each
notebook's cells from ``lessons/NN-slug.py`` in memory and compares sources, cell ids and
metadata, so an edit to a lesson that was not rebuilt with ``tools/build_lessons.py`` fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_lessons", ROOT / "tools/build_lessons.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_lessons", module)
    spec.loader.exec_module(module)
    return module


build = _builder()
SOURCES = build.lesson_sources()


def test_there_are_lessons() -> None:
    assert SOURCES, "no lessons/NN-slug.py found"
    numbers = [p.name[:2] for p in SOURCES]
    assert len(numbers) == len(set(numbers)), f"two lessons share a number: {numbers}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_is_up_to_date(source: Path) -> None:
    target = build.notebook_path(source)
    rebuild = f"python tools/build_lessons.py {source.name[:2]}"
    assert target.exists(), f"{target.name} is missing: run `{rebuild}`"
    stored = json.loads(target.read_text(encoding="utf-8"))
    fresh = build.source_notebook(source)
    assert (stored["nbformat"], stored["nbformat_minor"]) == (4, 5)
    assert stored["metadata"]["kernelspec"]["name"] == "python3"
    got = [(c["cell_type"], c["id"], "".join(c["source"])) for c in stored["cells"]]
    want = [(c.cell_type, c.id, c.source) for c in fresh.cells]
    assert got == want, f"{target.name} is out of date with {source.name}: run `{rebuild}`"
    for cell in stored["cells"]:
        if cell["cell_type"] != "code":
            continue
        assert "execution" not in cell["metadata"], "execution timestamps must be stripped"
        if build.is_skipped("".join(cell["source"])):
            assert not cell["outputs"], "a NBVAL_SKIP cell is not executed by the build"
        elif "NBVAL_IGNORE_OUTPUT" not in "".join(cell["source"]):
            errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
            if "NBVAL_RAISES_EXCEPTION" not in "".join(cell["source"]):
                assert not errors, f"{target.name}: a cell failed in the build: {errors}"


def test_every_notebook_has_a_source() -> None:
    stems = {p.stem for p in SOURCES}
    orphans = [p.name for p in (ROOT / "notebooks").glob("*.ipynb") if p.stem not in stems]
    assert not orphans, f"notebooks without a lesson source in lessons/: {orphans}"


def test_every_lesson_is_in_the_index() -> None:
    index = (ROOT / "notebooks/README.md").read_text(encoding="utf-8")
    for source in SOURCES:
        name = f"{source.stem}.ipynb"
        assert f"]({name})" in index, f"{name} is not linked from notebooks/README.md"
        binder = f"urlpath=lab/tree/notebooks/{name}"
        assert binder in index, f"notebooks/README.md has no Binder link for {name}"


def test_lesson_opens_with_a_title_and_ends_with_a_self_check() -> None:
    for source in SOURCES:
        cells = build.parse_cells(source.read_text(encoding="utf-8"))
        kind, text = cells[0]
        assert kind == "markdown" and text.startswith("# "), f"{source.name}: start with a title"
        assert re.search(r"self-check", source.read_text(encoding="utf-8"), re.I), (
            f"{source.name}: end with a self-check exercise"
        )


def test_parse_cells() -> None:
    text = "header\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\ny = 2\n\n"
    assert build.parse_cells(text) == [
        ("markdown", "# Title\n\ntext"),
        ("code", "x = 1\n\n\ny = 2"),
    ]
    with pytest.raises(ValueError):
        build.parse_cells("# %% [raw]\n")
