"""A Jupyter kernelspec for this interpreter (the nbagent venv), for tests that start real kernels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def install_kernelspec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, display_name: str
) -> str:
    """Install kernelspec ``name`` under ``tmp_path`` and point Jupyter and IPython there."""
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": display_name, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return name
