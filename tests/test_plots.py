"""Plots read only the trace: finished, resumed and empty runs."""

from __future__ import annotations

import io
import time
from typing import Any

import matplotlib
import pytest
from matplotlib.figure import Figure

import nbagent
from nbagent._plots import plot_latency, plot_spend, plot_tokens


def call(run: nbagent.Run, step: str, cost: float, **kw: Any) -> None:
    res = run.reserve(cost)
    run.settle(res, cost)
    row = {
        "kind": "llm",
        "step": step,
        "model": "gpt-test",
        "status": "ok",
        "attempt": 1,
        "input_tokens": 1000,
        "cached_tokens": 400,
        "output_tokens": 200,
        "cost_usd": cost,
        "latency_s": 0.5,
    }
    row.update(kw)
    run.record_event(**row)


def finished_run() -> nbagent.Run:
    run = nbagent.Run("plots", max_cost_usd=1.0, max_steps=5)
    for name, n in (("plan", 2), ("act", 3)):
        ex = run.begin(name, 1, "src", {})
        for i in range(n):
            call(run, f"{name}#1", 0.05, latency_s=0.2 * (i + 1))
            time.sleep(0.01)
        ex.commit({}, outputs=[], result=None)
    call(run, "act#1", 0.0, status="error", error="503", latency_s=1.5)
    run.record_event(kind="llm", step="plan#1", status="replayed", replayed=1, cost_usd=0.05)
    return run


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_spend_plot_has_spend_cap_and_steps() -> None:
    run = finished_run()
    fig = plot_spend(run)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "cumulative spend $0.25 / cap $1.00" in ax.get_title()
    labels = [line.get_label() for line in ax.get_lines()]
    assert "spend" in labels and "cap" in labels
    spend_line = next(line for line in ax.get_lines() if line.get_label() == "spend")
    assert spend_line.get_ydata()[-1] == pytest.approx(0.25)  # the replayed call is free
    cap_line = next(line for line in ax.get_lines() if line.get_label() == "cap")
    assert set(cap_line.get_ydata()) == {1.0}
    assert [t.get_text() for t in ax.texts] == ["plan#1", "act#1"]
    assert png(fig).startswith(b"\x89PNG")


def test_latency_plot_by_step() -> None:
    fig = plot_latency(finished_run())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["plan#1", "act#1"]
    assert "6 calls" in ax.get_title()
    points = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert points >= 6
    png(fig)


def test_tokens_plot_stacks_input_cached_output() -> None:
    fig = plot_tokens(finished_run())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["plan#1", "act#1"]
    heights = [p.get_height() for p in ax.patches]
    # plan: 2 calls -> uncached 1200, cached 800, output 400; act: 4 calls (one error)
    assert heights == [1200, 2400, 800, 1600, 400, 800]
    assert "in total" in ax.get_title()
    png(fig)


def test_resumed_run_plots_the_whole_history() -> None:
    finished_run()
    again = nbagent.Run("plots", max_cost_usd=2.0)  # a new process, a raised cap
    ex = again.begin("write", 1, "src", {})
    call(again, "write#1", 0.10)
    ex.commit({}, outputs=[], result=None)
    fig = plot_spend(again)
    ax = fig.axes[0]
    assert "$0.35 / cap $2.00" in ax.get_title()
    cap_line = next(line for line in ax.get_lines() if line.get_label() == "cap")
    assert sorted(set(cap_line.get_ydata())) == [1.0, 2.0]
    assert len(plot_tokens(again).axes[0].get_xticklabels()) == 3


@pytest.mark.parametrize("plot", [plot_spend, plot_latency, plot_tokens])
def test_empty_trace_gives_an_empty_figure(plot: Any) -> None:
    run = nbagent.Run("empty")
    fig = plot(run)
    assert isinstance(fig, Figure)
    assert "no LLM" in fig.axes[0].get_title()
    png(fig)


def test_plots_leave_no_pyplot_figures() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    run = finished_run()
    for plot in (plot_spend, plot_latency, plot_tokens):
        plot(run)
    assert plt.get_fignums() == before
    assert matplotlib.get_backend()  # whatever it is, it was not needed


def test_magic_plot_returns_a_figure(ip: Any) -> None:
    finished_run()
    ip.run_line_magic("nbagent", "start plots --no-dashboard")
    fig = ip.run_line_magic("nbagent", "plot spend")
    assert isinstance(fig, Figure)
    to_png = ip.display_formatter.formatters["image/png"].lookup(fig)  # used by a kernel
    png_bytes = to_png(fig)
    assert png_bytes and png_bytes.startswith(b"\x89PNG")
