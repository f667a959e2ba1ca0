"""The dashboard in a real browser: JupyterLab on localhost + headless Chromium (Playwright).

Runs a small agent notebook twice (restarting the kernel in between) and
checks the rendered DOM: the spend text and the bar width match the run's
spend, the steps show done then replayed, the trace table has the calls.
Screenshots go to ``test-artifacts/`` (gitignored).

Needs Debian's Chromium (``apt-get install -y chromium``; ``playwright
install`` cannot download browsers on these machines). Without it the test
skips, except under CI (``CI=true``) where it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbagent
from nbagent import format_usd

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]

pytestmark = pytest.mark.slow


def _need(condition: bool, message: str) -> None:
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


# The notebook: a small agent on nbagent's traced client over the simulated LLM, so the
# dashboard shows what the real client records (reservations, trace rows, llm_call events).
SETUP = """\
%load_ext nbagent
import nbagent
"""
START = "%nbagent start demo --cap-usd 0.50 --max-steps 10"
HELPER = """\
# a made-up model with a price of its own, so the spend bar moves visibly
client = nbagent.simulated_client(
    model="demo-model",
    prices={"demo-model": {"input_per_mtok": 1000, "output_per_mtok": 1000}},
    replies=lambda req: "answer to " + req["messages"][-1]["content"],
)


def fake_llm(prompt, max_tokens=50):
    reply = client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    return reply.choices[0].message.content
"""
PLAN = """\
%%step plan
plan = [fake_llm(f"part {i}") for i in range(3)]
"""
WRITE = """\
%%step write
text = " / ".join(fake_llm(p, 30) for p in plan[:2])
"""
LAST = 'print("SPEND=" + nbagent.format_usd(nbagent.current_run().spend_usd))'


def notebook() -> dict[str, Any]:
    cells = [
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": src,
        }
        for src in (SETUP, START, HELPER, PLAN, WRITE, LAST)
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server on localhost with private config, data and runtime folders."""
    _need(
        CHROMIUM.exists(),
        f"{CHROMIUM} is missing: install Debian's chromium with "
        "`apt-get update && apt-get install -y chromium`",
    )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need(False, "playwright is not installed: `pip install playwright`")
    home = tmp_path / "home"
    root = tmp_path / "nb"
    for d in (home, root):
        d.mkdir()
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("NBAGENT_WIDGETS", None)
    spec = home / "data" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3",
                "language": "python",
            }
        )
    )
    # render every cell (no virtual scrolling), so the DOM holds all outputs
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = settings.parent / "apputils-extension"
    news.mkdir()
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    (root / "demo.ipynb").write_text(json.dumps(notebook()))
    port, token = free_port(), secrets.token_hex(16)
    log = (tmp_path / "lab.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--allow-root",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:]
                )
            time.sleep(0.3)
        yield f"{base}/lab/tree/demo.ipynb?token={token}", tmp_path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with_kill = proc.poll() is None
            if with_kill:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


RUN_ALL = """async () => {
  const app = window.jupyterapp;
  const nb = app.shell.currentWidget;
  await nb.context.sessionContext.ready;
  app.shell.activateById(nb.id);
  await app.commands.execute('notebook:clear-all-cell-outputs');
  await app.commands.execute('notebook:run-all-cells');
}"""

RESTART = """async () => {
  const nb = window.jupyterapp.shell.currentWidget;
  await nb.context.sessionContext.session.kernel.restart();
}"""

LAST_OUTPUT_HAS_SPEND = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content) return false;
  const cells = nb.content.widgets;
  const last = cells[cells.length - 1];
  return last.node.innerText.includes('SPEND=');
}"""

READ_DOM = """() => {
  const dash = document.querySelector('.nbagent-dashboard');
  if (!dash) return null;
  const q = (sel) => dash.querySelector(sel);
  const steps = [...dash.querySelectorAll('.nbagent-steps-row')].map(r => [
      r.querySelector('td').textContent,
      r.querySelector('.nbagent-state').dataset.state]);
  return {
    spend: q('.nbagent-spend') && q('.nbagent-spend').textContent,
    level: q('.nbagent-spend') && q('.nbagent-spend').dataset.level,
    bar: q('.widget-hprogress .progress-bar') && q('.widget-hprogress .progress-bar').style.width,
    steps: steps,
    trace: [...dash.querySelectorAll('.nbagent-trace-row')].map(r => r.innerText),
    text: document.querySelector('.jp-Notebook').innerText,
  };
}"""


def run_notebook(page: Any) -> dict[str, Any]:
    page.evaluate(RUN_ALL)
    page.wait_for_function(LAST_OUTPUT_HAS_SPEND, timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    time.sleep(1.0)  # the dashboard's trailing flush (0.1 s) and a tick or two
    dom = page.evaluate(READ_DOM)
    assert dom is not None, "no dashboard in the page"
    return dom


def check_meter(dom: dict[str, Any], run: nbagent.Run) -> None:
    assert dom["spend"] == f"{format_usd(run.spend_usd)} / {format_usd(0.50)}"
    assert 0.02 < run.spend_usd < 0.40  # the bar is visibly filled, well under the cap
    width = float(dom["bar"].rstrip("%"))
    assert width == pytest.approx(100 * run.spend_usd / 0.50, abs=0.5)
    assert dom["level"] == "ok"


def test_dashboard_in_jupyterlab(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import sync_playwright

    url, tmp = lab
    ARTIFACTS.mkdir(exist_ok=True)
    run = nbagent.Run("demo", activate=False)  # the same store the kernel uses (NBAGENT_DIR)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.context",
                timeout=90_000,
            )
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000
            )

            # first run: the steps execute
            dom = run_notebook(page)
            spend = run.spend_usd
            assert spend > 0 and run.llm_calls == 5
            check_meter(dom, run)
            assert dom["steps"] == [["plan#1", "done"], ["write#1", "done"]]
            assert len(dom["trace"]) == 5
            assert all("demo-model" in row and "ok" in row for row in dom["trace"])
            assert "✓ step 'plan' done" in dom["text"]
            assert "✓ step 'write' done" in dom["text"]
            page.locator(".nbagent-dashboard").screenshot(
                path=str(ARTIFACTS / "dashboard-run1.png")
            )

            # a kernel restart, then the same notebook again: the steps replay for free
            page.evaluate(RESTART)
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000
            )
            dom = run_notebook(page)
            assert run.spend_usd == spend and run.llm_calls == 5  # nothing paid twice
            check_meter(dom, run)
            assert dom["steps"] == [["plan#1", "replayed"], ["write#1", "replayed"]]
            assert len(dom["trace"]) == 5  # the whole history, read from the store
            assert "↺ replayed step 'plan' from disk" in dom["text"]

            # a call's prompt and response on click (rows read back from the store)
            dash = page.locator(".nbagent-dashboard")
            dash.locator("select").nth(1).select_option(index=1)  # the newest call
            detail = dash.locator(".nbagent-detail")
            detail.wait_for(timeout=10_000)
            assert "part 1" in detail.inner_text() and "answer to" in detail.inner_text()
            dash.screenshot(path=str(ARTIFACTS / "dashboard.png"))

            # the controls act through the public API, recorded in the trace
            dash.get_by_role("button", name="Stop run").click()
            dash.locator(".nbagent-stopped").wait_for(timeout=10_000)
            assert run.stopped == "stopped from the dashboard"
            dash.get_by_role("button", name="Resume run").click()
            dash.locator(".nbagent-stopped").wait_for(state="detached", timeout=10_000)
            assert run.stopped is None
            controls = run.trace().query("kind == 'control'")["name"].tolist()
            assert controls == ["stop", "resume"]
            page.screenshot(path=str(ARTIFACTS / "dashboard-page.png"), full_page=True)
        finally:
            browser.close()
