"""Binder reads the configuration we mean, and every lesson runs in what it would build.

Slow (a minute or two, most of it pip): from a copy of the repository, build a fresh virtual
environment from ``binder/`` alone, the way repo2docker does it — ``pip install -r
binder/requirements.txt``, then ``binder/postBuild`` in the repository folder — and run every
lesson notebook in it with nbclient (no nbval: only "executes without error"; cells marked
``# NBVAL_SKIP`` are left out, like the kernel-killing cell of lesson 01). Nothing from the
development environment leaks in: no ``NBAGENT_*`` variables, no ``OPENAI_API_KEY``, a fresh
``HOME`` for Jupyter's data (pip keeps using the usual cache, so a second run is quicker).

Then ``repo2docker --no-build .`` (pip ``jupyter-repo2docker``, installed into its own venv)
must print a Dockerfile that uses binder/runtime.txt's Python, installs binder/requirements.txt
and runs binder/postBuild. Without a registry to install repo2docker from, that part is skipped,
except under ``CI=true`` where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "*.egg-info", "__pycache__", ".nbagent", ".pytest_cache",
    "test-artifacts", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
)  # fmt: skip

RUN_LESSONS = r"""
import sys, time, nbformat
from nbclient import NotebookClient
failed = []
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if not any(
        l.strip().startswith("#") and l.strip().lstrip("#").strip() == "NBVAL_SKIP"
        for l in c.source.splitlines())]
    t0 = time.monotonic()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": "notebooks"}}).execute()
    except Exception as e:
        failed.append(path)
        print(f"FAILED {path}: {type(e).__name__}: {str(e)[-3000:]}", flush=True)
    else:
        print(f"ok {path} {time.monotonic() - t0:.1f} s", flush=True)
sys.exit(1 if failed else 0)
"""


def _clean_env(home: Path, venv: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NBAGENT_", "JUPYTER", "IPYTHON", "PYTHON", "VIRTUAL_ENV"))
        and k != "OPENAI_API_KEY"
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["JUPYTER_DATA_DIR"] = str(home / "jupyter-data")
    env["JUPYTER_CONFIG_DIR"] = str(home / "jupyter-config")
    env["JUPYTER_RUNTIME_DIR"] = str(home / "jupyter-runtime")
    env["IPYTHONDIR"] = str(home / "ipython")
    env["MPLCONFIGDIR"] = str(home / "mpl")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc  # type: ignore[no-any-return]


def test_binder_files() -> None:
    post = ROOT / "binder/postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    assert "set -euo pipefail" in post.read_text()
    reqs = [
        line.strip()
        for line in (ROOT / "binder/requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    unpinned = [r for r in reqs if "==" not in r]
    assert not unpinned, f"binder/requirements.txt must pin every package: {unpinned}"
    assert not any(r.lower().startswith("nbagent") for r in reqs), "postBuild installs nbagent"
    runtime = (ROOT / "binder/runtime.txt").read_text().strip()
    assert runtime.startswith("python-3."), runtime
    assert not (ROOT / "binder/environment.yml").exists(), "environment.yml would win over pip"


def test_lessons_run_in_a_binder_like_environment(tmp_path: Path) -> None:
    runtime = (ROOT / "binder/runtime.txt").read_text().strip().removeprefix("python-")
    if f"{sys.version_info.major}.{sys.version_info.minor}" != runtime:
        pytest.skip(f"binder/runtime.txt asks for Python {runtime}; this is {sys.version}")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORE)
    venv, home = tmp_path / "venv", tmp_path / "home"
    home.mkdir()
    env = _clean_env(home, venv)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, "-r", "binder/requirements.txt"], cwd=repo, env=env)
    _run(["bash", "binder/postBuild"], cwd=repo, env=env)
    t1 = time.monotonic()
    # nbagent comes from the repository copy (postBuild's editable install), not from /work
    where = _run([str(venv / "bin/python"), "-c", "import nbagent; print(nbagent.__file__)"],
                 cwd=home, env=env).stdout.strip()  # fmt: skip
    assert where.startswith(str(repo)), where
    notebooks = sorted(str(p.relative_to(repo)) for p in (repo / "notebooks").glob("*.ipynb"))
    assert notebooks, "no lesson notebooks"
    proc = subprocess.run(
        [str(venv / "bin/python"), "-c", RUN_LESSONS, *notebooks],
        cwd=repo, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(f"binder venv {t1 - t0:.0f} s, lessons {time.monotonic() - t1:.0f} s\n{proc.stdout}")
    assert proc.returncode == 0, f"lessons failed in the Binder environment:\n{proc.stdout[-8000:]}"


def test_repo2docker_reads_the_binder_folder(tmp_path: Path) -> None:
    venv = tmp_path / "r2d"
    _run([sys.executable, "-m", "venv", str(venv)])
    install = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "jupyter-repo2docker"],
        capture_output=True, text=True,
    )  # fmt: skip
    if install.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"cannot install jupyter-repo2docker under CI:\n{install.stderr[-2000:]}")
        pytest.skip(f"cannot install jupyter-repo2docker: {install.stderr.strip()[-300:]}")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORE)
    proc = _run([str(venv / "bin/repo2docker"), "--no-build", "."], cwd=repo)
    out = proc.stdout + proc.stderr
    runtime = (ROOT / "binder/runtime.txt").read_text().strip().removeprefix("python-")
    assert f"python={runtime}" in out, "repo2docker does not use binder/runtime.txt's Python"
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in out
    assert "./binder/postBuild" in out
    assert "environment.yml" not in out.replace("environment.lock", "")
    # requirements are installed before the repository is copied in: that layer stays cached
    assert out.index("binder/requirements.txt") < out.index("COPY --chown=0:0 src/ ")
