"""Runs and steps: identity, replay-or-execute, commit on success, caps, events.

The engine knows nothing about notebooks. The IPython magics and the
``@run.step`` decorator are two front-ends over the same three verbs:

* :meth:`Run.begin` decides whether a step replays (record found, same
  normalized source, same input values) or executes (and why), enforcing
  the stop switch and the step cap and taking the step's lock;
* :meth:`Execution.commit` stores a finished step atomically;
* :meth:`Execution.abort` releases a failed step, storing nothing.

Code running inside a step finds it with :func:`current_step`; the LLM
client uses that for its call ledger and idempotency keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import io
import logging
import math
import operator
import os
import pickle
import re
import signal
import struct
import sys
import textwrap
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import compress, takewhile
from typing import Any, TypeVar

import cloudpickle

from . import _fingerprint as fp
from ._errors import (
    CapExceeded,
    CostCapExceeded,
    NbagentError,
    RunStopped,
    StepCapExceeded,
    StepError,
    StoreError,
)
from ._store import NANO, UNREAD, Store, open_store

log = logging.getLogger("nbagent")

F = TypeVar("F", bound=Callable[..., Any])

_NAME_RE = re.compile(r"^[^\s/#][^/#]{0,199}$")

_UNSET: Any = object()


def format_usd(x: float) -> str:
    """``$0.42``; under a cent, two significant digits (``$0.0031``)."""
    if x <= 0 or x >= 0.01:
        return f"${max(x, 0):.2f}"
    return f"${x:.{-math.floor(math.log10(x)) + 1}f}"


def format_duration(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name.strip()) or not name.isprintable():
        raise StepError(
            f"{kind} name {name!r} is not valid: use 1-200 printable characters without '/', "
            f"'#' or leading spaces, e.g. `plan` or `research-1`."
        )
    return name.strip()


class StepTimeout(NbagentError, TimeoutError):
    """A step ran past its ``--timeout``."""


# -- what code inside a step can see ---------------------------------------------


@dataclass
class StepContext:
    """The step being executed, as seen from code inside it."""

    #: the run the step belongs to
    run: Run
    #: the step's NAME
    name: str
    #: 1 for the first call of NAME in the run, 2 for the second, ...
    occurrence: int
    #: the attempt of the step body (1-based; retries increment it)
    attempt: int = 1
    #: LLM calls and spend of this step so far (all attempts)
    llm_calls: int = 0
    cost_usd: float = 0.0
    #: per-attempt counters that give each call and effect a stable position
    call_index: int = 0
    effect_index: dict[str, int] = field(default_factory=dict)
    #: the keys of this step's call-ledger records, read at its first LLM call (no other
    #: process writes them while this one holds the step); the client adds its own
    ledger_keys: set[str] | None = None

    @property
    def step_id(self) -> str:
        return f"{self.name}#{self.occurrence}"

    def idempotency_key(self, label: str | None = None) -> str:
        key = f"run:{self.run.name}:step:{self.name}:{self.occurrence}"
        return f"{key}:{label}" if label else key

    def next_call(self) -> int:
        """Position of the next LLM call within this attempt (1-based)."""
        self.call_index += 1
        return self.call_index

    def new_attempt(self, attempt: int) -> None:
        self.attempt = attempt
        self.call_index = 0
        self.effect_index.clear()


_step_var: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "nbagent_step", default=None
)
# Threads started inside a notebook step do not inherit context variables;
# the step that the notebook is running is also kept here for them.
_notebook_step: StepContext | None = None
_current_run: Run | None = None
#: The class ``Run(...)`` makes while set: ``nbagent.dbos_engine.program_runs()`` sets it to
#: DbosRun, so a program's runs execute on DBOS however it imported Run.
_run_class: type[Run] | None = None
_run_opened_hooks: list[Callable[[Run], None]] = []


def _owner_key() -> str:
    """This process, as the owner of reservations: host|pid|start time (kept per process)."""
    if not _owner:
        from ._store import _me

        me = _me()
        _owner.append(f"{me['host']}|{me['pid']}|{me['pstart'] or ''}")
    return _owner[0]


_owner: list[str] = []  # _owner_key's, forgotten in a forked child
os.register_at_fork(after_in_child=_owner.clear)


def on_run_opened(hook: Callable[[Run], None]) -> Callable[[], None]:
    """Call ``hook(run)`` whenever a Run is opened in this process; returns an unhook function.

    Front-ends that watch a program (terminal progress of ``nbagent run``)
    use it to see runs opened anywhere, e.g. inside the program's ``main()``.
    """
    _run_opened_hooks.append(hook)
    return lambda: _run_opened_hooks.remove(hook) if hook in _run_opened_hooks else None


def current_step() -> StepContext | None:
    """The step executing now (in this task, or the notebook's running step), or None."""
    return _step_var.get() or _notebook_step


def current_run(required: bool = True) -> Run | None:
    """The run that steps and LLM calls belong to: the active step's, else the last opened."""
    ctx = current_step()
    if ctx is not None:
        return ctx.run
    if _current_run is None and required:
        raise NbagentError(
            "no nbagent run is open. Open one with `nbagent.Run('my-run')` in Python, "
            "or `%load_ext nbagent` then `%nbagent start my-run` in a notebook."
        )
    return _current_run


def idempotency_key(label: str | None = None) -> str:
    """A deterministic key for a side effect of the current step.

    ``run:<run>:step:<name>:<occurrence>[:label]`` — the same across retries,
    kernel restarts and processes, different per run, step and occurrence.
    """
    ctx = current_step()
    if ctx is None:
        raise NbagentError(
            "nbagent.idempotency_key() is only meaningful inside a step: call it from a "
            "`%%step` cell or a function decorated with `@run.step(...)`."
        )
    return ctx.idempotency_key(label)


# -- status as data ------------------------------------------------------------------


@dataclass
class StepSummary:
    step_id: str
    name: str
    status: str
    duration_s: float
    llm_calls: int
    cost_usd: float
    finished_at: float
    unsaved: dict[str, str]


@dataclass
class RunStatus:
    """A snapshot of a run: spend, caps, counters and steps. Renders as text and HTML."""

    run: str
    store: str
    spend_usd: float
    reserved_usd: float
    max_cost_usd: float | None
    steps_executed: int
    max_steps: int | None
    llm_calls: int
    max_llm_calls: int | None
    stopped: str | None
    steps: list[StepSummary]

    def lines(self) -> list[str]:
        cap = format_usd(self.max_cost_usd) if self.max_cost_usd is not None else "no cap"
        out = [
            f"run {self.run!r} · store {self.store}",
            f"spend {format_usd(self.spend_usd)} / {cap} · steps executed "
            f"{self.steps_executed}/{self.max_steps if self.max_steps is not None else '∞'} · "
            f"LLM calls {self.llm_calls}/{self.max_llm_calls if self.max_llm_calls is not None else '∞'}",
        ]
        if self.stopped:
            out.append(f"STOPPED: {self.stopped} (resume with `%nbagent resume` / run.resume())")
        for s in self.steps:
            calls = f"{s.llm_calls:>3} call{'s' if s.llm_calls != 1 else ' '}"
            out.append(
                f"  {s.status:<8} {s.step_id:<24} {format_duration(s.duration_s):>8} "
                f"{calls} {format_usd(s.cost_usd):>9}"
            )
        if not self.steps:
            out.append("  (no completed steps yet)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


# -- the run -----------------------------------------------------------------------


class Run:
    """A durable agent run: steps, spend and caps kept in a store on disk.

    Opening a run that exists resumes it. Caps passed here that differ from
    the stored ones are an explicit, recorded cap change; caps left out keep
    their stored values.

    :param name: the run's name, e.g. ``"research-1"``.
    :param store: store directory (default ``$NBAGENT_DIR`` or ``./.nbagent``).
    :param max_cost_usd: hard ceiling on LLM spend in USD (None: no cap).
    :param max_steps: ceiling on step executions (replays are free).
    :param max_llm_calls: ceiling on LLM calls.
    :param strict: make unsaveable step variables an error instead of a warning.
    :param retry_policy: overrides of the lesson's retry table for this run's LLM
        calls, e.g. ``{"rate_limit": {"retries": 8}}`` (kept in memory, per process).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Run:
        if cls is Run and _run_class is not None:
            cls = _run_class
        return super().__new__(cls)

    def __init__(
        self,
        name: str,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        max_cost_usd: float | None = None,
        max_steps: int | None = None,
        max_llm_calls: int | None = None,
        strict: bool = False,
        activate: bool = True,
        notebook: str | None = None,
        retry_policy: Any = None,
    ) -> None:
        self.name = check_name("run", name)
        self.store = store if isinstance(store, Store) else open_store(store)
        self.strict = strict
        #: overrides of the retry table for this run's LLM calls (see nbagent.retry_policy)
        self.retry_policy = retry_policy
        self._observers: list[Callable[[dict[str, Any]], None]] = []
        self._alert_hooks: list[Callable[[dict[str, Any]], None]] = []
        self._occurrences: dict[str, int] = {}
        #: the run's LLM-call count after this process's latest reservation (see reserve)
        self.last_call_number = 0
        #: ids of the steps this process knows are stored (read lazily; see begin)
        self._stored_ids: set[str] | None = None
        record = self.store.get_run(self.name)
        if record is None:
            record = {
                "name": self.name,
                "created": time.time(),
                "notebook": notebook,
                "caps": {"usd": None, "steps": None, "llm_calls": None},
                "stopped": None,
            }
            self.store.put_run(self.name, record)
            # a new run has no stored steps (the set is a hint: a step missing from it is
            # read under its lock, so one another process commits meanwhile is still seen)
            self._stored_ids = set()
        wanted = {"usd": max_cost_usd, "steps": max_steps, "llm_calls": max_llm_calls}
        changes = {k: v for k, v in wanted.items() if v is not None and v != record["caps"].get(k)}
        if changes:
            self.set_cap(**changes, reason="opened with new caps")  # type: ignore[arg-type]
        self._owner_known: str | None = None
        if self.store.get_record("resv", self.name):
            self.reclaim_reservations()
        if activate:
            self.activate()
        for hook in list(_run_opened_hooks):
            hook(self)

    def activate(self) -> Run:
        """Make this the run that steps and LLM calls use by default."""
        global _current_run
        _current_run = self
        return self

    def __repr__(self) -> str:
        return f"<nbagent.Run {self.name!r} spend={format_usd(self.spend_usd)} store={self.store.path}>"

    def __reduce__(self) -> Any:
        raise TypeError("an nbagent.Run is bound to an open store and is not saved with a step")

    # -- stored state ---------------------------------------------------------

    @property
    def record(self) -> dict[str, Any]:
        rec = self.store.get_run(self.name)
        if rec is None:
            raise StoreError(f"run {self.name!r} is missing from the store {self.store.path}")
        return rec

    @property
    def caps(self) -> dict[str, Any]:
        return dict(self.record["caps"])

    @property
    def max_cost_usd(self) -> float | None:
        return self.caps.get("usd")

    @property
    def max_steps(self) -> int | None:
        return self.caps.get("steps")

    @property
    def max_llm_calls(self) -> int | None:
        return self.caps.get("llm_calls")

    @property
    def spend_usd(self) -> float:
        return self.store.counter(self.name, "spend_nusd") / NANO

    @property
    def reserved_usd(self) -> float:
        return self.store.counter(self.name, "reserved_nusd") / NANO

    @property
    def llm_calls(self) -> int:
        return self.store.counter(self.name, "llm_calls")

    @property
    def steps_executed(self) -> int:
        return self.store.counter(self.name, "steps")

    @property
    def stopped(self) -> str | None:
        """Why the run is stopped, or None while it may go on."""
        stop = self.record.get("stopped")
        return stop["reason"] if stop else None

    # -- control (the public calls the magics and the dashboard use) -----------

    def set_cap(
        self,
        *,
        usd: float | None = _UNSET,
        steps: int | None = _UNSET,
        llm_calls: int | None = _UNSET,
        reason: str = "changed on purpose",
    ) -> dict[str, Any]:
        """Change caps on purpose (None removes one). Recorded in the trace."""
        for key, value in (("usd", usd), ("steps", steps), ("llm_calls", llm_calls)):
            if value is _UNSET or value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value < 0
                or math.isnan(value)
            ):
                raise NbagentError(
                    f"cap {key}={value!r} is not valid: use a number >= 0, or None for no cap."
                )
        with self.store.transaction():
            rec = self.record
            old = dict(rec["caps"])
            for key, value in (("usd", usd), ("steps", steps), ("llm_calls", llm_calls)):
                if value is not _UNSET:
                    rec["caps"][key] = value
            self.store.put_run(self.name, rec)
        new = dict(rec["caps"])
        self.record_event(
            kind="cap",
            name="cap",
            status="changed",
            detail={"old": old, "new": new, "reason": reason},
        )
        self._emit({"type": "cap_changed", "old": old, "new": new, "reason": reason})
        return new

    def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the run: the next LLM call or step execution raises RunStopped."""
        with self.store.transaction():
            rec = self.record
            rec["stopped"] = {"reason": reason, "at": time.time()}
            self.store.put_run(self.name, rec)
        self.record_event(kind="control", name="stop", status="stopped", error=reason)
        self._emit({"type": "stopped", "reason": reason})

    def resume(self) -> None:
        """Let a stopped run go on (after fixing what stopped it, e.g. an API key)."""
        with self.store.transaction():
            rec = self.record
            rec["stopped"] = None
            self.store.put_run(self.name, rec)
        self.record_event(kind="control", name="resume", status="resumed")
        self._emit({"type": "resumed"})

    def check_not_stopped(self) -> None:
        _raise_if_stopped(self.name, self.record)

    # -- the cost ceiling: reserve before a call, settle after ---------------------

    def reserve(self, worst_usd: float, *, what: str = "the next LLM call") -> int:
        """Reserve the worst-case cost of a call against the caps, atomically across processes.

        Refuses with CostCapExceeded if spent + reserved + worst could cross
        ``max_cost_usd``, and with StepCapExceeded when ``max_llm_calls`` is
        used up. Returns the reservation (nano-dollars) to pass to :meth:`settle`.
        """
        worst = max(0, math.ceil(worst_usd * NANO))
        owner = self._owner_counter()
        refused: list[tuple[CapExceeded, str]] = []

        def decide(record: dict[str, Any], counts: dict[str, int]) -> dict[str, int] | None:
            _raise_if_stopped(self.name, record)
            refusal = self._refusal(record, counts, worst, what)
            if refusal is not None:
                refused.append(refusal)
                return None
            return {"reserved_nusd": worst, "llm_calls": 1, owner: worst}

        counts = self.store.add_if(self.name, ("spend_nusd", "reserved_nusd", "llm_calls"), decide)
        if counts is not None:
            self.last_call_number = counts["llm_calls"]
        if refused:
            refusal, cap_name = refused[0]
            self.record_event(
                kind="cap",
                name=cap_name,
                status="refused",
                error=str(refusal),
                cost_usd=worst / NANO,
            )
            self._emit(
                {
                    "type": "cap_refused",
                    "cap": cap_name,
                    "message": str(refusal),
                    "worst_usd": worst / NANO,
                }
            )
            self.alert("cap", str(refusal))
            raise refusal
        return worst

    def _refusal(
        self, rec: dict[str, Any], counts: dict[str, int], worst: int, what: str
    ) -> tuple[CapExceeded, str] | None:
        """(the refusal of a call of worst case ``worst`` nano-dollars, the cap's name), or
        None when it fits, given the run record and its counters."""
        caps = rec.get("caps") or {}
        spent, reserved, calls = counts["spend_nusd"], counts["reserved_nusd"], counts["llm_calls"]
        if caps.get("llm_calls") is not None and calls + 1 > caps["llm_calls"]:
            return StepCapExceeded(
                f"LLM call cap reached: run {self.name!r} made {calls} of its "
                f"max_llm_calls={caps['llm_calls']} calls — possible loop: {what} was not sent. "
                "Raise the cap on purpose with `%nbagent cap --llm-calls N` or "
                "run.set_cap(llm_calls=N)."
            ), "max_llm_calls"
        if caps.get("usd") is not None and spent + reserved + worst > math.floor(
            caps["usd"] * NANO
        ):
            return CostCapExceeded(
                f"cost cap: run {self.name!r} has spent {format_usd(spent / NANO)}"
                + (
                    f" (+{format_usd(reserved / NANO)} reserved by calls in flight)"
                    if reserved
                    else ""
                )
                + f" of its {format_usd(caps['usd'])} cap, and {what} could cost up to "
                f"{format_usd(worst / NANO)}, so it was not sent. Raise the cap on purpose with "
                "`%nbagent cap --usd X` or run.set_cap(usd=X), or lower max_tokens."
            ), "max_cost_usd"
        return None

    def settle(self, reservation: int, actual_usd: float) -> None:
        """Replace a reservation by the call's real cost (atomically: one statement, or
        one entry of the store's batch when called inside one).

        The reservation must be a true worst case (prompt *bytes* bound its
        tokens from above; ``max_tokens`` or the model's output limit bounds
        the output), so the real cost never exceeds it and spend never ends
        above the cap. The real cost is recorded as it is, never clamped.
        """
        actual = max(0, math.ceil(actual_usd * NANO))
        owner = self._owner_counter()
        # no read back: inside the store's batch() (an LLM call's settlement, ledger record
        # and trace row) this is part of one step-log entry
        self.store.incr_blind(
            self.name, {"reserved_nusd": -reservation, owner: -reservation, "spend_nusd": actual}
        )

    # Reservations are also counted per process, so that the reservation of a call
    # in flight when its process was killed can be given back: it was never settled.

    def _owner_counter(self) -> str:
        """The counter of this process's reservations, ``resv:OWNER`` (the first time, the
        process is added to the run's owners, in a transaction)."""
        owner = _owner_key()
        if self._owner_known != owner:
            with self.store.transaction():
                owners = self.store.get_record("resv", self.name) or []
                if owner not in owners:
                    self.store.set_record("resv", self.name, [*owners, owner])
            self._owner_known = owner
        return f"resv:{owner}"

    def reclaim_reservations(self) -> float:
        """Settle the reservations of processes that died mid-call at their worst case.

        The request may have reached the provider, which bills it, so the
        reservation is counted as spent (the safe side of a hard ceiling), not
        given back. Returns the USD moved from reserved to spent.
        """
        from ._store import _alive

        freed = 0
        with self.store.transaction():
            owners = self.store.get_record("resv", self.name) or []
            alive = []
            for owner in owners:
                host, pid, pstart = owner.split("|")
                if _alive({"host": host, "pid": int(pid), "pstart": pstart or None}):
                    alive.append(owner)
                    continue
                held = self.store.counter(self.name, f"resv:{owner}")
                if held:
                    self.store.incr(self.name, "reserved_nusd", -held)
                    self.store.incr(self.name, "spend_nusd", held)
                    freed += held
                self.store.delete_record("ctr", f"{self.name}/resv:{owner}")
            if alive != owners:
                self.store.set_record("resv", self.name, alive)
        if freed:
            self.record_event(
                kind="cap", name="reservation", status="reclaimed", cost_usd=freed / NANO,
                detail={"reason": "a process died during an LLM call: billed at its reservation "
                        "(the provider may have answered and billed it)"},
            )  # fmt: skip
        return freed / NANO

    # -- events and alerts ------------------------------------------------------

    def subscribe(self, observer: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``observer(event)`` for every engine event; returns an unsubscribe function."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def _emit(self, event: dict[str, Any]) -> None:
        if not self._observers:
            return
        event.setdefault("run", self.name)
        event.setdefault("ts", time.time())
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # an observer must never break a step
                log.exception("nbagent observer %r failed", observer)

    def on_alert(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call ``hook(alert)`` for every alert (auth failure, repeated 503, circuit, cap)."""
        self._alert_hooks.append(hook)

    def alert(self, kind: str, message: str, step: str | None = None) -> None:
        """Raise a visible alert: logged as a WARNING, traced, shown, and sent to hooks."""
        ctx = current_step()
        step = step or (ctx.step_id if ctx else None)
        alert = {
            "kind": kind,
            "message": message,
            "step": step,
            "ts": time.time(),
            "run": self.name,
        }
        where = f"run {self.name} step {step}" if step else f"run {self.name}"
        log.warning("nbagent alert [%s] %s: %s", kind, where, message)
        self.record_event(kind="alert", name=kind, step=step, status="alert", error=message)
        self._emit({"type": "alert", **alert})
        for hook in list(self._alert_hooks):
            try:
                hook(alert)
            except Exception:
                log.exception("nbagent alert hook %r failed", hook)

    def alerts(self) -> list[dict[str, Any]]:
        cols, rows = self.store.trace_rows(self.name)
        i = {c: n for n, c in enumerate(cols)}
        return [
            {"ts": r[i["ts"]], "kind": r[i["name"]], "step": r[i["step"]], "message": r[i["error"]]}
            for r in rows
            if r[i["kind"]] == "alert"
        ]

    def record_event(self, **row: Any) -> None:
        """Append a row to the run's trace."""
        self.store.add_trace(self._trace_row(row))

    def _trace_row(self, row: dict[str, Any]) -> dict[str, Any]:
        row.setdefault("run", self.name)
        if "step" not in row:
            ctx = current_step()
            row["step"] = ctx.step_id if ctx else None
        return row

    # -- reading ---------------------------------------------------------------------

    def trace(self) -> Any:
        """The run's trace as a pandas DataFrame, one row per LLM attempt, tool call and event."""
        from ._trace import trace_frame

        return trace_frame(self.store, self.name)

    def status(self) -> RunStatus:
        steps = []
        for step_id in self.store.step_ids(self.name):
            rec = self.store.get_step(self.name, step_id)
            if rec:
                steps.append(
                    StepSummary(
                        step_id=step_id,
                        name=rec["name"],
                        status=rec.get("status", "done"),
                        duration_s=rec.get("duration_s", 0.0),
                        llm_calls=rec.get("llm_calls", 0),
                        cost_usd=rec.get("cost_usd", 0.0),
                        finished_at=rec.get("finished_at", 0.0),
                        unsaved=rec.get("unsaved", {}),
                    )
                )
        caps = self.caps
        return RunStatus(
            run=self.name,
            store=str(self.store.path),
            spend_usd=self.spend_usd,
            reserved_usd=self.reserved_usd,
            max_cost_usd=caps.get("usd"),
            steps_executed=self.steps_executed,
            max_steps=caps.get("steps"),
            llm_calls=self.llm_calls,
            max_llm_calls=caps.get("llm_calls"),
            stopped=self.stopped,
            steps=steps,
        )

    def steps(self) -> list[str]:
        return self.store.step_ids(self.name)

    def reset(self, steps: list[str] | None = None) -> list[str]:
        """Forget completed steps (all when ``steps`` is None) so they execute again.

        Spend, counters and the trace are kept: budgets are never reset.
        Returns the step ids dropped.
        """
        ids = self.store.step_ids(self.name)
        if steps is None:
            chosen = ids
        else:
            chosen = []
            for s in steps:
                match = [i for i in ids if i == s or i.split("#", 1)[0] == s]
                if not match:
                    known = ", ".join(sorted({i.split("#", 1)[0] for i in ids})) or "none"
                    raise StepError(
                        f"run {self.name!r} has no step {s!r} (steps: {known}); nothing was dropped."
                    )
                chosen += [m for m in match if m not in chosen]
        for step_id in chosen:
            self.store.drop_step(self.name, step_id)
            self._stored().discard(step_id)
        if chosen:
            self.record_event(
                kind="control", name="reset", status="reset", detail={"steps": chosen}
            )
            self._emit({"type": "reset", "steps": chosen})
        return chosen

    # -- the step verbs ------------------------------------------------------------------

    def _stored(self) -> set[str]:
        """Ids of the run's stored steps as this process knows them.

        Read once, then kept up to date by this process's commits and resets;
        other processes' changes are found under the step's lock (see begin).
        """
        if self._stored_ids is None:
            self._stored_ids = set(self.store.step_ids(self.name))
        return self._stored_ids

    def next_occurrence(self, name: str) -> int:
        n = self._occurrences.get(name, 0) + 1
        self._occurrences[name] = n
        return n

    def begin(
        self,
        name: str,
        occurrence: int,
        source_hash: str,
        inputs: dict[str, str],
        *,
        rerun: bool = False,
        cell_id: str | None = None,
        legacy_hash: Callable[[], str] | None = None,
    ) -> Execution:
        """Decide replay or execute for one step; for execute, enforce stop and step cap and lock it.

        A step this process knows to be stored is read first, without its lock
        (a replay takes no lock). Any other step is locked first and read under
        the lock: one read, and no other process can commit it meanwhile.
        """
        name = check_name("step", name)
        step_id = f"{name}#{occurrence}"
        record: dict[str, Any] | None = None
        values: dict[str, bytes] = {}
        if step_id in self._stored():
            record, values = self.store.get_step_values(self.name, step_id)
        reason = _why_execute(record, source_hash, inputs, rerun, legacy_hash)
        if record is not None and reason is None:
            ex = Execution(
                self, name, occurrence, source_hash, inputs, record=record, cell_id=cell_id
            )
            ex.values = values
            return ex

        # n is None when the run has no step cap: the execution is counted when it ends
        # (with the commit, or by abort), so beginning it writes nothing
        taken_over, n, run_record, now = self.store.begin_step(self.name, step_id)
        counted = n is not None
        if now != record:
            # committed (by another kernel or process) or dropped since this process last
            # looked: decide from what is stored now, under the lock; never execute twice
            record, reason = now, _why_execute(now, source_hash, inputs, rerun, legacy_hash)
            if record is not None and reason is None:
                self.store.undo_begin(self.name, step_id, counted)
                self._stored().add(step_id)
                return Execution(
                    self, name, occurrence, source_hash, inputs, record=record, cell_id=cell_id
                )
        stop = run_record.get("stopped")
        cap = (run_record.get("caps") or {}).get("steps")
        if stop or (n is not None and cap is not None and n > cap):
            self.store.undo_begin(self.name, step_id, counted)
            if stop:
                self.check_not_stopped()
            done = n - 1 if n is not None else self.steps_executed
            message = (
                f"step cap reached: run {self.name!r} already executed {done} of its "
                f"max_steps={cap} steps — possible loop. Step {step_id!r} was not run. "
                "Raise the cap on purpose with `%nbagent cap --steps N` or run.set_cap(steps=N)."
            )
            self.record_event(
                kind="cap", name="max_steps", step=step_id, status="refused", error=message
            )
            self._emit({"type": "cap_refused", "cap": "steps", "step": step_id, "message": message})
            raise StepCapExceeded(message)
        ex = Execution(self, name, occurrence, source_hash, inputs, reason=reason, cell_id=cell_id)
        ex.previous = record  # read again under the lock above: commit need not read it
        ex.uncounted = not counted
        if taken_over:
            self.record_event(
                kind="step",
                name=name,
                step=step_id,
                status="takeover",
                detail={"dead_owner": taken_over},
            )
        self._emit({"type": "step_started", "step": step_id, "name": name, "reason": reason})
        return ex

    # -- the Python front-end ------------------------------------------------------------

    def step(
        self,
        name: str | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        rerun: bool = False,
        policy: Any = None,
    ) -> Callable[[F], F]:
        """Make a function a durable step of this run.

        Identity is the name plus the occurrence within the run: a step called
        in a loop gets one record per call. On replay the recorded return value
        comes back without calling the function, and its recorded output is
        printed again (marked as replayed).
        """

        def decorate(fn: F) -> F:
            step_name = check_name("step", name or fn.__name__)
            src = function_source_hash(fn)
            globals_read = sorted(
                n
                for n in fp.reachable_names(fp._code_globals(fn.__code__), fn.__globals__)
                if fp.is_user_name(n) and not isinstance(fn.__globals__.get(n), Run)
            )

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                occurrence = self.next_occurrence(step_name)
                g = fn.__globals__
                inputs = {"(arguments)": fp.hash_value((args, kwargs))}
                inputs.update({n: fp.hash_value(g[n]) for n in globals_read if n in g})
                ex = self.begin(
                    step_name,
                    occurrence,
                    src,
                    inputs,
                    rerun=rerun,
                    legacy_hash=lambda: function_source_hash(fn, legacy=True),
                )
                if ex.replay:
                    ex.print_replay()
                    return ex.load_value("(return)")
                return ex.run_function(
                    fn, args, kwargs, retries=retries, timeout=timeout, policy=policy
                )

            wrapper.__nbagent_step__ = step_name  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        return decorate

    def close(self) -> None:
        global _current_run
        if _current_run is self:
            _current_run = None


def function_source_hash(fn: Callable[..., Any], legacy: bool = False) -> str:
    """Normalized source of a function without its decorators; bytecode if no source.

    ``legacy``: the hash older nbagents recorded (see fingerprint.FINGERPRINT_VERSION).
    """
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = fp.ast.parse(source)
        node = tree.body[0]
        if isinstance(node, fp.ast.FunctionDef | fp.ast.AsyncFunctionDef):
            node.decorator_list = []
        text = fp.ast.unparse(tree)
        return fp.legacy_source_hash(text) if legacy else fp.source_hash(text)
    except (OSError, TypeError, SyntaxError, IndexError):
        h = fp._Hasher()
        h.code(fn.__code__)
        return h.h.hexdigest()


def _raise_if_stopped(name: str, record: dict[str, Any]) -> None:
    stop = record.get("stopped")
    if stop:
        raise RunStopped(
            f"run {name!r} is stopped: {stop['reason']}. Fix the cause, then resume it with "
            "`%nbagent resume` or `run.resume()`."
        )


def _why_execute(
    record: dict[str, Any] | None,
    source_hash: str,
    inputs: dict[str, str],
    rerun: bool,
    legacy: Callable[[], str] | None = None,
) -> str | None:
    """Why a step with this record executes again (a one-line reason), or None: replay it.

    None also for a step without a record (it simply runs). ``legacy`` computes
    the source hash as older nbagents did, for records they wrote.
    """
    if record is None:
        return None
    if rerun:
        return "--rerun"
    recorded = record.get("source_hash")
    if recorded != source_hash and not (
        # a record of an older nbagent holds its own kind of hash: compare like with like
        legacy is not None
        and record.get("fingerprint", 1) < fp.FINGERPRINT_VERSION
        and recorded == legacy()
    ):
        return "source changed"
    old = record.get("inputs", {})
    # a value equal to what the step itself left behind is not a change: running
    # a cell twice in one kernel (it reads what it bound or appended to) replays
    after = record.get("after", {})
    changed = sorted(
        n
        for n in set(old) | set(inputs)
        if old.get(n) != inputs.get(n) and after.get(n, "") != inputs.get(n)
    )
    if not changed:
        return None
    shown = ", ".join(f"`{n}`" for n in changed[:3]) + (", ..." if len(changed) > 3 else "")
    return f"input {shown} changed" if len(changed) == 1 else f"inputs {shown} changed"


# -- one execution or replay of a step ------------------------------------------------


def dumps_value(value: Any) -> bytes:
    """Pickle a step value: plain pickle (fast, C), or cloudpickle when it refers to ``__main__``.

    Functions and classes defined in a notebook pickle by reference to
    ``__main__``, which does not hold them after a restart; cloudpickle stores
    them by value. The byte check has false positives (a string containing
    ``__main__``), which only cost the slower path. Bulk data that pickle 5
    hands out of band (NumPy arrays, pandas blocks) is framed after the pickle
    stream, each buffer 64-byte aligned, so :func:`loads_value` rebuilds the
    arrays on the stored bytes instead of copying them.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        data = None
    if data is None or b"__main__" in data:
        buffers = []
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return _frame(data, [b.raw() for b in buffers]) if buffers else data  # type: ignore[arg-type]


_FRAMED = b"NBP1"  # a pickle stream with its out-of-band buffers (see dumps_value)
_ALIGN = 64
_HEAD = struct.Struct("<4sIQ")  # magic, number of buffers, length of the pickle stream
_SPAN = struct.Struct("<QQ")  # offset and length of one buffer


def _frame(data: bytes, raws: list[memoryview]) -> bytes:
    parts: list[Any] = [_HEAD.pack(_FRAMED, len(raws), len(data))]
    offset = _HEAD.size + _SPAN.size * len(raws) + len(data)
    body: list[Any] = [data]
    for raw in raws:
        start = -(-offset // _ALIGN) * _ALIGN
        body += [bytes(start - offset), raw]
        parts.append(_SPAN.pack(start, raw.nbytes))
        offset = start + raw.nbytes
    return b"".join(parts + body)


def loads_value(payload: bytes | bytearray | memoryview) -> Any:
    """Unpickle what :func:`dumps_value` made; out-of-band buffers are used in place.

    The arrays rebuilt on them must be writable like the originals: a
    read-only payload is copied once first.
    """
    view = memoryview(payload)
    if view[:4] != _FRAMED:
        return pickle.loads(view)
    if view.readonly:
        view = memoryview(bytearray(view))
    _, count, length = _HEAD.unpack_from(view)
    spans = [_SPAN.unpack_from(view, _HEAD.size + _SPAN.size * i) for i in range(count)]
    start = _HEAD.size + _SPAN.size * count
    return pickle.loads(view[start : start + length], buffers=[view[o : o + n] for o, n in spans])


class Execution:
    """One step on its way: a replay of a record, or an execution to commit or abort."""

    def __init__(
        self,
        run: Run,
        name: str,
        occurrence: int,
        source_hash: str,
        inputs: dict[str, str],
        *,
        record: dict[str, Any] | None = None,
        reason: str | None = None,
        cell_id: str | None = None,
    ) -> None:
        self.run = run
        self.name = name
        self.occurrence = occurrence
        self.step_id = f"{name}#{occurrence}"
        self.source_hash = source_hash
        self.inputs = inputs
        self.record = record
        self.replay = record is not None
        self.reason = reason
        self.cell_id = cell_id
        self.started = time.time()
        self._t0 = time.perf_counter()
        self.context = StepContext(run=run, name=name, occurrence=occurrence)
        self.attempts = 0
        self.finished = False
        #: the step's record before this execution, as seen under its lock (None: a new
        #: step); UNREAD when unknown, and then commit_step reads it
        self.previous: Any = UNREAD
        #: the execution is not counted in the run's step count yet (no step cap at begin):
        #: commit or abort counts it
        self.uncounted = False
        #: the stored small values of a replay, read with its record (signed blobs, by name)
        self.values: dict[str, bytes] = {}

    # -- replay ---------------------------------------------------------------------------

    def replay_marker(self) -> str:
        rec = self.record or {}
        calls = rec.get("llm_calls", 0)
        parts = [
            f"↺ replayed step {self.name!r}"
            + (f" (call #{self.occurrence})" if self.occurrence > 1 else "")
            + " from disk",
            f"ran {format_duration(rec.get('duration_s', 0.0))}",
            f"{calls} LLM call{'s' if calls != 1 else ''}",
            format_usd(rec.get("cost_usd", 0.0)),
        ]
        unsaved = rec.get("unsaved") or {}
        if unsaved:
            parts.append("not restored: " + ", ".join(sorted(unsaved)))
        return " · ".join(parts)

    def load_value(self, name: str) -> Any:
        key = f"{self.run.name}/{self.step_id}/{name}"
        raw = self.values.pop(name, None)
        store = self.run.store
        payload = store.verify_blob(key, raw) if raw is not None else store.get_blob(key)
        if payload is None:
            raise StoreError(
                f"the stored value {name!r} of step {self.step_id!r} is missing from "
                f"{self.run.store.path}; re-run the step with --rerun."
            )
        return loads_value(payload)

    def restored_values(self) -> dict[str, Any]:
        """Every variable the step stored, plus placeholders for those it could not."""
        rec = self.record or {}
        values = {name: self.load_value(name) for name in rec.get("saved", [])}
        for name, info in (rec.get("unsaved") or {}).items():
            values[name] = fp.Unrestored(name, self.name, info["reason"], info["token"])
        return values

    def print_replay(self, file: Any = None) -> None:
        out = file or sys.stdout
        print(self.replay_marker(), file=out)
        for item in (self.record or {}).get("outputs", []):
            if item.get("type") == "stream":
                print(
                    item["text"], end="", file=sys.stderr if item.get("name") == "stderr" else out
                )
        self.replayed()

    def replayed(self) -> None:
        self.finished = True
        rec = self.record or {}
        # the trace row of a replay is written with the process's next trace write or
        # step commit, or when the trace is read (Store.add_trace(defer=True))
        row = {
            "kind": "step",
            "name": self.name,
            "step": self.step_id,
            "status": "replayed",
            "replayed": 1,
            "latency_s": time.perf_counter() - self._t0,
        }
        self.run.store.add_trace(self.run._trace_row(row), defer=True)
        self.run._emit(
            {"type": "step_replayed", "step": self.step_id, "name": self.name, "record": rec}
        )

    # -- execute ------------------------------------------------------------------------

    @contextlib.contextmanager
    def attempt(self, number: int, timeout: float | None = None) -> Iterator[StepContext]:
        """Run one attempt of the body with the step visible to the code inside it."""
        self.run.check_not_stopped()
        self.attempts = number
        self.context.new_attempt(number)
        token = _step_var.set(self.context)
        try:
            with time_limit(timeout, self.name):
                yield self.context
        finally:
            _step_var.reset(token)

    def run_function(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retries: int = 0,
        timeout: float | None = None,
        policy: Any = None,
    ) -> Any:
        out = _Tee(sys.stdout)
        try:
            with contextlib.redirect_stdout(out):  # type: ignore[type-var]
                for attempt_cm in step_attempts(
                    self, retries=retries, timeout=timeout, policy=policy
                ):
                    with attempt_cm:
                        result = fn(*args, **kwargs)
        except BaseException as e:
            self.abort(e)
            raise
        outputs = (
            [{"type": "stream", "name": "stdout", "text": out.captured()}] if out.captured() else []
        )
        self.commit({"(return)": result}, outputs=outputs, result=None)
        return result

    def commit(
        self,
        values: dict[str, Any],
        *,
        outputs: list[dict[str, Any]],
        result: dict[str, Any] | None,
        deleted: list[str] | None = None,
        strict: bool | None = None,
        warn: bool = True,
    ) -> dict[str, dict[str, str]]:
        """Store the finished step; returns the values that could not be stored, with why."""
        blobs: dict[str, bytes] = {}
        unsaved: dict[str, dict[str, str]] = {}
        for name, value in values.items():
            try:
                blobs[name] = dumps_value(value)
            except Exception as e:  # noqa: BLE001 - any pickling failure means "cannot store"
                reason = f"{type(value).__name__}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                unsaved[name] = {"reason": reason, "token": fp.opaque_token(value)}
        if unsaved and (self.run.strict if strict is None else strict):
            self.abort(None)
            names = ", ".join(sorted(unsaved))
            raise StepError(
                f"step {self.name!r} made values that cannot be stored: {names} "
                f"({'; '.join(v['reason'] for v in unsaved.values())}). Make them in a setup cell "
                "outside the step, exclude them with --exclude, or drop --strict."
            )
        duration = time.perf_counter() - self._t0
        after = {n: fp.hash_value(values[n]) for n in blobs if not n.startswith("(")}
        record = {
            "run": self.run.name,
            "name": self.name,
            "occurrence": self.occurrence,
            "status": "done",
            "source_hash": self.source_hash,
            "fingerprint": fp.FINGERPRINT_VERSION,
            "inputs": self.inputs,
            "saved": sorted(blobs),
            "after": after,
            "unsaved": unsaved,
            "deleted": sorted(deleted or []),
            "outputs": outputs,
            "result": result,
            "duration_s": duration,
            "attempts": self.attempts,
            "llm_calls": self.context.llm_calls,
            "cost_usd": self.context.cost_usd,
            "started_at": self.started,
            "finished_at": time.time(),
            "cell_id": self.cell_id,
        }
        trace = self.run._trace_row(
            {
                "kind": "step",
                "name": self.name,
                "step": self.step_id,
                "status": "done",
                "attempt": self.attempts,
                "latency_s": duration,
                "cost_usd": self.context.cost_usd,
            }
        )
        try:  # the trace row is committed with the record
            self.run.store.commit_step(
                self.run.name,
                self.step_id,
                record,
                blobs,
                previous=self.previous,
                trace=trace,
                count=self.uncounted,
            )
            self.uncounted = False
        except BaseException:
            self.run.store.release_lock(self.run.name, self.step_id)
            raise
        self.finished = True
        self.record = record
        self.run._stored().add(self.step_id)
        self.run._emit(
            {"type": "step_done", "step": self.step_id, "name": self.name, "record": record}
        )
        if unsaved and warn:
            names = ", ".join(f"{n} ({v['reason']})" for n, v in sorted(unsaved.items()))
            warnings.warn(
                f"step {self.name!r} completed, but these values cannot be stored and will be "
                f"missing after a restart: {names}. Make them in a setup cell outside the step, "
                "or pass --strict to make this an error.",
                UnsavedValueWarning,
                stacklevel=2,
            )
        return unsaved

    def abort(self, error: BaseException | None) -> None:
        """The step failed or was interrupted: release it, store nothing."""
        if self.finished:
            return
        self.finished = True
        try:
            if self.uncounted:  # it ran (in part): it counts as a step execution
                self.uncounted = False
                self.run.store.incr(self.run.name, "steps")
        finally:
            self.run.store.release_lock(self.run.name, self.step_id)
        if error is not None:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self.run.record_event(
                kind="step",
                name=self.name,
                step=self.step_id,
                status=status,
                attempt=self.attempts,
                error=f"{type(error).__name__}: {error}",
                latency_s=time.perf_counter() - self._t0,
                cost_usd=self.context.cost_usd,
            )
            self.run._emit(
                {"type": "step_failed", "step": self.step_id, "name": self.name, "error": error}
            )


# -- what a step stores of a namespace (shared by the magic and exported modules) ---------

_MISSING = object()


def user_globals(namespace: dict[str, Any]) -> dict[str, Any]:
    """The user's names and their objects before a step body runs.

    Objects, not ids: holding them keeps an id from being reused by a new
    object, which would hide a rebinding.
    """
    return {k: v for k, v in namespace.items() if fp.is_user_name(k)}


#: nbagent's own name in a notebook's namespace (the extension object); see NamespaceWatch
MARK = "__nbagent__"


class NamespaceSnapshot:
    """The user's names of a namespace and their objects, before a step body runs.

    What :func:`user_globals` gives, in a form that is cheap to compare after
    the body: the user's objects are compared by identity, position by position
    (holding them means an id cannot be reused to hide a rebinding). A dict
    keeps insertion order (rebinding keeps a name's place, new names go last),
    so when no name was deleted, names added by the body are the keys after the
    snapshot's. Take snapshots of a notebook namespace with
    :meth:`NamespaceWatch.snapshot`, which avoids the scans of every key done here.
    """

    __slots__ = ("keys", "length", "names", "objects", "marked")

    def __init__(
        self, namespace: dict[str, Any], names: list[str] | None = None, marked: bool = False
    ) -> None:
        #: every key (None when marked: the keys added later are found after the mark)
        self.keys = None if marked else list(namespace)
        self.length = len(namespace)
        self.marked = marked
        self.names = [k for k in namespace if fp.is_user_name(k)] if names is None else names
        self.objects = _getter(self.names)(namespace)

    def added(self, namespace: dict[str, Any]) -> list[str] | None:
        """Keys added since the snapshot, in order; None if a key it had was deleted."""
        if self.marked:
            return _added_after_mark(namespace, self.length)
        now = list(namespace)
        keys = self.keys or []
        return now[len(keys) :] if now[: len(keys)] == keys else None

    def diff(self, namespace: dict[str, Any]) -> tuple[set[str], set[str]]:
        """(user names bound or rebound since the snapshot, user names deleted)."""
        added = self.added(namespace)
        if added is not None:  # nothing deleted: every name of the snapshot is still there
            after = _getter(self.names)(namespace)
            bound = set(compress(self.names, map(operator.is_not, self.objects, after)))
            bound.update(k for k in added if fp.is_user_name(k))
            return bound, set()
        before = dict(zip(self.names, self.objects, strict=True))
        bound = {
            k
            for k, v in namespace.items()
            if fp.is_user_name(k) and before.get(k, _MISSING) is not v
        }
        return bound, before.keys() - namespace.keys()


def _getter(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``namespace -> tuple of the objects of names``, one C loop (twice as fast as a map of
    ``__getitem__``). Built once per names list: NamespaceWatch shares its list between
    snapshots until a name is added."""
    global _last_getter
    names_then, getter = _last_getter
    if names_then is not names:
        if len(names) == 1:  # itemgetter of one name returns the object, not a 1-tuple
            name = names[0]
            getter = lambda ns: (ns[name],)  # noqa: E731
        else:
            getter = operator.itemgetter(*names) if names else (lambda ns: ())
        _last_getter = (names, getter)
    return getter  # type: ignore[no-any-return]


_last_getter: tuple[Any, Any] = (None, None)


def _after_mark(namespace: dict[str, Any]) -> list[str]:
    """Keys after :data:`MARK`, oldest first (every key when the mark is gone)."""
    added = list(takewhile(MARK.__ne__, reversed(namespace)))
    added.reverse()
    return added


def _added_after_mark(namespace: dict[str, Any], length: int) -> list[str] | None:
    """Keys after :data:`MARK` (oldest first), for a namespace that had ``length`` keys when
    the mark was moved to its end; None when a key older than the mark was deleted since
    (the count does not add up) or the mark is gone."""
    added = _after_mark(namespace)
    if len(added) == len(namespace) or len(namespace) != length + len(added):
        return None
    return added


class NamespaceWatch:
    """Snapshots of a notebook's namespace whose cost grows with the user's names only.

    IPython adds names per cell (``_iN``, ``_N``): a namespace of a long session
    has thousands, and scanning them all twice per step is most of a snapshot's
    cost. Instead, each snapshot moves nbagent's own name :data:`MARK` (nothing
    else touches it) to the end of the namespace: every name added later comes
    after it and is found by walking back from the end, and a deletion shows in
    the count (then the user's names left are those of the last snapshot still
    there). The user's names are kept from one snapshot to the next.
    """

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.length = -1  # the namespace's size after the last snapshot (-1: none yet)
        self.names: list[str] = []  # the user's names then

    def snapshot(self) -> NamespaceSnapshot:
        ns = self.namespace
        if MARK not in ns:
            return NamespaceSnapshot(ns)
        if self.length < 0:
            names = [k for k in ns if fp.is_user_name(k)]
        else:  # the list is shared by snapshots: a new one when it changes, never in place
            added = _after_mark(ns)
            new = [k for k in added if fp.is_user_name(k)]
            if len(ns) == self.length + len(added):  # nothing was deleted
                names = self.names + new if new else self.names
            else:  # some were (and may be back, after the mark): keep the user's that are left
                back = set(new)
                names = [k for k in self.names if k in ns and k not in back] + new
        ns[MARK] = ns.pop(MARK)  # to the end: what the body adds comes after it
        self.length, self.names = len(ns), names
        return NamespaceSnapshot(ns, names, marked=True)


def names_to_store(
    namespace: dict[str, Any],
    before: dict[str, Any] | NamespaceSnapshot,
    candidates: Any,
    inputs: dict[str, str],
    *,
    save: Any = None,
    exclude: Any = (),
) -> tuple[list[str], list[str]]:
    """(names to store, names deleted) after a step body ran.

    Stored: every user name bound or rebound (a new object), and every name
    the body read whose object it changed in place (its hash differs from its
    input hash). Modules are kept (stored by name, so ``import x`` inside a
    step still binds ``x`` on replay); runs never. ``save`` keeps only those
    names, ``exclude`` drops names.
    """
    if isinstance(before, NamespaceSnapshot):
        changed, gone = before.diff(namespace)
        kept = [n for n in candidates if n in namespace and n not in changed]
        deleted = sorted(gone)
    else:
        changed = {
            k
            for k, v in namespace.items()
            if fp.is_user_name(k) and before.get(k, _MISSING) is not v
        }
        kept = [n for n in candidates if n in namespace and before.get(n, _MISSING) is namespace[n]]
        deleted = sorted(k for k in before if k not in namespace)
    mutated = {n for n in kept if fp.hash_value(namespace[n]) != inputs.get(n)}
    names = [
        n
        for n in sorted(changed | mutated)
        if not isinstance(namespace[n], Run) and (save is None or n in save) and n not in exclude
    ]
    return names, deleted


def restore_into(ex: Execution, namespace: dict[str, Any]) -> dict[str, Any]:
    """Put a replayed step's variables back into a namespace; returns all stored values.

    Functions and classes a step defined come back (by value) with fresh
    globals; they are rebound to ``namespace`` so that ``findings.append``
    inside them reaches the namespace's ``findings`` again.
    """
    values = ex.restored_values()
    for name, value in values.items():
        if not name.startswith("("):  # "(result)": the cell's Out[] value
            namespace[name] = _rebind(value, namespace)
    for name in (ex.record or {}).get("deleted", []):
        namespace.pop(name, None)
    return values


def _rebind(value: Any, namespace: dict[str, Any]) -> Any:
    if isinstance(value, types.FunctionType) and value.__globals__ is not namespace:
        if value.__module__ not in ("__main__", namespace.get("__name__")):
            return value
        fn = types.FunctionType(
            value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__
        )
        fn.__kwdefaults__ = value.__kwdefaults__
        fn.__dict__.update(value.__dict__)
        fn.__qualname__ = value.__qualname__
        fn.__annotations__ = value.__annotations__
        fn.__doc__ = value.__doc__
        fn.__module__ = value.__module__
        return fn
    if isinstance(value, type) and value.__module__ in ("__main__", namespace.get("__name__")):
        for attr, member in list(vars(value).items()):
            inner = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if isinstance(inner, types.FunctionType):
                rebound = _rebind(inner, namespace)
                if rebound is not inner:
                    setattr(value, attr, type(member)(rebound) if inner is not member else rebound)
    return value


class _Attempt:
    """One attempt of a step body: the step is visible to the code inside, under its timeout.

    Wraps the retry driver's attempt, which records the attempt's error.
    """

    def __init__(self, ex: Execution, retry_attempt: Any, timeout: float | None) -> None:
        self.ex, self.retry_attempt, self.timeout = ex, retry_attempt, timeout
        self._cm: Any = None

    def __enter__(self) -> StepContext:
        self.retry_attempt.__enter__()
        self._cm = self.ex.attempt(self.retry_attempt.number, self.timeout)
        return self._cm.__enter__()  # type: ignore[no-any-return]

    def __exit__(self, et: Any, ev: BaseException | None, tb: Any) -> bool:
        self._cm.__exit__(et, ev, tb)
        return bool(self.retry_attempt.__exit__(et, ev, tb))


def step_attempts(
    ex: Execution, *, retries: int = 0, timeout: float | None = None, policy: Any = None
) -> Iterator[_Attempt]:
    """Attempts of a step body: ``for a in step_attempts(ex, retries=2): with a: body``.

    A failed attempt is retried after the policy's backoff while the policy
    allows it (``nbagent._retry.step_policy``: the lesson's table applied to
    the exception the body raised); the last error is re-raised with its own type.
    """
    from ._retry import Retrier, step_policy

    run = ex.run

    def on_attempt(info: Any) -> None:
        if info.outcome == "ok":
            return
        error = info.exception
        if info.will_retry:  # the last attempt is the step's own "failed" row (Execution.abort)
            run.record_event(
                kind="step", name=ex.name, step=ex.step_id, attempt=info.attempt,
                status="retrying", error=f"{type(error).__name__}: {error}", wait_s=info.wait_s,
            )  # fmt: skip
        if info.alert:
            run.alert(
                info.alert, f"step {ex.name!r}: {type(error).__name__}: {error}", step=ex.step_id
            )
        if info.stop_run:
            run.stop(info.stop_run)
        if info.will_retry:
            run._emit({
                "type": "step_retrying", "step": ex.step_id, "name": ex.name,
                "attempt": info.attempt, "wait_s": info.wait_s, "error": error,
            })  # fmt: skip

    retrier = Retrier(
        policy if policy is not None else step_policy(retries, timeout), on_attempt=on_attempt
    )
    for retry_attempt in retrier.attempts():
        yield _Attempt(ex, retry_attempt, timeout)


class UnsavedValueWarning(UserWarning):
    """A step made values that cannot be stored (they will be missing after a restart)."""


@contextlib.contextmanager
def time_limit(seconds: float | None, step: str) -> Iterator[None]:
    """Raise StepTimeout in the main thread when the body runs past ``seconds``."""
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        warnings.warn(
            f"step {step!r}: --timeout only works in the main thread; not enforced", stacklevel=3
        )
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise StepTimeout(f"step {step!r} ran past its timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Tee(io.TextIOBase):
    """Writes through to a stream and keeps a copy (live output, recorded for replay)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    # The rest is the real stream's, so step code can use ``sys.stdout.buffer`` (raw
    # bytes go through live but are not recorded), ``encoding``, ``fileno()``, ...
    def __getattr__(self, name: str) -> Any:
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    @property
    def encoding(self) -> Any:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self) -> Any:  # type: ignore[override]
        return getattr(self.stream, "errors", None)

    def fileno(self) -> int:
        return int(self.stream.fileno())

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    def captured(self) -> str:
        return "".join(self.parts)
