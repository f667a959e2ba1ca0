"""Shared fixtures: every test gets its own store and key folder, and a clean nbagent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def isolated_nbagent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the store and the signing keys at tmp folders; reset nbagent's globals after."""
    store = tmp_path / "store"
    monkeypatch.setenv("NBAGENT_DIR", str(store))
    monkeypatch.setenv("NBAGENT_KEY_DIR", str(tmp_path / "keys"))
    yield store
    from nbagent import _engine, _store

    _engine._current_run = None
    _engine._notebook_step = None
    with _store._open_lock:
        stores = list(_store._open_stores.values())
        _store._open_stores.clear()
    for s in stores:
        s.close()


@pytest.fixture
def ip() -> Iterator[Any]:
    """The global test IPython shell with ``%load_ext nbagent``; unloaded and cleaned after."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    before = set(shell.user_ns)
    shell.run_line_magic("load_ext", "nbagent")
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "nbagent")
        for name in set(shell.user_ns) - before:
            shell.user_ns.pop(name, None)
