"""Fixtures of the reliability suite: a kernelspec for this interpreter, notebook runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from kernels import install_kernelspec

KERNEL = "nbagent-reliability"


@pytest.fixture
def kernelspec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that runs this interpreter (the nbagent venv)."""
    return install_kernelspec(tmp_path, monkeypatch, KERNEL, "nbagent reliability")
