"""Per-call overhead of the traced client over the bare openai client (same mock transport).

Run: ``python bench/bench_client.py [calls]``. Prints a markdown table. Goal: <= 0.3 ms per
call for tracing plus the durable writes (reservation, settlement, trace row, ledger).

Every configuration runs in its own fresh process (its own store), so one cannot warm or
slow another: interleaving them in one process proved misleading (SQLite WAL checkpoints
and allocator state of one series leak into the next). Each process warms up, then times
``calls`` calls of the real ``openai.OpenAI`` on ``httpx2.MockTransport`` answering a fixed
chat completion instantly, so the difference from "bare" is nbagent's work only. The
transport's own time (``TracedTransport.handle_request`` minus the mock) and the durable
writes alone are timed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx2
import openai

REPLY = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "A short answer for the benchmark."},
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
}
BODY = json.dumps(REPLY).encode()
MESSAGES: list[Any] = [{"role": "user", "content": "Question: what is the benchmark measuring?"}]
MODES = {
    "bare": "bare openai client",
    "traced": "traced, outside a step",
    "step": "traced, inside a step (+ call ledger)",
}


def handler(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=BODY, headers={"content-type": "application/json"})


def one(mode: str, calls: int) -> dict[str, float]:
    """Time ``calls`` calls in this process; returns medians in ms."""
    tmp = tempfile.mkdtemp(prefix="nbagent-bench-")
    os.environ["NBAGENT_DIR"] = os.path.join(tmp, "store")
    os.environ["NBAGENT_KEY_DIR"] = os.path.join(tmp, "keys")
    import nbagent
    from nbagent._engine import Execution

    run = nbagent.Run("bench")
    kwargs: dict[str, Any] = {"api_key": "sk-bench", "base_url": "https://bench.invalid/v1"}
    hc = httpx2.Client(transport=httpx2.MockTransport(handler))
    if mode == "bare":
        client = openai.OpenAI(max_retries=0, http_client=hc, **kwargs)
    else:
        client = nbagent.openai_client(http_client=hc, **kwargs)

    inside: list[float] = []
    transport = hc._transport
    if mode != "bare":
        traced_handle = transport.handle_request
        mock_handle = transport.inner.handle_request  # type: ignore[attr-defined]
        mock_s: list[float] = []

        def timed_mock(request: httpx2.Request) -> httpx2.Response:
            t0 = time.perf_counter()
            try:
                return mock_handle(request)
            finally:
                mock_s.append(time.perf_counter() - t0)

        def timed_traced(request: httpx2.Request) -> httpx2.Response:
            t0 = time.perf_counter()
            try:
                return traced_handle(request)
            finally:
                inside.append(time.perf_counter() - t0 - mock_s.pop())

        transport.inner.handle_request = timed_mock  # type: ignore[attr-defined]
        transport.handle_request = timed_traced  # type: ignore[method-assign]

    def call() -> Any:
        return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)

    ex = Execution(run, "bench-step", 1, "src", {})
    with ex.attempt(1) if mode == "step" else contextlib.nullcontext():
        for _ in range(300):  # warm-up: imports, price book, SQLite pages
            call()
        inside.clear()
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
    out = {"median": statistics.median(samples) * 1000}
    out["p90"] = statistics.quantiles(samples, n=10)[-1] * 1000
    if inside:
        out["transport"] = statistics.median(inside) * 1000

    if mode == "step":  # the durable writes alone, as the transport does them
        store = run.store
        n = [0]

        def writes() -> None:
            n[0] += 1
            with store.transaction():
                reservation = run.reserve(0.001)
            with store.transaction():
                run.settle(reservation, 0.0005)
                store.set_record("llm", f"bench/{n[0]}", {"status": 200, "body": BODY.decode()})
            run.record_event(kind="llm", name="bench", status="ok", request="{}", response="{}")

        for _ in range(200):
            writes()
        ws = []
        for _ in range(calls):
            t0 = time.perf_counter()
            writes()
            ws.append(time.perf_counter() - t0)
        out["writes"] = statistics.median(ws) * 1000
    return out


def measure(mode: str, calls: int, repeats: int = 3) -> dict[str, float]:
    """Median over ``repeats`` fresh processes (process-to-process spread is ~0.1 ms)."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", mode, str(calls)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(calls: int = 3000) -> None:
    results = {mode: measure(mode, calls) for mode in MODES}
    base = results["bare"]["median"]
    print(f"{calls} calls per configuration, median of 3 fresh processes each; ms per call\n")
    print("| configuration | median | p90 | overhead vs bare | traced transport's own time |")
    print("|---|---|---|---|---|")
    for mode, label in MODES.items():
        r = results[mode]
        over = "" if mode == "bare" else f"+{r['median'] - base:.3f}"
        own = f"{r['transport']:.3f}" if "transport" in r else ""
        print(f"| {label} | {r['median']:.3f} | {r['p90']:.3f} | {over} | {own} |")
    print(
        f"| durable writes alone (reserve, settle + ledger, trace row) | "
        f"{results['step']['writes']:.3f} | | | |"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]))))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
