"""The dashboard's state, throttle, controls and text fallbacks, driven by engine events."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

import ipywidgets
import pytest

import nbagent
from nbagent import _dashboard as dash_mod
from nbagent._dashboard import (
    Dashboard,
    DashboardState,
    StepLine,
    TextDashboard,
    Throttle,
    show_dashboard,
    step_status_line,
    widgets_available,
)


@pytest.fixture
def run() -> Iterator[nbagent.Run]:
    r = nbagent.Run("dash", max_cost_usd=2.0, max_steps=10, max_llm_calls=100)
    yield r


@pytest.fixture
def dashboards() -> Iterator[list[Dashboard]]:
    made: list[Dashboard] = []
    yield made
    for d in made:
        d.close()


def make(run: nbagent.Run, made: list[Dashboard], **kw: Any) -> Dashboard:
    d = Dashboard(run, **kw)
    made.append(d)
    return d


def wait_idle(d: Dashboard, quiet: float = 0.35) -> None:
    """Let the trailing flush run (the throttle interval is 0.1 s)."""
    time.sleep(quiet)


def llm_event(step: str = "plan#1", i: int = 0, **kw: Any) -> dict[str, Any]:
    ev = {
        "type": "llm_call",
        "step": step,
        "attempt": 1,
        "status": "ok",
        "model": "gpt-test",
        "input_tokens": 100,
        "cached_tokens": 20,
        "output_tokens": 10,
        "reasoning_tokens": 0,
        "cost_usd": 0.001,
        "latency_s": 0.25,
        "error": None,
        "wait_s": None,
        "replayed": False,
        "seq": None,
    }
    ev.update(kw)
    return ev


def spend(run: nbagent.Run, usd: float) -> None:
    res = run.reserve(usd)
    run.settle(res, usd)


# -- state from events ------------------------------------------------------------


def test_state_follows_step_events(run: nbagent.Run) -> None:
    s = DashboardState.from_run(run)
    now = time.time()
    s.apply({"type": "step_started", "step": "plan#1", "name": "plan", "reason": None, "ts": now})
    assert s.steps["plan#1"].shown_state(now) == "running"
    assert s.running == "plan#1"
    assert "running" in s.busy_note()
    s.apply(llm_event(ts=now))
    s.apply(llm_event(ts=now, status="replayed", replayed=True))
    assert s.steps["plan#1"].llm_calls == 1
    s.apply({"type": "llm_retrying", "step": "plan#1", "attempt": 1, "wait_s": 3.0, "ts": now})
    assert s.steps["plan#1"].shown_state(now + 0.5) == "retrying (call attempt 2) in 3 s"
    assert s.steps["plan#1"].shown_state(now + 3.5) == "running"
    s.apply(
        {
            "type": "step_retrying",
            "step": "plan#1",
            "name": "plan",
            "attempt": 1,
            "wait_s": 2.0,
            "error": ValueError("boom"),
            "ts": now,
        }
    )
    assert s.steps["plan#1"].attempts == 2
    assert s.steps["plan#1"].shown_state(now + 0.1).startswith("retrying (step attempt 2) in 2")
    record = {"duration_s": 1.5, "llm_calls": 2, "cost_usd": 0.002, "attempts": 2}
    s.apply({"type": "step_done", "step": "plan#1", "name": "plan", "record": record, "ts": now})
    row = s.steps["plan#1"]
    assert (row.state, row.attempts, row.llm_calls, row.cost_usd) == ("done", 2, 2, 0.002)
    assert s.running is None and s.busy_note() == ""
    s.apply({"type": "step_replayed", "step": "plan#1", "name": "plan", "record": record})
    assert s.steps["plan#1"].state == "replayed"
    s.apply({"type": "step_started", "step": "act#1", "name": "act", "ts": now})
    s.apply({"type": "step_failed", "step": "act#1", "name": "act", "error": KeyError("x")})
    assert s.steps["act#1"].state == "failed" and "KeyError" in (s.steps["act#1"].error or "")
    s.apply({"type": "cap_refused", "cap": "steps", "step": "more#1", "message": "step cap"})
    assert s.steps["more#1"].state == "skipped (cap)"
    assert s.refused and s.level() == "red"
    assert s.alerts[-1]["step"] == "more#1"
    s.apply({"type": "cap_changed", "old": {}, "new": {"usd": 5.0}, "reason": "x"})
    assert not s.refused
    s.apply({"type": "alert", "kind": "auth", "message": "401", "step": "act#1", "ts": now})
    assert s.alerts[-1]["kind"] == "auth"
    s.apply({"type": "reset", "steps": ["plan#1"]})
    assert s.steps["plan#1"].state == "pending"
    s.apply({"type": "stopped", "reason": "by me"})
    assert s.stopped == "by me"
    s.apply({"type": "resumed"})
    assert s.stopped is None
    s.apply({"type": "tool_call", "step": "act#1", "name": "search", "status": "ok"})
    assert s.calls[-1].kind == "tool" and s.calls[-1].name == "search"


def test_spend_text_and_levels(run: nbagent.Run) -> None:
    spend(run, 0.0031)
    s = DashboardState.from_run(run)
    assert s.spend_text() == "$0.0031 / $2.00"
    assert s.level() == "ok"
    spend(run, 0.4169)
    s.refresh_from(run)
    assert s.spend_text() == "$0.42 / $2.00"
    spend(run, 1.20)  # 1.62 of 2.00 = 81 %
    s.refresh_from(run)
    assert s.level() == "amber"
    assert s.fraction() == pytest.approx(0.81)
    with pytest.raises(nbagent.CostCapExceeded):
        run.reserve(1.0)
    s = DashboardState.from_run(run)  # the refusal is in the trace: red after a restart too
    assert s.level() == "red"
    run.set_cap(usd=10.0)
    assert DashboardState.from_run(run).level() == "ok"


def test_projection(run: nbagent.Run) -> None:
    s = DashboardState.from_run(run)
    assert s.projection().rate_usd_per_step is None
    for name in ("a", "b"):
        ex = run.begin(name, 1, "src", {})
        spend(run, 0.10)
        ex.commit({}, outputs=[], result=None)
    s.refresh_from(run)
    p = s.projection()
    assert p.rate_usd_per_step == pytest.approx(0.10)
    assert p.projected_usd == pytest.approx(0.20 + 0.10 * 8)  # max_steps=10
    assert p.steps_left_by_cap == 18
    assert "projected $1.00 at max_steps=10" in s.text()


def test_history_after_restart(run: nbagent.Run, isolated_nbagent: Any) -> None:
    ex = run.begin("plan", 1, "src", {})
    spend(run, 0.03)
    run.record_event(kind="llm", step="plan#1", model="m", status="ok", attempt=1, cost_usd=0.03)
    ex.context.llm_calls, ex.context.cost_usd = 1, 0.03
    ex.commit({}, outputs=[], result=None)
    ex2 = run.begin("act", 1, "src", {})
    ex2.abort(ValueError("bad"))
    run.alert("auth", "401 from the API", step="act#1")
    # a new process: a new Run object over the same store
    again = nbagent.Run("dash")
    replay = again.begin("plan", 1, "src", {})
    assert replay.replay
    replay.replayed()
    s = DashboardState.from_run(again)
    assert s.steps["plan#1"].state == "replayed"
    assert s.steps["plan#1"].llm_calls == 1
    assert s.steps["act#1"].state == "failed"
    assert [c.cost_usd for c in s.calls] == [0.03]
    assert s.alerts[-1]["message"] == "401 from the API"
    assert s.spend_text() == "$0.03 / $2.00"


# -- the throttle -----------------------------------------------------------------


def test_throttle_leading_and_trailing_flush() -> None:
    calls: list[float] = []
    t = Throttle(lambda: calls.append(time.monotonic()), interval=0.1)
    t.poke()
    assert len(calls) == 1  # leading edge: at once, on this thread
    for _ in range(1000):
        t.poke()
    assert len(calls) == 1
    time.sleep(0.25)
    assert len(calls) == 2  # one trailing flush for the 1000 coalesced pokes
    t.close()


def test_throttle_from_threads_never_exceeds_ten_per_second() -> None:
    t = Throttle(lambda: None, interval=0.1)
    stop = time.monotonic() + 1.5

    def hammer() -> None:
        while time.monotonic() < stop:
            t.poke()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(0.2)
    t.close()
    assert 10 <= len(t.flush_times) <= 18
    assert t.max_per_second() <= 10 + 1  # a window can hold both its edges


@pytest.fixture
def comm_messages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """Every comm message a widget sends: (time, widget id)."""
    sent: list[tuple[float, int]] = []
    original = ipywidgets.Widget._send

    def counting(self: Any, msg: Any, buffers: Any = None) -> None:
        if msg.get("method") == "update":
            sent.append((time.monotonic(), id(self)))
        original(self, msg, buffers)

    monkeypatch.setattr(ipywidgets.Widget, "_send", counting)
    return sent


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_flood_of_10000_llm_calls_is_throttled(
    run: nbagent.Run, dashboards: list[Dashboard], comm_messages: list[tuple[float, int]]
) -> None:
    d = make(run, dashboards)
    comm_messages.clear()
    d.throttle.flush_times.clear()
    run._emit({"type": "step_started", "step": "plan#1", "name": "plan", "reason": None})
    n_threads, per_thread = 4, 2500
    started = time.monotonic()

    def producer(k: int) -> None:
        for i in range(per_thread):
            run._emit(llm_event(i=i, seq=None, attempt=1 + k))
            if i % 25 == 0:
                time.sleep(0.02)  # spread the flood over ~2 s, from 4 threads at once

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - started
    record = {"duration_s": elapsed, "llm_calls": 10_000, "cost_usd": 10.0, "attempts": 1}
    run._emit({"type": "step_done", "step": "plan#1", "name": "plan", "record": record})
    wait_idle(d)
    assert d.state.events == 10_002
    assert d.state.steps["plan#1"].state == "done"
    assert d.state.steps["plan#1"].llm_calls == 10_000
    assert "10000 calls" not in d.page_label.value  # memory keeps the latest TRACE_KEEP
    assert f"{dash_mod.TRACE_KEEP} calls" in d.page_label.value
    flushes = list(d.throttle.flush_times)
    assert _max_in_window(flushes) <= 10, flushes
    # one comm message per changed widget per flush
    per_widget = collections.defaultdict(list)
    for ts, wid in comm_messages:
        per_widget[wid].append(ts)
    assert max(_max_in_window(v) for v in per_widget.values()) <= 10
    n_widgets = len(d._all_widgets())
    assert _max_in_window([ts for ts, _ in comm_messages]) <= 10 * n_widgets
    # the message rate, for the record
    rate = len(comm_messages) / max(elapsed, 1.0)
    print(
        f"\n10,000 events in {elapsed:.2f} s -> {len(flushes)} flushes, {len(comm_messages)} msgs "
        f"({rate:.0f}/s over {n_widgets} widgets)"
    )


def test_retry_countdown_ticks_without_events(
    run: nbagent.Run, dashboards: list[Dashboard]
) -> None:
    d = make(run, dashboards)
    run._emit({"type": "step_started", "step": "plan#1", "name": "plan", "reason": None})
    run._emit(
        {"type": "llm_retrying", "step": "plan#1", "attempt": 1, "wait_s": 2.5, "error": "503"}
    )
    time.sleep(0.15)
    first = d.steps_html.value
    assert "retrying (call attempt 2) in 3 s" in first
    time.sleep(1.2)  # no new events: the timer thread ticks the countdown
    later = d.steps_html.value
    assert "retrying (call attempt 2) in 2 s" in later or "in 1 s" in later
    time.sleep(1.6)
    assert ">running<" in d.steps_html.value


# -- widgets and controls ---------------------------------------------------------


def test_meter_widgets(run: nbagent.Run, dashboards: list[Dashboard]) -> None:
    spend(run, 0.0031)
    d = make(run, dashboards)
    assert "$0.0031 / $2.00" in d.meter.value
    assert d.bar.value == pytest.approx(0.0031 / 2.0)
    assert d.bar.bar_style == "info"
    spend(run, 1.6)
    run._emit({"type": "step_started", "step": "x#1", "name": "x"})
    wait_idle(d)
    assert d.bar.bar_style == "warning"  # amber at >= 80 %
    assert 'data-level="amber"' in d.meter.value
    with pytest.raises(nbagent.CostCapExceeded):
        run.reserve(1.0)
    wait_idle(d)
    assert d.bar.bar_style == "danger"
    assert 'data-level="red"' in d.meter.value
    assert "max_cost_usd" in d.alerts_html.value or "cap" in d.alerts_html.value


def test_controls_call_the_public_api(run: nbagent.Run, dashboards: list[Dashboard]) -> None:
    d = make(run, dashboards)
    assert not d.stop_button.disabled and d.resume_button.disabled
    d.stop_button.click()
    assert run.stopped == "stopped from the dashboard"
    trace = run.trace()
    control = trace[trace["kind"] == "control"]
    assert list(control["name"]) == ["stop"]
    with pytest.raises(nbagent.RunStopped):
        run.reserve(0.01)
    wait_idle(d)
    assert d.stop_button.disabled and not d.resume_button.disabled
    assert "STOPPED" in d.title.value
    d.resume_button.click()
    assert run.stopped is None
    assert list(run.trace().query("kind == 'control'")["name"]) == ["stop", "resume"]
    d.cap_input.value = 5.0
    d.cap_button.click()
    assert run.max_cost_usd == 5.0
    assert "cost cap is now $5.00" in d.message.value
    cap_rows = run.trace().query("kind == 'cap'")
    assert "changed from the dashboard" in cap_rows["detail"].iloc[-1]
    d.cap_input.value = -1.0
    d.cap_button.click()
    assert run.max_cost_usd == 5.0
    assert "cap not changed" in d.message.value


def test_busy_controls_say_so(run: nbagent.Run, dashboards: list[Dashboard]) -> None:
    d = make(run, dashboards)
    run._emit({"type": "step_started", "step": "plan#1", "name": "plan", "reason": None})
    wait_idle(d)
    assert "is running" in d.busy.value
    d.stop_button.click()
    assert run.stopped  # the click still acts (between cells), and says a cell was busy
    assert "Interrupt the kernel" in d.message.value
    run._emit({"type": "step_done", "step": "plan#1", "name": "plan", "record": {}})
    wait_idle(d)
    assert d.busy.value == ""


def test_trace_table_paging_filter_and_detail(
    run: nbagent.Run, dashboards: list[Dashboard]
) -> None:
    for i in range(25):
        step = "plan#1" if i < 15 else "act#1"
        run.record_event(
            kind="llm",
            step=step,
            model="gpt-test",
            status="ok",
            attempt=1,
            cost_usd=0.001,
            latency_s=0.1,
            request={"messages": [{"role": "user", "content": f"question {i}"}]},
            response={"text": f"answer {i}"},
        )
    d = make(run, dashboards)
    assert d.page_label.value == "page 1/3 · 25 calls"
    assert d.trace_html.value.count('class="nbagent-trace-row"') == 10
    d.older.click()
    wait_idle(d)
    assert d.page_label.value == "page 2/3 · 25 calls"
    d.step_filter.value = "act#1"
    wait_idle(d)
    assert d.page_label.value == "page 1/1 · 10 calls"
    assert "plan#1" not in d.trace_html.value
    d.row_select.value = 0  # the newest call of step act#1
    assert "question 24" in d.detail.value and "answer 24" in d.detail.value
    d.step_filter.value = "(all steps)"
    wait_idle(d)
    assert d.page_label.value == "page 1/3 · 25 calls"


def test_text_plain_of_widgets(run: nbagent.Run, dashboards: list[Dashboard]) -> None:
    spend(run, 0.42)
    d = make(run, dashboards)
    bundle = d._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("nbagent run 'dash': spend $0.42 / $2.00")
    assert d.widget._repr_mimebundle_()["text/plain"] == d.text()
    line = StepLine(run, "plan#1")
    try:
        assert line._repr_mimebundle_()["text/plain"] == "nbagent step 'plan' (live status)"
    finally:
        line.finish()


def test_widgets_available_is_the_one_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBAGENT_WIDGETS", raising=False)
    assert widgets_available() is False  # no kernel here
    monkeypatch.setenv("NBAGENT_WIDGETS", "1")
    assert widgets_available() is True
    monkeypatch.setenv("NBAGENT_WIDGETS", "0")
    assert widgets_available() is False


def test_missing_ipywidgets_gives_one_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run: nbagent.Run
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_widgets(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ImportError("No module named 'ipywidgets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_widgets)
    monkeypatch.setattr(dash_mod, "_warned_missing", False)
    monkeypatch.setenv("NBAGENT_WIDGETS", "1")
    first = show_dashboard(run)
    second = show_dashboard(run)
    assert isinstance(first, TextDashboard) and isinstance(second, TextDashboard)
    err = capsys.readouterr().err
    assert err.count("pip install ipywidgets") == 1
    assert "Traceback" not in err


def test_headless_show_dashboard_prints_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run: nbagent.Run
) -> None:
    monkeypatch.setenv("NBAGENT_WIDGETS", "0")
    spend(run, 0.0031)
    out = show_dashboard(run)
    assert isinstance(out, TextDashboard)
    printed = capsys.readouterr().out
    assert "spend $0.0031 / $2.00" in printed
    assert "(no steps yet)" in printed
    assert repr(out) == out.text()


def test_show_dashboard_with_widgets_replaces_the_old_one(
    monkeypatch: pytest.MonkeyPatch, run: nbagent.Run
) -> None:
    monkeypatch.setenv("NBAGENT_WIDGETS", "1")
    shown: list[Any] = []
    monkeypatch.setattr(dash_mod, "_display", shown.append)
    first = show_dashboard(run)
    second = show_dashboard(run)
    try:
        assert isinstance(first, Dashboard) and isinstance(second, Dashboard)
        assert shown == [first, second]
        assert first._on_event not in run._observers
    finally:
        assert isinstance(second, Dashboard)
        second.close()


# -- the step status line ----------------------------------------------------------


def test_step_line_live_then_static_summary(
    run: nbagent.Run, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = run.begin("plan", 1, "src", {})
    line = StepLine(run, "plan#1")
    run._emit(llm_event(step="plan#1", cost_usd=0.0031))
    run._emit(llm_event(step="other#1"))
    time.sleep(0.15)
    assert "running · attempt 1" in line.html.value
    assert "1 LLM call · $0.0031" in line.html.value
    run._emit({"type": "llm_retrying", "step": "plan#1", "attempt": 1, "wait_s": 2.0})
    time.sleep(0.15)
    assert "retrying in 2 s" in line.html.value
    ex.context.llm_calls, ex.context.cost_usd = 1, 0.0031
    ex.commit({}, outputs=[], result=None)
    line.finish()
    line.finish()  # idempotent
    out = capsys.readouterr().out
    assert out.count("✓ step 'plan' done · 1 attempt · ") == 1
    assert out.strip().endswith("1 LLM call · $0.0031")
    assert line.html.layout.display == "none"
    assert line._on_event not in run._observers


def test_step_status_line_in_ipython_finishes_after_the_cell(
    ip: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBAGENT_WIDGETS", "0")  # plain IPython: text only
    run = nbagent.Run("lines")
    ex = run.begin("plan", 1, "src", {})
    line = step_status_line(run, "plan#1")
    assert line.html is None
    ex.commit({}, outputs=[], result=None)
    ip.run_cell("1 + 1")  # its post_run_cell ends the line
    out = capsys.readouterr().out
    assert "✓ step 'plan' done" in out
    assert line.finished
    ip.run_cell("2 + 2")
    assert "step 'plan'" not in capsys.readouterr().out  # printed once, hook removed


def test_step_line_shows_its_widget_only_when_the_step_calls_an_llm(
    ip: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trivial step (most take a few ms) displays no widget, only its summary; a step
    that calls an LLM shows its live line when the first call is about to be sent."""
    monkeypatch.setenv("NBAGENT_WIDGETS", "1")
    shown: list[Any] = []
    monkeypatch.setattr(dash_mod, "_display", shown.append)
    ip.run_cell("%nbagent start lazy-line --no-dashboard")
    ip.user_ns["client"] = nbagent.simulated_client(run=ip.user_ns["__nbagent__"].run)
    assert ip.run_cell("%%step trivial\nx = 1").success
    assert shown == [] and "✓ step 'trivial' done" in capsys.readouterr().out
    src = (
        "%%step asks\n"
        "r = client.chat.completions.create(model='gpt-4o-mini', max_tokens=20,\n"
        "    messages=[{'role': 'user', 'content': 'hi'}])"
    )
    assert ip.run_cell(src).success
    (line,) = shown
    assert isinstance(line, StepLine) and line.step_id == "asks#1"
    assert line.html is not None and line.html.layout.display == "none"  # ended: hidden
    out = capsys.readouterr().out
    assert "✓ step 'asks' done" in out and "1 LLM call" in out
