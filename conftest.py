"""pytest configuration for the lesson notebooks (``pytest --nbval notebooks``).

Each notebook's kernel starts in a fresh temporary nbagent store (``NBAGENT_DIR`` and
``NBAGENT_KEY_DIR``), with backoff waits scaled to zero and without ``OPENAI_API_KEY``: the same
environment ``tools/build_lessons.py`` builds the committed outputs in, so a second run of the
tests does not replay the first run's steps and a learner's real API key is never used.
Nothing here runs inside the notebooks; the unit tests in ``tests/`` are not affected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_current: dict[str, str] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    path = str(item.path)
    if not path.endswith(".ipynb") or _current.get("notebook") == path:
        return
    # a new notebook: its kernel starts in the collector's setup, right after this hook
    if "tmp" in _current:
        shutil.rmtree(_current["tmp"], ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f"nbagent-{Path(path).stem}-")
    _current.update(notebook=path, tmp=tmp)
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("NBAGENT_MODEL", None)
    os.environ["NBAGENT_DIR"] = os.path.join(tmp, "store")
    os.environ["NBAGENT_KEY_DIR"] = os.path.join(tmp, "keys")
    os.environ["NBAGENT_TIME_SCALE"] = "0"
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "tmp" in _current:
        shutil.rmtree(_current["tmp"], ignore_errors=True)
