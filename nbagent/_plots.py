"""Plots of a run, read from its trace only, so they work for finished and resumed runs.

Each function returns a :class:`matplotlib.figure.Figure` made with the
object-oriented API (``Figure()``, never ``pyplot``): no global figure is
created, nothing needs closing, no ``plt.show()`` runs, and the active backend
does not matter (rendering uses Agg). In IPython a PNG formatter for
``Figure`` is registered so a returned figure shows as a cell's value.

* :func:`plot_spend` — cumulative spend over time against the cap line (the
  cap's history, from the trace's cap rows), steps shaded and labelled;
* :func:`plot_latency` — latency of each call, by step;
* :func:`plot_tokens` — tokens per step, stacked: uncached input, cached
  input, output (cached tokens are part of the input tokens).

Replayed calls cost nothing and used no tokens, so they are left out.
An empty trace gives an empty figure with a clear title, not an error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ._engine import format_usd

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ._engine import Run


def _figure(width: float = 8.0, height: float = 4.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    _register_formatter()
    return fig


def _register_formatter() -> None:
    """Let IPython show a pyplot-free Figure as PNG (once per shell)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters.get("image/png")
    if formatter is None:
        return
    try:
        formatter.lookup_by_type(Figure)
        return
    except KeyError:
        pass
    from IPython.core.pylabtools import print_figure

    formatter.for_type(Figure, lambda fig: print_figure(fig, "png"))


def _empty(fig: Figure, title: str) -> Figure:
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data in the trace yet", ha="center", va="center", color="#777")
    ax.set_axis_off()
    return fig


def _calls(frame: pd.DataFrame, kind: str = "llm") -> pd.DataFrame:
    """Calls that really happened (not replayed, not refused by a cap)."""
    if frame.empty:
        return frame
    calls = frame[(frame["kind"] == kind) & ~frame["replayed"].astype(bool)]
    return calls[~calls["status"].isin(["replayed", "refused"])]


def _step_order(frame: pd.DataFrame) -> list[str]:
    steps = frame["step"].dropna()
    return list(dict.fromkeys(steps.astype(str)))


def plot_spend(run: Run) -> Figure:
    """Cumulative spend over time against the cap, with steps marked."""
    import matplotlib.dates as mdates

    frame = run.trace()
    fig = _figure()
    calls = _calls(frame)
    calls = calls[calls["cost_usd"].notna()] if not calls.empty else calls
    if calls.empty:
        return _empty(fig, f"run {run.name!r}: no LLM spend yet")
    ax = fig.add_subplot()
    ts = calls["ts"]
    spend = calls["cost_usd"].astype(float).cumsum()
    start = frame["ts"].min()
    x = [start, *ts]
    y = [0.0, *spend]
    ax.step(x, y, where="post", color="#1565c0", label="spend")
    ax.plot(x[-1:], y[-1:], "o", color="#1565c0")

    caps = _cap_history(frame)
    if caps:
        end = max(frame["ts"].max(), ts.max())
        cx = [t for t, _ in caps] + [end]
        cy = [v for _, v in caps] + [caps[-1][1]]
        ax.step(cx, cy, where="post", color="#c62828", linestyle="--", label="cap")

    steps = frame[(frame["kind"] == "step") & frame["status"].isin(["done", "failed"])]
    import pandas as pd

    for i, (_, row) in enumerate(steps.iterrows()):
        end_t = row["ts"]
        begin_t = end_t - pd.to_timedelta(float(row["latency_s"] or 0.0), unit="s")
        ax.axvspan(begin_t, end_t, color="#90caf9" if i % 2 else "#c8e6c9", alpha=0.3, lw=0)
        ax.annotate(
            str(row["step"]),
            (end_t, 0),
            xycoords=("data", "axes fraction"),
            xytext=(2, 4),
            textcoords="offset points",
            rotation=90,
            fontsize=7,
            color="#555",
        )
    total = float(spend.iloc[-1])
    cap_text = f" / cap {format_usd(caps[-1][1])}" if caps else ""
    ax.set_title(f"run {run.name!r}: cumulative spend {format_usd(total)}{cap_text}")
    ax.set_ylabel("USD")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.legend(loc="upper left")
    return fig


def _cap_history(frame: pd.DataFrame) -> list[tuple[Any, float]]:
    """(time, usd cap) at each recorded cap change that set a cost cap."""
    out: list[tuple[Any, float]] = []
    rows = frame[(frame["kind"] == "cap") & (frame["status"] == "changed")]
    for _, row in rows.iterrows():
        try:
            detail = json.loads(row["detail"]) if isinstance(row["detail"], str) else {}
        except ValueError:
            continue
        usd = (detail.get("new") or {}).get("usd")
        if usd is not None:
            out.append((row["ts"], float(usd)))
    return out


def plot_latency(run: Run) -> Figure:
    """Latency of each LLM call, by step (errors in red)."""
    frame = run.trace()
    fig = _figure()
    calls = _calls(frame)
    calls = calls[calls["latency_s"].notna()] if not calls.empty else calls
    if calls.empty:
        return _empty(fig, f"run {run.name!r}: no LLM calls yet")
    ax = fig.add_subplot()
    order = _step_order(calls.assign(step=calls["step"].fillna("(no step)")))
    for i, step in enumerate(order):
        group = calls[calls["step"].fillna("(no step)").astype(str) == step]
        n = len(group)
        offsets = [(k - (n - 1) / 2) * (0.6 / max(n, 1)) for k in range(n)]
        colors = ["#c62828" if s != "ok" else "#1565c0" for s in group["status"]]
        ax.scatter([i + o for o in offsets], group["latency_s"].astype(float), c=colors, s=18)
        ax.hlines(float(group["latency_s"].median()), i - 0.3, i + 0.3, color="#555", linewidth=1)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_ylabel("latency (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"run {run.name!r}: latency per LLM call by step ({len(calls)} calls)")
    return fig


def plot_tokens(run: Run) -> Figure:
    """Tokens per step, stacked: uncached input, cached input, output."""
    frame = run.trace()
    fig = _figure()
    calls = _calls(frame)
    if calls.empty:
        return _empty(fig, f"run {run.name!r}: no LLM calls yet")
    calls = calls.assign(step=calls["step"].fillna("(no step)").astype(str))
    cols = ["input_tokens", "cached_tokens", "output_tokens"]
    sums = calls.groupby("step", sort=False)[cols].sum(min_count=0).fillna(0)
    sums = sums.reindex(_step_order(calls))
    ax = fig.add_subplot()
    x = list(range(len(sums)))
    cached = sums["cached_tokens"].astype(float)
    uncached = (sums["input_tokens"].astype(float) - cached).clip(lower=0)
    output = sums["output_tokens"].astype(float)
    ax.bar(x, uncached, label="input (uncached)", color="#1565c0")
    ax.bar(x, cached, bottom=uncached, label="input (cached)", color="#90caf9")
    ax.bar(x, output, bottom=uncached + cached, label="output", color="#ef6c00")
    ax.set_xticks(x, list(sums.index), rotation=30, ha="right")
    ax.set_ylabel("tokens")
    total = int((uncached + cached + output).sum())
    ax.set_title(f"run {run.name!r}: tokens per step ({total:,} in total)")
    ax.legend()
    return fig


__all__ = ["plot_latency", "plot_spend", "plot_tokens"]
