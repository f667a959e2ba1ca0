"""Side effects that happen at most once: ``nbagent.once`` and ``@nbagent.effect``.

A step that charges a card, sends an email or creates a ticket may run more
than once: a retry after a timeout, a re-execution after a kernel died. Each
effect gets a key derived from run state (``run:R:step:S:1:charge``) and its
outcome is recorded in the store, so a second run of the step gets the
recorded outcome instead of acting again.

One window remains: the effect happened, then the process died before the
outcome was recorded. nbagent cannot close it alone, which is why ``fn``
receives the key: pass it to the external system (Stripe's
``idempotency_key``, an ``Idempotency-Key`` header) and the system
recognises the repeat. A record marked ``started`` but never ``done`` tells
nbagent (and the trace) that a repeat went through that window.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

from ._engine import current_step, dumps_value, loads_value
from ._errors import NbagentError, StoreError

T = TypeVar("T")


def once(label: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(key, *args, **kwargs)`` at most once per idempotency key; return its outcome.

    The key is the current step's key plus ``label`` (and a counter when the
    same label is used twice in one step). A retried or re-executed step gets
    the recorded outcome back without calling ``fn``.
    """
    ctx = current_step()
    if ctx is None:
        raise NbagentError(
            f"nbagent.once({label!r}, ...) must run inside a step, where its key can be derived "
            "from run state: call it from a `%%step` cell or a function decorated with @run.step."
        )
    n = ctx.effect_index.get(label, 0) + 1
    ctx.effect_index[label] = n
    key = ctx.idempotency_key(label if n == 1 else f"{label}:{n}")
    run, store = ctx.run, ctx.run.store
    record_key = f"{run.name}/{key}"
    record = store.get_record("effect", record_key)
    if record is not None and record.get("status") == "done":
        payload = store.get_blob(f"{run.name}/(effects)/{key}")
        if payload is None and record.get("stored"):
            raise StoreError(
                f"the recorded outcome of effect {key!r} is missing from the nbagent store at "
                f"{store.path}. The effect already happened and is not done again; restore the "
                "store from a backup, or drop the step with `%nbagent reset STEP` and re-run it "
                "(the key is the same, so an idempotent service answers with the first outcome)."
            )
        result = loads_value(payload) if payload is not None else None
        run.record_event(
            kind="effect", name=label, status="replayed", replayed=1, idempotency_key=key
        )
        run._emit({"type": "effect", "name": label, "key": key, "status": "replayed"})
        return result  # type: ignore[no-any-return,return-value]
    window = record is not None  # started before, never recorded: the crash window
    store.set_record("effect", record_key, {"status": "started", "label": label, "at": time.time()})
    t0 = time.perf_counter()
    try:
        result = fn(key, *args, **kwargs)
    except BaseException as e:
        store.delete_record("effect", record_key)
        run.record_event(
            kind="effect", name=label, status="error", idempotency_key=key,
            error=f"{type(e).__name__}: {e}", latency_s=time.perf_counter() - t0,
        )  # fmt: skip
        raise
    try:
        blob: bytes | None = dumps_value(result)
    except Exception:  # an outcome that cannot be pickled is recorded as done without a value
        blob = None
    if blob is not None:  # a store failure here raises: the record stays "started"
        store.put_blob(f"{run.name}/(effects)/{key}", blob)
    stored = blob is not None
    store.set_record(
        "effect",
        record_key,
        {"status": "done", "label": label, "at": time.time(), "stored": stored},
    )
    run.record_event(
        kind="effect", name=label, status="ok", idempotency_key=key,
        latency_s=time.perf_counter() - t0, detail={"after_crash_window": window},
    )  # fmt: skip
    run._emit(
        {"type": "effect", "name": label, "key": key, "status": "ok", "after_crash_window": window}
    )
    return result


@overload
def effect(fn: Callable[..., T], /) -> Callable[..., T]: ...
@overload
def effect(label: str | None = None, /) -> Callable[[Callable[..., T]], Callable[..., T]]: ...


def effect(arg: Any = None, /) -> Any:
    """Decorator form of :func:`once`: ``@nbagent.effect`` or ``@nbagent.effect("charge")``.

    The decorated function receives the idempotency key as its first argument;
    callers pass only the rest.
    """

    def decorate(fn: Callable[..., T], label: str | None = None) -> Callable[..., T]:
        name = label or fn.__name__

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return once(name, fn, *args, **kwargs)

        return wrapper

    if callable(arg):
        return decorate(arg)
    return lambda fn: decorate(fn, arg)
