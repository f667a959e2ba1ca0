"""The live dashboard and the per-step status line (ipywidgets), with text fallbacks.

Three layers, kept apart (as rich and tqdm do):

* :class:`DashboardState` is plain data: steps, recent calls, alerts and the
  run's counters. Engine events (``run.subscribe``) are folded into it by
  :meth:`DashboardState.apply`, which is cheap and thread-safe; its initial
  value is built from ``run.status()`` and ``run.trace()``, so a dashboard
  shown again after a kernel restart shows the run's whole history.
* Pure renderers turn a state into text (``lines()``) or HTML fragments.
* :class:`Dashboard` holds the widgets. Events never touch a widget: they mark
  the state dirty and poke a :class:`Throttle`, which flushes the state into
  the widgets (inside ``hold_sync()``, so one comm message per changed
  widget) at most once per :data:`FLUSH_INTERVAL_S` — the first event after a
  quiet period flushes at once, later ones are coalesced into one trailing
  flush run by a ``threading.Timer``. Whatever the event rate, the dashboard
  makes at most 10 flushes per second. Widget traits may be set from any
  thread; nothing here ever calls ``display()`` from a background thread.

Front-end detection lives in one function, :func:`widgets_available`. Without
a widget front-end (plain IPython, a terminal, ``nbagent run``) or without
ipywidgets, :func:`show_dashboard` prints a concise text summary instead and
:func:`step_status_line` prints one summary line when the step ends.

Busy detection: the kernel handles widget clicks between cells, so a click
made while a cell runs waits until that cell ends. The dashboard knows a step
cell is running from the engine's ``step_started`` event (until its
``step_done`` / ``step_failed``) and then says so beside the controls;
interrupting the kernel stays the way to stop a running cell.

Projection of the final cost: ``rate = spend / steps executed`` (the average
cost of an executed step so far; replays are free and not counted). With
``max_steps`` set, ``projected = spend + rate * (max_steps - steps executed)``:
what the run costs if it uses its whole step budget at the same rate. When
the projection exceeds the cost cap the meter says after about how many more
steps the cap stops the run. Without ``max_steps`` only the rate and the number
of steps the cap still allows are shown.
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._engine import Run, format_duration, format_usd

log = logging.getLogger("nbagent")

#: minimum time between two flushes of one dashboard (10 per second at most)
FLUSH_INTERVAL_S = 0.1
#: how often a running step's elapsed time and a retry countdown tick
TICK_S = 0.5
#: recent calls kept in memory for the trace table (older ones stay in the store)
TRACE_KEEP = 2000
#: rows per page of the trace table
PAGE_SIZE = 10
#: spend / cap ratio from which the meter turns amber
AMBER_AT = 0.8

_ALL = "(all steps)"

_MISSING_WIDGETS = (
    "nbagent: the live dashboard needs ipywidgets, which is not installed in this kernel "
    "(`pip install ipywidgets`, then restart the kernel); showing text instead."
)
_warned_missing = False


# -- front-end detection (the one place that decides) ------------------------------


def widgets_available() -> bool:
    """True when widgets can render: ipywidgets imports and the shell is a Jupyter kernel.

    ``NBAGENT_WIDGETS=0`` forces text, ``NBAGENT_WIDGETS=1`` forces widgets
    (tests). A missing ipywidgets prints one actionable message, once.
    """
    global _warned_missing
    forced = os.environ.get("NBAGENT_WIDGETS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            print(_MISSING_WIDGETS, file=sys.stderr)
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    shell = _shell()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    return get_ipython()


def _display(obj: Any) -> None:
    """Display on the calling thread; refuses (logs) when called from a background thread."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("nbagent: not displaying %r from a background thread", type(obj).__name__)
        return
    from IPython.display import display

    display(obj)


# -- state as data -----------------------------------------------------------------


@dataclass
class StepRow:
    """One step in the steps table."""

    step_id: str
    name: str
    #: pending, running, retrying, done, replayed, failed, interrupted, skipped (cap)
    state: str = "pending"
    attempts: int = 0
    duration_s: float | None = None
    llm_calls: int = 0
    cost_usd: float = 0.0
    #: wall-clock time the current execution started (for the elapsed time)
    started_ts: float | None = None
    #: wall-clock time the next attempt starts (retry countdown), and what retries
    retry_until: float | None = None
    retry_what: str = ""
    error: str | None = None

    def shown_state(self, now: float) -> str:
        if self.state in ("running", "retrying"):
            if self.retry_until is not None and self.retry_until > now:
                left = math.ceil(self.retry_until - now)
                return f"retrying ({self.retry_what}) in {left} s"
            return "running"
        return self.state

    def shown_duration(self, now: float) -> str:
        if self.state in ("running", "retrying") and self.started_ts is not None:
            return f"{max(0.0, now - self.started_ts):.0f} s"
        return format_duration(self.duration_s) if self.duration_s is not None else ""


@dataclass
class CallRow:
    """One LLM call attempt or tool call in the trace table."""

    seq: int | None
    ts: float
    step: str | None
    kind: str  # "llm" or "tool"
    name: str | None  # the model, or the tool's name
    attempt: int | None
    status: str | None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    replayed: bool = False
    error: str | None = None

    def label(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.ts))
        cost = format_usd(self.cost_usd or 0.0)
        return (
            f"#{self.seq if self.seq is not None else '?'} {when} {self.step or '-'} "
            f"{self.kind} {self.name or ''} a{self.attempt or 1} {self.status or ''} {cost}"
        )


@dataclass
class Projection:
    rate_usd_per_step: float | None
    projected_usd: float | None
    steps_left_by_cap: int | None

    def text(self, cap: float | None, max_steps: int | None) -> str:
        if self.rate_usd_per_step is None:
            return "projection: after the first executed step"
        parts = [f"{format_usd(self.rate_usd_per_step)}/step"]
        if self.projected_usd is not None:
            parts.append(f"projected {format_usd(self.projected_usd)} at max_steps={max_steps}")
        if self.steps_left_by_cap is not None and (
            self.projected_usd is None or (cap is not None and self.projected_usd > cap)
        ):
            parts.append(f"cap allows ≈{self.steps_left_by_cap} more steps")
        return " · ".join(parts)


def _i(v: Any) -> int | None:
    if v is None:
        return None
    try:
        if isinstance(v, float) and math.isnan(v):
            return None
        return int(v)
    except (TypeError, ValueError):
        return None


def _f(v: Any) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _s(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def _ts(v: Any) -> float:
    if hasattr(v, "timestamp"):
        return float(v.timestamp())
    return _f(v) or time.time()


@dataclass
class DashboardState:
    """Everything the dashboard shows, as data. ``apply`` is thread-safe."""

    run: str
    steps: dict[str, StepRow] = field(default_factory=dict)
    calls: deque[CallRow] = field(default_factory=lambda: deque(maxlen=TRACE_KEEP))
    alerts: list[dict[str, Any]] = field(default_factory=list)
    #: a call or step was refused by a cap (cleared when a cap changes)
    refused: bool = False
    #: the step running now (seen via step_started), or None
    running: str | None = None
    stopped: str | None = None
    spend_usd: float = 0.0
    reserved_usd: float = 0.0
    max_cost_usd: float | None = None
    steps_executed: int = 0
    max_steps: int | None = None
    llm_calls: int = 0
    max_llm_calls: int | None = None
    #: bumped by every change (a flush with an unchanged version does nothing new)
    version: int = 0
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- building -------------------------------------------------------------

    @classmethod
    def from_run(cls, run: Run) -> DashboardState:
        """The run's whole history, from its trace and its stored steps."""
        state = cls(run=run.name)
        try:
            frame = run.trace()
            records = frame.reset_index().to_dict("records")
        except Exception:  # a trace that cannot be read must not hide the rest
            log.exception("nbagent dashboard: cannot read the trace of run %s", run.name)
            records = []
        for r in records:
            state._apply_row(r)
        for row in state.steps.values():
            if row.state in ("running", "retrying"):
                row.state, row.retry_until = "interrupted", None
        status = run.status()
        for s in status.steps:
            row = state._step(s.step_id, s.name)
            if row.state == "pending":
                row.state = "done"
            if row.state in ("done", "replayed"):
                row.duration_s = s.duration_s
                row.llm_calls = s.llm_calls
                row.cost_usd = s.cost_usd
        state.running = None
        state.refresh_from(run)
        return state

    def _step(self, step_id: str, name: str | None = None) -> StepRow:
        row = self.steps.get(step_id)
        if row is None:
            row = self.steps[step_id] = StepRow(step_id, name or step_id.split("#", 1)[0])
        return row

    def _apply_row(self, r: dict[str, Any]) -> None:
        kind, status, step = _s(r.get("kind")), _s(r.get("status")), _s(r.get("step"))
        ts = _ts(r.get("ts"))
        if kind in ("llm", "tool"):
            self._add_call(
                CallRow(
                    seq=_i(r.get("seq")),
                    ts=ts,
                    step=step,
                    kind=kind,
                    name=_s(r.get("model")) if kind == "llm" else _s(r.get("name")),
                    attempt=_i(r.get("attempt")),
                    status=status,
                    input_tokens=_i(r.get("input_tokens")),
                    cached_tokens=_i(r.get("cached_tokens")),
                    output_tokens=_i(r.get("output_tokens")),
                    cost_usd=_f(r.get("cost_usd")),
                    latency_s=_f(r.get("latency_s")),
                    replayed=bool(r.get("replayed")) or status == "replayed",
                    error=_s(r.get("error")),
                )
            )
        elif kind == "step" and step:
            row = self._step(step, _s(r.get("name")))
            attempt = _i(r.get("attempt"))
            if status in ("done", "failed", "interrupted"):
                row.state = status
                row.attempts = attempt or row.attempts or 1
                row.duration_s = _f(r.get("latency_s"))
                row.error = _s(r.get("error"))
                row.retry_until = None
            elif status == "replayed":
                row.state = "replayed"
            elif status == "retrying":
                row.state = "retrying"
                row.attempts = (attempt or 0) + 1
            elif status == "takeover":
                row.state = "running"
        elif kind == "cap":
            if status == "refused":
                self.refused = True
                if step and _s(r.get("name")) == "max_steps":
                    self._step(step).state = "skipped (cap)"
                    self.alerts.append(
                        {"ts": ts, "kind": "cap", "step": step, "message": _s(r.get("error"))}
                    )
            elif status == "changed":
                self.refused = False
        elif kind == "alert":
            self.alerts.append(
                {"ts": ts, "kind": _s(r.get("name")), "step": step, "message": _s(r.get("error"))}
            )
        elif kind == "control" and status == "reset":
            import json

            detail = r.get("detail")
            try:
                ids = json.loads(detail).get("steps", []) if isinstance(detail, str) else []
            except ValueError:
                ids = []
            self._reset(ids)

    def _reset(self, ids: Iterable[str]) -> None:
        for step_id in ids:
            row = self.steps.get(step_id)
            if row is not None:
                row.state, row.retry_until, row.error = "pending", None, None

    def _add_call(self, call: CallRow) -> None:
        self.calls.append(call)

    def refresh_from(self, run: Run) -> None:
        """Counters, caps and the stop switch, read from the store (authoritative)."""
        caps = run.caps
        values = {
            "spend_usd": run.spend_usd,
            "reserved_usd": run.reserved_usd,
            "max_cost_usd": caps.get("usd"),
            "steps_executed": run.steps_executed,
            "max_steps": caps.get("steps"),
            "llm_calls": run.llm_calls,
            "max_llm_calls": caps.get("llm_calls"),
            "stopped": run.stopped,
        }
        with self.lock:
            for key, value in values.items():
                if getattr(self, key) != value:
                    setattr(self, key, value)
                    self.version += 1

    # -- events ---------------------------------------------------------------

    def apply(self, ev: dict[str, Any]) -> None:
        """Fold one engine event into the state (any thread)."""
        with self.lock:
            self.events += 1
            self.version += 1
            self._apply(ev)

    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        ts = _f(ev.get("ts")) or time.time()
        step = ev.get("step")
        if kind == "llm_call" or kind == "tool_call":
            status = ev.get("status")
            replayed = bool(ev.get("replayed")) or status == "replayed"
            is_llm = kind == "llm_call"
            self._add_call(
                CallRow(
                    seq=_i(ev.get("seq")),
                    ts=ts,
                    step=step,
                    kind="llm" if is_llm else "tool",
                    name=ev.get("model") if is_llm else ev.get("name"),
                    attempt=_i(ev.get("attempt")),
                    status=status,
                    input_tokens=_i(ev.get("input_tokens")),
                    cached_tokens=_i(ev.get("cached_tokens")),
                    output_tokens=_i(ev.get("output_tokens")),
                    cost_usd=_f(ev.get("cost_usd")),
                    latency_s=_f(ev.get("latency_s")),
                    replayed=replayed,
                    error=_s(ev.get("error")),
                )
            )
            if is_llm and status == "refused":
                self.refused = True
            if step and is_llm:
                row = self._step(step)
                if status in ("ok", "error") and not replayed:
                    row.llm_calls += 1
                    row.cost_usd += _f(ev.get("cost_usd")) or 0.0
                if row.retry_until is not None and row.retry_what.startswith("call"):
                    row.retry_until = None
        elif kind == "llm_retrying":
            if step:
                row = self._step(step)
                row.retry_until = ts + (_f(ev.get("wait_s")) or 0.0)
                row.retry_what = f"call attempt {(_i(ev.get('attempt')) or 1) + 1}"
                if row.state not in ("running", "retrying"):
                    row.state = "running"
        elif kind == "step_started" and step:
            row = self._step(step, ev.get("name"))
            row.state, row.attempts, row.started_ts = "running", 1, ts
            row.llm_calls, row.cost_usd, row.duration_s = 0, 0.0, None
            row.retry_until, row.error = None, None
            self.running = step
        elif kind in ("step_done", "step_replayed") and step:
            rec = ev.get("record") or {}
            row = self._step(step, ev.get("name"))
            row.state = "done" if kind == "step_done" else "replayed"
            row.attempts = _i(rec.get("attempts")) or row.attempts or 1
            row.duration_s = _f(rec.get("duration_s"))
            row.llm_calls = _i(rec.get("llm_calls")) or 0
            row.cost_usd = _f(rec.get("cost_usd")) or 0.0
            row.retry_until, row.error = None, None
            if self.running == step:
                self.running = None
        elif kind == "step_failed" and step:
            row = self._step(step, ev.get("name"))
            error = ev.get("error")
            interrupted = isinstance(error, KeyboardInterrupt)
            row.state = "interrupted" if interrupted else "failed"
            row.error = f"{type(error).__name__}: {error}" if error is not None else None
            if row.started_ts is not None:
                row.duration_s = ts - row.started_ts
            row.retry_until = None
            if self.running == step:
                self.running = None
        elif kind == "step_retrying" and step:
            row = self._step(step, ev.get("name"))
            attempt = _i(ev.get("attempt")) or 1
            row.state, row.attempts = "retrying", attempt + 1
            row.retry_until = ts + (_f(ev.get("wait_s")) or 0.0)
            row.retry_what = f"step attempt {attempt + 1}"
            error = ev.get("error")
            row.error = f"{type(error).__name__}: {error}" if error is not None else None
        elif kind == "cap_refused":
            self.refused = True
            if ev.get("cap") == "steps" and step:
                self._step(step).state = "skipped (cap)"
                self.alerts.append(
                    {"ts": ts, "kind": "cap", "step": step, "message": ev.get("message")}
                )
        elif kind == "cap_changed":
            self.refused = False
            new = ev.get("new") or {}
            self.max_cost_usd = new.get("usd", self.max_cost_usd)
            self.max_steps = new.get("steps", self.max_steps)
            self.max_llm_calls = new.get("llm_calls", self.max_llm_calls)
        elif kind == "alert":
            self.alerts.append(
                {
                    "ts": ts,
                    "kind": ev.get("kind"),
                    "step": step,
                    "message": ev.get("message"),
                }
            )
        elif kind == "stopped":
            self.stopped = ev.get("reason") or "stopped"
        elif kind == "resumed":
            self.stopped = None
        elif kind == "reset":
            self._reset(ev.get("steps") or [])

    # -- derived values -------------------------------------------------------

    def fraction(self) -> float:
        """Spend / cap in [0, 1] (0 without a cap)."""
        if not self.max_cost_usd:
            return 1.0 if self.max_cost_usd == 0 and self.spend_usd > 0 else 0.0
        return min(1.0, max(0.0, self.spend_usd / self.max_cost_usd))

    def level(self) -> str:
        """``ok``, ``amber`` (>= 80% of the cap) or ``red`` (a call was refused)."""
        if self.refused:
            return "red"
        if self.max_cost_usd is not None and (
            self.max_cost_usd == 0 or self.spend_usd >= AMBER_AT * self.max_cost_usd
        ):
            return "amber"
        return "ok"

    def spend_text(self) -> str:
        cap = format_usd(self.max_cost_usd) if self.max_cost_usd is not None else "no cap"
        return f"{format_usd(self.spend_usd)} / {cap}"

    def projection(self) -> Projection:
        if self.steps_executed <= 0 or self.spend_usd <= 0:
            return Projection(None, None, None)
        rate = self.spend_usd / self.steps_executed
        projected = None
        if self.max_steps is not None:
            projected = self.spend_usd + rate * max(0, self.max_steps - self.steps_executed)
        left = None
        if self.max_cost_usd is not None:
            left = max(0, math.floor((self.max_cost_usd - self.spend_usd) / rate + 1e-9))
        return Projection(rate, projected, left)

    def busy_note(self) -> str:
        if self.running is None:
            return ""
        return (
            f"step {self.running!r} is running: clicks wait until its cell ends "
            "(the kernel handles widget events between cells). Interrupt the kernel (■) "
            "to stop it now."
        )

    def counters_text(self) -> str:
        steps_cap = self.max_steps if self.max_steps is not None else "∞"
        calls_cap = self.max_llm_calls if self.max_llm_calls is not None else "∞"
        return f"steps {self.steps_executed}/{steps_cap} · LLM calls {self.llm_calls}/{calls_cap}"

    def lines(self, now: float | None = None) -> list[str]:
        """A concise text rendering (the text/plain of the dashboard)."""
        now = time.time() if now is None else now
        level = {"ok": "", "amber": " [≥80% of cap]", "red": " [REFUSED]"}[self.level()]
        out = [
            f"nbagent run {self.run!r}: spend {self.spend_text()}{level} · {self.counters_text()}",
            "  " + self.projection().text(self.max_cost_usd, self.max_steps),
        ]
        if self.stopped:
            out.append(f"  STOPPED: {self.stopped} (resume with `%nbagent resume`)")
        for row in self.steps.values():
            out.append(
                f"  {row.shown_state(now):<14} {row.step_id:<24} {row.shown_duration(now):>8} "
                f"{row.llm_calls:>3} calls {format_usd(row.cost_usd):>9}"
            )
        if not self.steps:
            out.append("  (no steps yet)")
        if self.alerts:
            a = self.alerts[-1]
            out.append(
                f"  {len(self.alerts)} alert{'s' if len(self.alerts) != 1 else ''}, last: "
                f"[{a.get('kind')}] {a.get('message')}"
            )
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


# -- HTML renderers (pure) -----------------------------------------------------------

_STATE_COLORS = {
    "done": "#2e7d32",
    "replayed": "#1565c0",
    "failed": "#c62828",
    "interrupted": "#c62828",
    "skipped (cap)": "#c62828",
    "pending": "#777",
}
_TABLE = (
    'style="border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);'
    'font-size:12px"'
)
_TD = 'style="padding:1px 8px;text-align:{align}"'


def _table(head: list[str], rows: list[list[str]], cls: str, numeric: set[int]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f"<{tag} {_TD.format(align='right' if i in numeric else 'left')}>{v}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f'<tr class="{cls}-row">{cells("td", r)}</tr>' for r in rows)
    return f'<table class="{cls}" {_TABLE}><tr>{cells("th", head)}</tr>{body}</table>'


def render_steps_html(state: DashboardState, now: float) -> str:
    if not state.steps:
        return '<div class="nbagent-steps"><i>no steps yet</i></div>'
    rows = []
    for row in state.steps.values():
        shown = row.shown_state(now)
        color = _STATE_COLORS.get(row.state, "#e65100" if "retrying" in shown else "#000")
        title = f' title="{html.escape(row.error)}"' if row.error else ""
        cost = format_usd(row.cost_usd)
        if row.state == "replayed":
            cost = f'<span title="recorded cost, not charged again">({cost})</span>'
        rows.append(
            [
                html.escape(row.step_id),
                f'<span class="nbagent-state" data-state="{html.escape(row.state)}" '
                f'style="color:{color}"{title}>{html.escape(shown)}</span>',
                str(row.attempts or ""),
                row.shown_duration(now),
                str(row.llm_calls),
                cost,
            ]
        )
    head = ["step", "state", "attempts", "duration", "LLM calls", "cost"]
    return _table(head, rows, "nbagent-steps", {2, 3, 4, 5})


def render_trace_html(calls: list[CallRow], total: int) -> str:
    if not calls:
        return '<div class="nbagent-trace"><i>no calls yet</i></div>'
    rows = []
    for c in calls:
        tokens = (
            f"{c.input_tokens or 0}/{c.cached_tokens or 0}/{c.output_tokens or 0}"
            if c.kind == "llm"
            else ""
        )
        status = html.escape(c.status or "")
        if c.error:
            status = f'<span title="{html.escape(c.error)}" style="color:#c62828">{status}</span>'
        rows.append(
            [
                str(c.seq if c.seq is not None else ""),
                time.strftime("%H:%M:%S", time.localtime(c.ts)),
                html.escape(c.step or "-"),
                str(c.attempt or ""),
                html.escape(f"{c.kind}: {c.name or ''}"),
                tokens,
                format_usd(c.cost_usd or 0.0),
                format_duration(c.latency_s) if c.latency_s is not None else "",
                status,
                "↺" if c.replayed else "",
            ]
        )
    head = ["#", "time", "step", "att.", "model / tool", "in/cached/out", "cost", "latency"]
    return _table([*head, "status", "replayed"], rows, "nbagent-trace", {0, 3, 5, 6, 7})


def render_alerts_html(alerts: list[dict[str, Any]], last: int = 5) -> str:
    if not alerts:
        return '<div class="nbagent-alerts" style="color:#777">no alerts</div>'
    items = "".join(
        f"<li>{time.strftime('%H:%M:%S', time.localtime(a.get('ts') or 0))} "
        f"<b>[{html.escape(str(a.get('kind')))}]</b> step {html.escape(str(a.get('step') or '-'))}: "
        f"{html.escape(str(a.get('message') or ''))}</li>"
        for a in alerts[-last:][::-1]
    )
    more = f" (last {last} of {len(alerts)})" if len(alerts) > last else ""
    return (
        f'<div class="nbagent-alerts" style="color:#b71c1c">alerts{more}:'
        f'<ul style="margin:0">{items}</ul></div>'
    )


def render_meter_html(state: DashboardState) -> str:
    color = {"ok": "#000", "amber": "#e65100", "red": "#c62828"}[state.level()]
    reserved = f" · reserved {format_usd(state.reserved_usd)}" if state.reserved_usd > 0 else ""
    return (
        f'<span class="nbagent-spend" data-level="{state.level()}" '
        f'style="font-weight:bold;color:{color}">{html.escape(state.spend_text())}</span>'
        f'<span class="nbagent-counters"> · {html.escape(state.counters_text())}{reserved}</span>'
        f'<br><span class="nbagent-projection" style="color:#555">'
        f"{html.escape(state.projection().text(state.max_cost_usd, state.max_steps))}</span>"
    )


# -- the throttle ------------------------------------------------------------------


class Throttle:
    """Calls ``flush()`` at most once per ``interval`` seconds, whatever the poke rate.

    The first poke after a quiet period flushes at once on the poking thread
    (leading edge); pokes inside the interval are coalesced into one trailing
    flush run by a ``threading.Timer``. ``poke(delay=...)`` asks for a flush no
    sooner than ``delay`` from now (for ticks). Flushes never overlap.
    """

    def __init__(
        self,
        flush: Callable[[], None],
        interval: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._flush = flush
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last = -math.inf
        self._timer: threading.Timer | None = None
        self._due = math.inf
        self._gen = 0
        self._closed = False
        #: monotonic times of the last flushes (for tests and measurements)
        self.flush_times: deque[float] = deque(maxlen=10_000)

    def poke(self, delay: float = 0.0) -> None:
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            due = max(now + delay, self._last + self.interval)
            if self._timer is not None:
                if self._due <= due:
                    return  # a flush is already planned soon enough
                self._timer.cancel()
                self._timer = None
            if due > now:
                self._gen += 1
                self._due = due
                timer = threading.Timer(due - now, self._fire, args=(self._gen,))
                timer.daemon = True
                self._timer = timer
                timer.start()
                return
            self._last = now
        self._run()

    def _fire(self, gen: int) -> None:
        with self._lock:
            if self._closed or gen != self._gen:
                return
            self._timer = None
            self._due = math.inf
            self._last = self._clock()
        self._run()

    def _run(self) -> None:
        with self._flush_lock:
            self.flush_times.append(self._clock())
            try:
                self._flush()
            except Exception:  # a failed flush must never break a step or a timer
                log.exception("nbagent: dashboard update failed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def max_per_second(self) -> int:
        """The most flushes seen in any one-second window."""
        times = list(self.flush_times)
        best, j = 0, 0
        for i, t in enumerate(times):
            while times[j] <= t - 1.0:
                j += 1
            best = max(best, i - j + 1)
        return best


# -- the dashboard -----------------------------------------------------------------

_box_classes: dict[str, type] = {}


def _text_box(base: str) -> type:
    """An ipywidgets box class whose text/plain is its owner's concise text summary."""
    cls = _box_classes.get(base)
    if cls is None:
        import ipywidgets as w

        parent = getattr(w, base)

        def __repr__(self: Any) -> str:
            owner = getattr(self, "_nbagent_owner", None)
            return owner.text() if owner is not None else parent.__repr__(self)

        def _repr_mimebundle_(self: Any, **kwargs: Any) -> Any:
            data = parent._repr_mimebundle_(self, **kwargs)
            if isinstance(data, dict):
                data["text/plain"] = repr(self)
            return data

        cls = type(
            f"NbagentText{base}",
            (parent,),
            {"__repr__": __repr__, "_repr_mimebundle_": _repr_mimebundle_},
        )
        _box_classes[base] = cls
    return cls


_dashboards: dict[tuple[str, str], Dashboard] = {}


class Dashboard:
    """A live dashboard of one run, built from ipywidgets (``.widget`` is the VBox).

    Displaying it (``display(dash)`` or as a cell's value) shows the widget,
    with a concise text summary as its text/plain.
    """

    def __init__(self, run: Run, *, interval: float = FLUSH_INTERVAL_S) -> None:
        try:
            import ipywidgets as w
        except ImportError:
            from ._errors import NbagentError

            raise NbagentError(_MISSING_WIDGETS.replace("; showing text instead", "")) from None

        self.run = run
        self.state = DashboardState.from_run(run)
        self.page = 0
        self.flushes = 0
        self._shown_version = -1
        self._rows_shown: list[CallRow] = []
        self.throttle = Throttle(self._flush, interval=interval)

        self.title = w.HTML()
        self.bar = w.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=w.Layout(width="320px"), description=""
        )
        self.meter = w.HTML()
        self.steps_html = w.HTML()
        self.step_filter = w.Dropdown(options=[_ALL], value=_ALL, description="step")
        self.newer = w.Button(description="◀ newer", layout=w.Layout(width="90px"))
        self.older = w.Button(description="older ▶", layout=w.Layout(width="90px"))
        self.page_label = w.Label()
        self.trace_html = w.HTML()
        self.row_select = w.Dropdown(
            options=[("(choose a call to see its prompt and response)", -1)],
            value=-1,
            description="call",
            layout=w.Layout(width="640px"),
        )
        self.detail = w.HTML()
        self.alerts_html = w.HTML()
        self.cap_input = w.FloatText(
            value=float(self.state.max_cost_usd or 0.0),
            step=0.5,
            description="cap $",
            layout=w.Layout(width="180px"),
        )
        self.cap_button = w.Button(description="Set cap", button_style="primary")
        self.stop_button = w.Button(description="Stop run", button_style="danger")
        self.resume_button = w.Button(description="Resume run", button_style="success")
        self.message = w.HTML()
        self.busy = w.HTML()

        self.cap_button.on_click(lambda _b: self.set_cap(self.cap_input.value))
        self.stop_button.on_click(lambda _b: self.stop())
        self.resume_button.on_click(lambda _b: self.resume())
        self.newer.on_click(lambda _b: self._turn(-1))
        self.older.on_click(lambda _b: self._turn(+1))
        self.step_filter.observe(lambda _c: self._turn(0, reset=True), names="value")
        self.row_select.observe(lambda c: self._show_detail(c["new"]), names="value")

        def section(label: str) -> Any:
            return w.HTML(f"<b style='font-size:13px'>{label}</b>")

        box = _text_box("VBox")
        self.widget = box(
            [
                self.title,
                w.HBox([self.bar, self.meter]),
                w.HBox([self.cap_input, self.cap_button, self.stop_button, self.resume_button]),
                self.busy,
                self.message,
                section("Steps"),
                self.steps_html,
                section("Trace"),
                w.HBox([self.step_filter, self.newer, self.page_label, self.older]),
                self.trace_html,
                self.row_select,
                self.detail,
                section("Alerts"),
                self.alerts_html,
            ],
            layout=w.Layout(border="1px solid #ddd", padding="6px"),
        )
        self.widget.add_class("nbagent-dashboard")
        self.widget._nbagent_owner = self
        self._flush()
        self._unsubscribe = run.subscribe(self._on_event)

    # -- events -> state -> widgets --------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("run", self.run.name) != self.run.name:
            return
        self.state.apply(event)
        self.throttle.poke()

    def _flush(self) -> None:
        """Copy the state into the widgets (one comm message per changed widget)."""
        state = self.state
        try:
            state.refresh_from(self.run)
        except Exception:  # the store may be closing; show what we have
            log.debug("nbagent dashboard: cannot refresh counters", exc_info=True)
        now = time.time()
        with state.lock:
            title = self._title_html()
            fraction, level = state.fraction(), state.level()
            meter = render_meter_html(state)
            steps = render_steps_html(state, now)
            alerts = render_alerts_html(state.alerts)
            busy = state.busy_note()
            stopped = state.stopped
            step_ids = list(dict.fromkeys([*state.steps, *(c.step for c in state.calls if c.step)]))
            calls = list(state.calls)
            ticking = any(
                r.state in ("running", "retrying") or (r.retry_until or 0) > now
                for r in state.steps.values()
            )
        choice = self.step_filter.value
        if choice != _ALL:
            calls = [c for c in calls if c.step == choice]
        pages = max(1, math.ceil(len(calls) / PAGE_SIZE))
        self.page = min(self.page, pages - 1)
        newest_first = calls[::-1]
        shown = newest_first[self.page * PAGE_SIZE : (self.page + 1) * PAGE_SIZE]
        trace = render_trace_html(shown, len(calls))
        label = f"page {self.page + 1}/{pages} · {len(calls)} calls"
        options = [("(choose a call to see its prompt and response)", -1)] + [
            (c.label(), i) for i, c in enumerate(shown)
        ]
        widgets_ = [
            self.title,
            self.bar,
            self.meter,
            self.steps_html,
            self.alerts_html,
            self.busy,
            self.trace_html,
            self.page_label,
            self.step_filter,
            self.row_select,
            self.stop_button,
            self.resume_button,
        ]
        with contextlib.ExitStack() as stack:
            for widget in widgets_:
                stack.enter_context(widget.hold_sync())
            self.title.value = title
            self.bar.value = fraction
            self.bar.bar_style = {"ok": "info", "amber": "warning", "red": "danger"}[level]
            self.meter.value = meter
            self.steps_html.value = steps
            self.alerts_html.value = alerts
            self.busy.value = (
                f'<span style="color:#e65100">⏳ {html.escape(busy)}</span>' if busy else ""
            )
            self.trace_html.value = trace
            self.page_label.value = label
            wanted = (_ALL, *step_ids)
            if tuple(self.step_filter.options) != wanted:
                self.step_filter.options = wanted
                self.step_filter.value = choice if choice in wanted else _ALL
            if [id(r) for r in shown] != [id(r) for r in self._rows_shown]:
                self._rows_shown = shown
                self.row_select.options = options
                self.row_select.value = -1
            self.stop_button.disabled = stopped is not None
            self.resume_button.disabled = stopped is None
        self.flushes += 1
        if ticking:
            self.throttle.poke(delay=TICK_S)

    def _title_html(self) -> str:
        stopped = (
            f' <span class="nbagent-stopped" style="color:#c62828">STOPPED: '
            f"{html.escape(self.state.stopped)}</span>"
            if self.state.stopped
            else ""
        )
        return (
            f'<b class="nbagent-title">nbagent run {html.escape(self.state.run)}</b> '
            f'<span style="color:#777">({html.escape(str(self.run.store.path))})</span>{stopped}'
        )

    def _turn(self, delta: int, reset: bool = False) -> None:
        self.page = 0 if reset else max(0, self.page + delta)
        self._rows_shown = []  # the next flush lists the page's rows again
        self.throttle.poke()

    def _show_detail(self, index: Any) -> None:
        if not isinstance(index, int) or index < 0 or index >= len(self._rows_shown):
            self.detail.value = ""
            return
        call = self._rows_shown[index]
        self.detail.value = self.detail_html(call)

    def detail_html(self, call: CallRow) -> str:
        """The full prompt and response of a call, read from the store by its seq."""
        request = response = detail = None
        if call.seq is not None:
            cols, rows = self.run.store.trace_rows(self.run.name, since_seq=call.seq - 1)
            if rows and rows[0][0] == call.seq:
                row = dict(zip(cols, rows[0], strict=True))
                request, response, detail = row["request"], row["response"], row["detail"]

        def block(label: str, text: Any) -> str:
            if text is None:
                return f"<div><b>{label}</b>: <i>not recorded</i></div>"
            body = _pretty(text)
            return (
                f"<div><b>{label}</b><pre style='white-space:pre-wrap;max-height:240px;"
                f"overflow:auto;background:#f6f6f6;padding:4px'>{html.escape(body)}</pre></div>"
            )

        head = html.escape(call.label())
        err = f"<div style='color:#c62828'>{html.escape(call.error)}</div>" if call.error else ""
        extra = block("detail", detail) if detail else ""
        return (
            f'<div class="nbagent-detail"><b>{head}</b>{err}'
            f"{block('request', request)}{block('response', response)}{extra}</div>"
        )

    # -- controls (the public API only) -----------------------------------------

    def set_cap(self, usd: float | None) -> None:
        try:
            new = self.run.set_cap(usd=usd, reason="changed from the dashboard")
        except Exception as e:  # shown beside the controls, never swallowed silently
            self._say(f"cap not changed: {e}", error=True)
            return
        cap = format_usd(new["usd"]) if new.get("usd") is not None else "no cap"
        self._say(f"cost cap is now {cap}")

    def stop(self) -> None:
        self.run.stop("stopped from the dashboard")
        self._say("run stopped: the next LLM call or step raises RunStopped")

    def resume(self) -> None:
        self.run.resume()
        self._say("run resumed")

    def _say(self, text: str, error: bool = False) -> None:
        note = self.state.busy_note()
        color = "#c62828" if error else "#2e7d32"
        msg = f'<span style="color:{color}">{html.escape(text)}</span>'
        if note:
            msg += f'<br><span style="color:#e65100">{html.escape(note)}</span>'
        self.message.value = msg
        self.throttle.poke()

    # -- lifetime and display ---------------------------------------------------

    def close(self) -> None:
        """Stop observing the run and close the widgets."""
        self._unsubscribe()
        self.throttle.close()
        for widget in self._all_widgets():
            widget.close()

    def _all_widgets(self) -> list[Any]:
        out: list[Any] = []
        todo = [self.widget]
        while todo:
            widget = todo.pop()
            out.append(widget)
            todo.extend(getattr(widget, "children", ()))
        return out

    def text(self) -> str:
        return self.state.text()

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        data = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(data, dict):
            data["text/plain"] = self.text()
        return data


def _pretty(text: Any) -> str:
    import json

    if isinstance(text, str):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            return text
    return json.dumps(text, indent=2, default=str, ensure_ascii=False)


class TextDashboard:
    """The dashboard without a widget front-end: a concise text summary."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.state = DashboardState.from_run(run)

    def text(self) -> str:
        self.state.refresh_from(self.run)
        return self.state.text()

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())


def show_dashboard(run: Run) -> Dashboard | TextDashboard:
    """Display the live dashboard of ``run`` (or print its text summary without widgets).

    One dashboard per run per process: showing it again closes the previous one.
    """
    if not widgets_available():
        dash_t = TextDashboard(run)
        print(dash_t.text())
        return dash_t
    key = (str(run.store.path), run.name)
    old = _dashboards.pop(key, None)
    if old is not None:
        with contextlib.suppress(Exception):
            old.close()
    dash = _dashboards[key] = Dashboard(run)
    _display(dash)
    return dash


# -- the per-step status line -----------------------------------------------------


class StepLine:
    """A compact live line for one running step: state, attempt, elapsed, calls, cost.

    It follows its step's events, ticks while the step runs, and when the step
    ends (:meth:`finish`, called after the cell by a ``post_run_cell`` hook) it
    hides its widget and prints a static one-line summary, so headless runs
    (whose widget text/plain is frozen at display time) keep the outcome too.
    """

    def __init__(self, run: Run, step_id: str, *, widget: bool = True, lazy: bool = False) -> None:
        self.run = run
        self.step_id = step_id
        self.name = step_id.split("#", 1)[0]
        self.state = "running"
        self.attempt = 1
        self.calls = 0
        self.cost_usd = 0.0
        self.t0 = time.time()
        self.ended: float | None = None
        self.retry_until: float | None = None
        self.error: str | None = None
        self.finished = False
        self._lock = threading.Lock()
        self.html: Any = None
        self.throttle: Throttle | None = None
        # the text a notebook keeps (frozen at display time): the outcome follows as a line
        self._initial_text = f"nbagent step {self.name!r} (live status)"
        #: lazy: the widget is made and displayed when the step first does something worth
        #: watching (an LLM call about to be sent, a retry), on the cell's thread; a step
        #: that does none (most are a few milliseconds) costs no widget, only its summary
        self.lazy = widget and lazy
        self._unsubscribe = run.subscribe(self._on_event)
        if widget and not lazy:
            self._show()

    def _show(self) -> None:
        """Make the widget and display it (text only until then: no throttle, no ticks)."""
        self.lazy = False
        cls = _text_box("HTML")
        self.html = cls(value="")
        self.html.add_class("nbagent-step-line")
        self.html._nbagent_owner = self
        self.throttle = Throttle(self._flush)
        self._flush()

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("step") != self.step_id:
            return
        kind = ev.get("type")
        if (
            self.lazy
            and kind in ("llm_started", "llm_retrying", "step_retrying")
            and threading.current_thread() is threading.main_thread()
        ):
            self._show()
            _display(self)
        ts = _f(ev.get("ts")) or time.time()
        with self._lock:
            if kind == "llm_call":
                if ev.get("status") in ("ok", "error") and not ev.get("replayed"):
                    self.calls += 1
                    self.cost_usd += _f(ev.get("cost_usd")) or 0.0
                self.retry_until = None
            elif kind in ("llm_retrying", "step_retrying"):
                self.retry_until = ts + (_f(ev.get("wait_s")) or 0.0)
                if kind == "step_retrying":
                    self.attempt = (_i(ev.get("attempt")) or 1) + 1
            elif kind == "step_done":
                rec = ev.get("record") or {}
                self.state, self.ended = "done", ts
                self.attempt = _i(rec.get("attempts")) or self.attempt
                self.calls = _i(rec.get("llm_calls")) or self.calls
                self.cost_usd = _f(rec.get("cost_usd")) or self.cost_usd
            elif kind == "step_failed":
                error = ev.get("error")
                self.state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
                self.ended = ts
                self.error = f"{type(error).__name__}: {error}" if error is not None else None
            elif kind == "step_replayed":
                self.state, self.ended = "replayed", ts
        if self.throttle is not None:
            self.throttle.poke()

    def text(self, now: float | None = None) -> str:
        """The one-line status (live while running, the summary once ended)."""
        now = time.time() if now is None else now
        with self._lock:
            end = self.ended if self.ended is not None else now
            elapsed = format_duration(max(0.0, end - self.t0))
            calls = f"{self.calls} LLM call{'s' if self.calls != 1 else ''}"
            cost = format_usd(self.cost_usd)
            attempts = f"attempt {self.attempt}"
            if self.state == "running":
                if self.retry_until is not None and self.retry_until > now:
                    wait = math.ceil(self.retry_until - now)
                    return f"⏳ step {self.name!r} · retrying in {wait} s · {attempts} · {elapsed} · {calls} · {cost}"
                return (
                    f"⏳ step {self.name!r} · running · {attempts} · {elapsed} · {calls} · {cost}"
                )
            return summary_text(
                self.name,
                self.state,
                self.attempt,
                end - self.t0,
                self.calls,
                self.cost_usd,
                self.error,
            )

    def _flush(self) -> None:
        if self.html is None:
            return
        running = self.state == "running"
        color = {"done": "#2e7d32", "replayed": "#1565c0", "running": "#555"}.get(
            self.state, "#c62828"
        )
        self.html.value = (
            f'<span class="nbagent-step-status" data-state="{self.state}" '
            f'style="font-family:var(--jp-code-font-family,monospace);font-size:12px;'
            f'color:{color}">{html.escape(self.text())}</span>'
        )
        if running and not self.finished and self.throttle is not None:
            self.throttle.poke(delay=TICK_S)

    def finish(self, *_args: Any) -> None:
        """End the line: stop observing, hide the widget, print the static summary (once)."""
        if self.finished:
            return
        self.finished = True
        self._unsubscribe()
        if self.throttle is not None:
            self.throttle.close()
        with self._lock:
            if self.state == "running":
                self.state, self.ended = "ended", time.time()
        summary = self.text()
        if self.html is not None:
            self._flush()
            self.html.layout.display = "none"
        sys.stdout.write(summary + "\n")  # one write (print makes two)

    def __repr__(self) -> str:
        # the text/plain of the widget is frozen at display time: keep it stable for nbval
        return self._initial_text if not self.finished else self.text()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        if self.html is None:
            return {"text/plain": repr(self)}
        data = self.html._repr_mimebundle_(**kwargs)
        if isinstance(data, dict):
            data["text/plain"] = repr(self)
        return data


def summary_text(
    name: str,
    state: str,
    attempts: int,
    elapsed_s: float,
    calls: int,
    cost_usd: float,
    error: str | None = None,
) -> str:
    """The one-line summary of an ended step (done, replayed, failed, interrupted)."""
    mark = {"done": "✓", "replayed": "↺"}.get(state, "✗")
    line = (
        f"{mark} step {name!r} {state} · {attempts} attempt{'s' if attempts != 1 else ''} · "
        f"{format_duration(max(0.0, elapsed_s))} · {calls} LLM call{'s' if calls != 1 else ''} · "
        f"{format_usd(cost_usd)}"
    )
    return line + (f" · {error}" if error else "")


def step_status_line(run: Run, step_id: str, *, hook: bool = True, lazy: bool = False) -> StepLine:
    """Show the live status line of a step that is starting; called by ``%%step``.

    With widgets the line is displayed now (on the calling thread, the cell's),
    or with ``lazy=True`` when the step first calls an LLM or retries (see
    StepLine.lazy); without widgets nothing shows until the end. In an IPython shell the line
    finishes in the cell's ``post_run_cell`` (after nbagent's own hook has
    committed or aborted the step) and prints its summary there; ``hook=False``
    leaves calling :meth:`StepLine.finish` to the caller (``%%step`` calls it
    at the end of its own ``post_run_cell``).
    """
    live = widgets_available()
    line = StepLine(run, step_id, widget=live, lazy=lazy)
    if live and not lazy:
        _display(line)
    shell = _shell() if hook else None
    if shell is not None and hasattr(shell, "events"):

        def done(*args: Any) -> None:
            with contextlib.suppress(ValueError):
                shell.events.unregister("post_run_cell", done)
            line.finish()

        shell.events.register("post_run_cell", done)
    return line


__all__ = [
    "Dashboard",
    "DashboardState",
    "StepLine",
    "TextDashboard",
    "Throttle",
    "show_dashboard",
    "step_status_line",
    "widgets_available",
]
