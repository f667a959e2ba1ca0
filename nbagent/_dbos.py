"""nbagent steps as DBOS steps inside a DBOS workflow, on PostgreSQL (or SQLite).

When one machine is not enough, the same ``@run.step`` functions run on DBOS,
an existing durable-execution engine, instead of on something home-made::

    from nbagent import dbos_engine

    def main(run, topic):                       # run: the nbagent.Run of this run
        @run.step("plan")
        def plan():
            ...
        @run.step("write", retries=2)
        def write(outline):
            ...
        return write(plan())

    dbos_engine.run("research-1", main, "durable agents",
                    db_url="postgresql://user:pw@db/agents", max_cost_usd=2.0)

What runs where
    * One DBOS workflow per nbagent run, named ``nbagent.run``; its workflow
      ID, DBOS's idempotency key, is derived from the run's name:
      ``nbagent:<run>`` (``nbagent:<run>:2``, ``:3``, ... for later
      generations, see below).
    * Each ``@run.step`` call inside it is one DBOS step named after the
      nbagent step. DBOS records the step's output; when a crashed workflow
      is recovered, completed steps return their recorded output and are not
      executed again. Inside the DBOS step, nbagent's engine runs as always:
      step lock, step cap, retries, cost reservations, call ledger, trace,
      and its own step record (which also covers the gap between nbagent's
      commit and DBOS's record of the output).
    * State: DBOS's system tables and nbagent's store live in the same
      database. With a PostgreSQL URL nbagent's store is a
      :class:`nbagent._pgstore.PgStore` (schema ``nbagent``) shared by every
      worker on every machine, so caps, spend reservations, the call ledger,
      side-effect records and the trace hold across machines. With a
      ``sqlite:///`` URL (one machine) DBOS uses that SQLite file and nbagent
      the embedded store in ``$NBAGENT_DIR``.

Retries
    nbagent's retry loop runs *inside* the DBOS step (DBOS step retries stay
    off). nbagent's policy knows which errors are worth retrying, honours
    Retry-After, numbers attempts for the call ledger (so a retried step never
    pays twice for a call already answered) and traces each attempt; a step
    retried by DBOS instead would count one step execution per attempt
    against ``max_steps``. A step that still fails is recorded by DBOS as the
    step's error and fails the workflow.

Generations
    A workflow that finished (SUCCESS, ERROR, CANCELLED) is immutable in DBOS:
    started again with the same ID it only returns its recorded outcome. So
    running a finished run again starts the next generation
    (``nbagent:<run>:N+1``) in which every completed step replays from
    nbagent's store (source and inputs unchanged) and only failed, refused or
    edited steps execute: the same semantics as the embedded engine. A run
    that is PENDING (its process crashed, or was killed) is *recovered*: the
    same workflow resumes and DBOS replays its recorded steps.

Who executes a run
    The executing process holds the run's lock in the store (a PostgreSQL
    session advisory lock on PostgreSQL, freed by the server when the process
    dies on any machine). ``run_workflow`` recovers a PENDING workflow only
    when that lock is free, so a live run is never executed twice. Queue
    workers (:func:`work`) share batches enqueued with :func:`enqueue_runs`;
    DBOS hands each workflow to one worker. Give each worker process a stable,
    distinct ``worker_id``: a worker restarted with the same ID recovers the
    workflows it was executing when it died.

Workers import ``main_fn`` by name, so it must be a module-level function
(of an importable module, or of the script file that was run).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import contextvars
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import pickle
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle

from ._engine import Execution, Run, check_name, current_run
from ._errors import NbagentError, StepLockedError
from ._pgstore import is_postgres_url, mask_url, open_pg_store
from ._store import Store, open_store

log = logging.getLogger("nbagent")

F = TypeVar("F", bound=Callable[..., Any])

#: DBOS names: application, the one workflow function, the batch queue.
APP_NAME = "nbagent"
WORKFLOW_NAME = "nbagent.run"
QUEUE_NAME = "nbagent"
#: DBOS application version: the contract of nbagent's workflow function, not
#: a hash of user code (DBOS would strand runs whenever agent code changed;
#: nbagent's own step records already detect edited steps).
APP_VERSION = "nbagent-workflow-1"
#: Lock id (in the store's step-lock space) held by the process executing a run.
RUN_LOCK = "(workflow)"

_FINISHED = {"SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"}


class DbosEngineError(NbagentError):
    """The DBOS engine cannot start or cannot run what it was given."""


def _import_dbos() -> Any:
    try:
        import dbos
    except ImportError as e:
        raise DbosEngineError(
            "running on DBOS needs the DBOS extra, which is not installed: "
            "pip install 'nbagent[dbos]'"
        ) from e
    return dbos


# -- the engine (DBOS is one instance per process) ------------------------------------


@dataclass
class Engine:
    """nbagent on a launched DBOS: the database, nbagent's store, this executor."""

    db_url: str
    store: Store
    executor_id: str
    worker: bool
    queue_name: str
    _workflow: Callable[..., Any] = field(repr=False)
    #: a queue only this process listens to: recovered runs resume here
    private_queue: str = ""

    # -- identity of a run's workflow -------------------------------------------

    def workflow_id(self, run_name: str) -> str:
        """The DBOS workflow ID of the run's current generation."""
        rec = self.store.get_record("dbos", run_name) or {}
        return str(rec.get("workflow_id") or f"nbagent:{run_name}")

    def _next_generation(self, run_name: str, finished_id: str) -> str:
        with self.store.transaction():
            rec = self.store.get_record("dbos", run_name) or {}
            current = rec.get("workflow_id") or f"nbagent:{run_name}"
            if current != finished_id:  # another process started the next one already
                return str(current)
            gen = int(rec.get("generation", 1)) + 1
            wid = f"nbagent:{run_name}:{gen}"
            self.store.set_record("dbos", run_name, {"workflow_id": wid, "generation": gen})
        return wid

    def status(self, run_name: str) -> Any:
        """DBOS's WorkflowStatus of the run's current generation (None if never started)."""
        dbos = _import_dbos()
        return dbos.DBOS.get_workflow_status(self.workflow_id(run_name))

    def _run_lock_free(self, run_name: str) -> bool:
        try:
            self.store.acquire_lock(run_name, RUN_LOCK)
        except StepLockedError:
            return False
        self.store.release_lock(run_name, RUN_LOCK)
        return True

    # -- running ---------------------------------------------------------------------

    def run_workflow(
        self,
        run_name: str,
        main_fn: Callable[..., Any],
        *args: Any,
        max_cost_usd: float | None = None,
        max_steps: int | None = None,
        max_llm_calls: int | None = None,
        rerun_finished: bool = True,
        pass_run: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run ``main_fn(run, *args, **kwargs)`` as the run's DBOS workflow; return its result.

        ``pass_run=False`` calls ``main_fn(*args, **kwargs)``: for programs whose
        steps belong to a module-level run made under :func:`program_runs`.

        New run: executes it here, in this thread. Crashed (PENDING, its
        executor gone): recovers it, DBOS replaying completed steps. Running
        or queued elsewhere: waits for it. Finished: starts the next
        generation (``rerun_finished=False`` returns the recorded outcome instead).
        """
        dbos = _import_dbos()
        run_name = check_name("run", run_name)
        target = target_of(main_fn)
        _targets[target] = main_fn
        options = {**_caps(max_cost_usd, max_steps, max_llm_calls), "pass_run": pass_run}
        wid = self.workflow_id(run_name)
        status = dbos.DBOS.get_workflow_status(wid)
        if status is not None and status.status in _FINISHED:
            if not rerun_finished:
                return dbos.DBOS.retrieve_workflow(wid).get_result()
            wid = self._next_generation(run_name, wid)
            status = dbos.DBOS.get_workflow_status(wid)
        if status is None:
            log.info("nbagent: run %r starts DBOS workflow %s", run_name, wid)
            with dbos.SetWorkflowID(wid):
                return self._workflow(run_name, target, args, kwargs, options)
        if (
            status.status == "PENDING"
            and status.executor_id != self.executor_id
            and self._run_lock_free(run_name)
        ):
            log.info("nbagent: recovering DBOS workflow %s of run %r", wid, run_name)
            dbos.DBOS.resume_workflow(wid, queue_name=self.private_queue)
        return dbos.DBOS.retrieve_workflow(wid).get_result()

    def enqueue_runs(
        self,
        run_names: Iterable[str],
        main_fn: Callable[..., Any],
        *args: Any,
        max_cost_usd: float | None = None,
        max_steps: int | None = None,
        max_llm_calls: int | None = None,
        **kwargs: Any,
    ) -> dict[str, str]:
        """Put one workflow per run on the queue for workers; returns run -> workflow ID.

        Runs already queued or executing are left as they are; finished ones
        get their next generation.
        """
        dbos = _import_dbos()
        target = target_of(main_fn, for_workers=True)
        options = _caps(max_cost_usd, max_steps, max_llm_calls)
        queue = dbos.DBOS.retrieve_queue(self.queue_name)
        if queue is None:
            queue = dbos.DBOS.register_queue(self.queue_name, worker_concurrency=1)
        ids: dict[str, str] = {}
        for name in run_names:
            name = check_name("run", name)
            wid = self.workflow_id(name)
            status = dbos.DBOS.get_workflow_status(wid)
            if status is not None and status.status in _FINISHED:
                wid = self._next_generation(name, wid)
                status = dbos.DBOS.get_workflow_status(wid)
            if status is None:
                with dbos.SetWorkflowID(wid):
                    queue.enqueue(self._workflow, name, target, args, kwargs, options)
            ids[name] = wid
        return ids

    def wait(self, workflow_ids: Iterable[str]) -> dict[str, Any]:
        """Wait for workflows; returns workflow ID -> result (re-raises the first error)."""
        dbos = _import_dbos()
        return {w: dbos.DBOS.retrieve_workflow(w).get_result() for w in workflow_ids}

    def queue_idle(self) -> bool:
        """True when no workflow of the queue is waiting or executing."""
        dbos = _import_dbos()
        busy = dbos.DBOS.list_workflows(
            queue_name=self.queue_name,
            status=["ENQUEUED", "PENDING"],
            load_input=False,
            load_output=False,
            limit=1,
        )
        return not busy

    def shutdown(self) -> None:
        shutdown()


_engine: Engine | None = None
_engine_lock = threading.Lock()
_run_var: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "nbagent_dbos_run", default=None
)
_targets: dict[str, Callable[..., Any]] = {}


def _caps(usd: float | None, steps: int | None, calls: int | None) -> dict[str, Any]:
    return {"max_cost_usd": usd, "max_steps": steps, "max_llm_calls": calls}


def _sys_db_url(url: str) -> str:
    """The URL as DBOS's SQLAlchemy engine wants it (psycopg 3 for PostgreSQL)."""
    if is_postgres_url(url):
        rest = url.split("://", 1)[1]
        return f"postgresql+psycopg://{rest}"
    return url


class _CloudpickleSerializer:
    """DBOS serializer for step outputs and workflow inputs: cloudpickle.

    Classes and functions defined in the agent's script are pickled by value,
    so a worker whose ``__main__`` is not that script can still load them.
    """

    def serialize(self, data: Any) -> str:
        return base64.b64encode(cloudpickle.dumps(data)).decode()

    def deserialize(self, serialized_data: str) -> Any:
        return pickle.loads(base64.b64decode(serialized_data))

    def name(self) -> str:
        return "nbagent_cloudpickle"


_registered: tuple[Any, Callable[..., Any]] | None = None


def _workflow_function(dbos: Any) -> Callable[..., Any]:
    """nbagent's one DBOS workflow, registered once per DBOS registry."""
    global _registered
    from dbos import _dbos as dbos_internal

    registry = dbos_internal._get_or_create_dbos_registry()
    if _registered is not None and _registered[0] is registry:
        return _registered[1]

    def nbagent_run(
        run_name: str,
        target: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
    ) -> Any:
        return _execute(run_name, target, args, kwargs, options)

    wf = dbos.DBOS.workflow(name=WORKFLOW_NAME)(nbagent_run)
    _registered = (registry, wf)
    return wf


def _execute(
    run_name: str,
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> Any:
    """The body of a run's workflow: open the run, call ``main_fn(run, ...)``."""
    engine = current_engine()
    fn = resolve_target(target)
    store = engine.store
    store.acquire_lock(run_name, RUN_LOCK)
    try:
        if not options.get("pass_run", True):
            return fn(*args, **kwargs)
        run = DbosRun(
            run_name,
            store=store,
            activate=not engine.worker,
            max_cost_usd=options.get("max_cost_usd"),
            max_steps=options.get("max_steps"),
            max_llm_calls=options.get("max_llm_calls"),
        )
        token = _run_var.set(run)
        try:
            return fn(run, *args, **kwargs)
        finally:
            _run_var.reset(token)
            run.close()
    finally:
        store.release_lock(run_name, RUN_LOCK)


def launch(
    db_url: str | None = None,
    *,
    store: Store | None = None,
    executor_id: str | None = None,
    worker: bool = False,
    queue: str = QUEUE_NAME,
    worker_concurrency: int = 1,
    log_level: str = "WARNING",
) -> Engine:
    """Configure and launch DBOS on ``db_url`` with nbagent's store beside it.

    :param db_url: ``postgresql://...`` (many machines) or ``sqlite:///file``
        (one machine); default ``$NBAGENT_DB_URL``.
    :param store: nbagent's store; default a PgStore on the same PostgreSQL
        database, or the embedded store in ``$NBAGENT_DIR`` for SQLite.
    :param executor_id: DBOS executor ID. Default: unique to this process
        (crashed runs are recovered by :meth:`Engine.run_workflow`); workers
        use ``nbagent-worker:<worker_id>``.
    :param worker: dequeue runs from ``queue`` (else only run what this
        process starts).
    :param worker_concurrency: runs one worker executes at once.
    """
    global _engine
    dbos = _import_dbos()
    url = db_url or os.environ.get("NBAGENT_DB_URL") or ""
    if not url:
        raise DbosEngineError(
            "no database for the DBOS engine: pass --db URL or set NBAGENT_DB_URL "
            "(postgresql://user:password@host:5432/db, or sqlite:///nbagent.sqlite for one machine)."
        )
    if not (is_postgres_url(url) or url.startswith("sqlite:")):
        raise DbosEngineError(
            f"the database URL {mask_url(url)} is neither PostgreSQL nor SQLite: use "
            "postgresql://user:password@host:5432/db or sqlite:///path/to/file.sqlite."
        )
    with _engine_lock:
        if _engine is not None:
            if _engine.db_url == url and _engine.worker == worker:
                return _engine
            raise DbosEngineError(
                f"DBOS is already launched in this process on {mask_url(_engine.db_url)}; "
                "call nbagent.dbos_engine.shutdown() first."
            )
        if store is None:
            store = open_pg_store(url) if is_postgres_url(url) else open_store()
        if executor_id is None:
            executor_id = f"nbagent:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        config: dict[str, Any] = {
            "name": APP_NAME,
            "system_database_url": _sys_db_url(url),
            "application_version": APP_VERSION,
            "executor_id": executor_id,
            "log_level": log_level,
            "serializer": _CloudpickleSerializer(),
            "notification_listener_polling_interval_sec": 0.1,
        }
        wf = _workflow_function(dbos)
        private = "nbagent-exec-" + hashlib.sha1(executor_id.encode()).hexdigest()[:16]
        try:
            dbos.DBOS(config=config)  # type: ignore[arg-type]
            dbos.DBOS.listen_queues([queue, private] if worker else [private])
            dbos.DBOS.launch()
            dbos.DBOS.register_queue(private, polling_interval_sec=0.1, on_conflict="always_update")
            if worker or dbos.DBOS.retrieve_queue(queue) is None:
                dbos.DBOS.register_queue(
                    queue,
                    worker_concurrency=worker_concurrency,
                    polling_interval_sec=0.2,
                    on_conflict="always_update",
                )
        except Exception as e:
            with contextlib.suppress(Exception):
                dbos.DBOS.destroy(workflow_completion_timeout_sec=0)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DbosEngineError(
                f"DBOS could not start on {mask_url(url)} ({type(e).__name__}: {first}). "
                "Check that the database is reachable and the URL is right "
                "(--db URL or NBAGENT_DB_URL)."
            ) from e
        _engine = Engine(
            db_url=url,
            store=store,
            executor_id=executor_id,
            worker=worker,
            queue_name=queue,
            _workflow=wf,
            private_queue=private,
        )
        return _engine


def current_engine() -> Engine:
    if _engine is None:
        raise DbosEngineError(
            "the DBOS engine is not launched in this process: call "
            "nbagent.dbos_engine.launch(db_url) first."
        )
    return _engine


def shutdown() -> None:
    """Stop DBOS in this process (runs in flight stay PENDING and are recovered later)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            return
        engine, _engine = _engine, None
        dbos = _import_dbos()
        with contextlib.suppress(Exception):
            if not dbos.DBOS.list_workflows(
                queue_name=engine.private_queue,
                status=["ENQUEUED", "PENDING"],
                load_input=False,
                load_output=False,
                limit=1,
            ):
                dbos.DBOS.delete_queue(engine.private_queue)
        dbos.DBOS.destroy(workflow_completion_timeout_sec=0)


# -- the one-call front doors (what `nbagent run --engine dbos` calls) ----------------


def run(
    run_name: str,
    main_fn: Callable[..., Any],
    *args: Any,
    db_url: str | None = None,
    max_cost_usd: float | None = None,
    max_steps: int | None = None,
    max_llm_calls: int | None = None,
    **kwargs: Any,
) -> Any:
    """Launch DBOS, run ``main_fn(run, *args, **kwargs)`` as run ``run_name``, shut down."""
    engine = launch(db_url)
    try:
        return engine.run_workflow(
            run_name,
            main_fn,
            *args,
            max_cost_usd=max_cost_usd,
            max_steps=max_steps,
            max_llm_calls=max_llm_calls,
            **kwargs,
        )
    finally:
        shutdown()


def run_workflow(run_name: str, main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:meth:`Engine.run_workflow` on the launched engine."""
    return current_engine().run_workflow(run_name, main_fn, *args, **kwargs)


def enqueue_runs(
    run_names: Iterable[str], main_fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> dict[str, str]:
    """:meth:`Engine.enqueue_runs` on the launched engine."""
    return current_engine().enqueue_runs(run_names, main_fn, *args, **kwargs)


def work(
    db_url: str | None = None,
    *,
    worker_id: str | None = None,
    concurrency: int = 1,
    until_idle: bool = False,
    idle_checks: int = 3,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
) -> None:
    """A queue worker: execute runs enqueued with :func:`enqueue_runs` until stopped.

    :param worker_id: stable, distinct per worker process (default: the host
        name); a worker restarted with the same ID recovers the runs it was
        executing when it died.
    :param until_idle: return once the queue stayed empty for ``idle_checks`` polls.
    """
    wid = worker_id or socket.gethostname()
    engine = launch(
        db_url, executor_id=f"nbagent-worker:{wid}", worker=True, worker_concurrency=concurrency
    )
    idle = 0
    try:
        while not (stop is not None and stop.is_set()):
            time.sleep(poll_s)
            if until_idle:
                idle = idle + 1 if engine.queue_idle() else 0
                if idle >= idle_checks:
                    return
    finally:
        shutdown()


# -- steps as DBOS steps --------------------------------------------------------------


def _in_workflow() -> bool:
    try:
        from dbos._context import get_local_dbos_context
    except ImportError:
        return False
    ctx = get_local_dbos_context()
    return ctx is not None and ctx.is_workflow()


class DbosRun(Run):
    """A Run whose ``@run.step`` functions execute as DBOS steps inside a DBOS workflow.

    Outside a workflow its steps behave exactly as a plain Run's. Its store
    defaults to the launched engine's store.
    """

    def __init__(self, name: str, store: Any = None, **kwargs: Any) -> None:
        if store is None and _engine is not None:
            store = _engine.store
        super().__init__(name, store, **kwargs)

    def step(
        self,
        name: str | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        rerun: bool = False,
        policy: Any = None,
    ) -> Callable[[F], F]:
        base = super().step(name, retries=retries, timeout=timeout, rerun=rerun, policy=policy)

        def decorate(fn: F) -> F:
            inner = base(fn)
            step_name: str = inner.__nbagent_step__  # type: ignore[attr-defined]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not _in_workflow():
                    return inner(*args, **kwargs)
                return _dbos_step(self, step_name, inner, args, kwargs)

            wrapper.__nbagent_step__ = step_name  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        return decorate

    def wrap_cell_step(self, step_name: str, step: Callable[[], None]) -> Callable[[], None]:
        """An exported notebook cell (:func:`nbagent.cell_step`) as a DBOS step.

        The cell's results are module globals kept in nbagent's store, not a
        return value: when DBOS returns the step's recorded output without
        executing it (a recovered workflow), the cell step runs outside DBOS
        and replays from the store, restoring its globals and output.
        """

        @functools.wraps(step)
        def wrapper() -> None:
            if not _in_workflow():
                return step()
            dbos = _import_dbos()
            ran = False

            def body() -> None:
                nonlocal ran
                ran = True
                step()

            dbos.DBOS.run_step({"name": step_name, "retries_allowed": False}, body)
            if not ran:
                step()
            return None

        wrapper.__nbagent_step__ = step_name  # type: ignore[attr-defined]
        return wrapper


def _dbos_step(
    run: Run,
    step_name: str,
    inner: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    dbos = _import_dbos()
    ran = False

    def body(*a: Any, **k: Any) -> Any:
        nonlocal ran
        ran = True
        return inner(*a, **k)

    result = dbos.DBOS.run_step(
        {"name": step_name, "retries_allowed": False}, body, *args, **kwargs
    )
    if not ran:
        # DBOS returned the recorded output: keep nbagent's occurrence count in
        # step with the workflow, and show the replay as the embedded engine does.
        occurrence = run.next_occurrence(step_name)
        step_id = f"{step_name}#{occurrence}"
        record = run.store.get_step(run.name, step_id)
        if record is not None:
            Execution(run, step_name, occurrence, "", {}, record=record).print_replay()
        else:
            run.record_event(
                kind="step", name=step_name, step=step_id, status="replayed", replayed=1
            )
    return result


@contextlib.contextmanager
def program_runs() -> Iterator[None]:
    """While a program's module code executes, ``nbagent.Run(...)`` makes a :class:`DbosRun`.

    For programs written for the embedded engine (a module-level ``run =
    nbagent.Run(...)`` and ``@run.step`` functions, or an exported notebook's
    ``@nbagent.cell_step`` cells): their steps become DBOS steps and their run
    uses the engine's store. Then run the program's main block with
    ``engine.run_workflow(run.name, main, pass_run=False)``. However the
    program imported it (``nbagent.Run``, ``from nbagent import Run``), ``Run``
    makes a DbosRun while this is active: keep it active while the main block
    runs if the program opens runs there too.
    """
    from . import _engine

    current_engine()
    saved = _engine._run_class
    _engine._run_class = DbosRun
    try:
        yield
    finally:
        _engine._run_class = saved


def step(
    name: str | None = None,
    *,
    retries: int = 0,
    timeout: float | None = None,
    rerun: bool = False,
    policy: Any = None,
) -> Callable[[F], F]:
    """A module-level step decorator bound, at call time, to the run being executed.

    Inside a DBOS workflow that is the workflow's run (so one module of steps
    serves every run of a batch); elsewhere the current run
    (:func:`nbagent.current_run`), so the same module runs on the embedded engine.
    """

    def decorate(fn: F) -> F:
        step_name = check_name("step", name or fn.__name__)
        bound: weakref.WeakKeyDictionary[Run, Callable[..., Any]] = weakref.WeakKeyDictionary()

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            active = _run_var.get() or current_run()
            assert active is not None
            call = bound.get(active)
            if call is None:
                call = bound[active] = active.step(
                    step_name, retries=retries, timeout=timeout, rerun=rerun, policy=policy
                )(fn)
            return call(*args, **kwargs)

        wrapper.__nbagent_step__ = step_name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# -- naming main_fn so another process can find it -------------------------------------


def target_of(fn: Callable[..., Any], *, for_workers: bool = False) -> str:
    """``module:qualname``, or ``file:/path/script.py:qualname`` for the script being run."""
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not callable(fn) or not qualname or not module:
        raise DbosEngineError(f"{fn!r} is not a function: pass the run's main function.")
    if "<locals>" in qualname or "<lambda>" in qualname:
        if for_workers:
            raise DbosEngineError(
                f"{qualname} is defined inside another function or is a lambda: workers "
                "import the run's main function by name, so define it at module level."
            )
        return f"local:{id(fn)}:{qualname}"
    if module.startswith("nbagent_agent_"):  # a script loaded by load_script()
        path = getattr(sys.modules.get(module), "__file__", None)
        if path:
            return f"file:{Path(path).resolve()}:{qualname}"
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if not path:
            if for_workers:
                raise DbosEngineError(
                    f"{qualname} is defined in an interactive session: workers import the "
                    "run's main function by name, so put it in a module or script file."
                )
            return f"local:{id(fn)}:{qualname}"
        return f"file:{Path(path).resolve()}:{qualname}"
    return f"{module}:{qualname}"


_loaded_files: dict[str, Any] = {}


def load_script(path: str | os.PathLike[str]) -> Any:
    """Import a script file as a module (once per process); its ``__main__`` block does not run."""
    path = str(Path(path).resolve())
    module = _loaded_files.get(path)
    if module is not None:
        return module
    if not Path(path).is_file():
        raise DbosEngineError(
            f"the run's script {path} is not on this machine: workers need the same code "
            "at the same path (or make it an importable module)."
        )
    name = "nbagent_agent_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(Path(path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec.loader.exec_module(module)
    _loaded_files[path] = module
    return module


def resolve_target(target: str) -> Callable[..., Any]:
    """The function a target names (importing its module or script if needed)."""
    fn = _targets.get(target)
    if fn is not None:
        return fn
    if target.startswith("local:"):
        raise DbosEngineError(
            f"the run's main function {target.rsplit(':', 1)[-1]} was defined in another "
            "process's session and cannot be found here: define it at module level."
        )
    if target.startswith("file:"):
        path, qualname = target[len("file:") :].rsplit(":", 1)
        main = sys.modules.get("__main__")
        main_file = getattr(main, "__file__", None)
        if main_file and Path(main_file).resolve() == Path(path):
            module: Any = main
        else:
            module = load_script(path)
    else:
        modname, qualname = target.rsplit(":", 1)
        module = importlib.import_module(modname)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise DbosEngineError(f"{qualname} is not defined in {target.rsplit(':', 1)[0]}")
    _targets[target] = obj
    return obj  # type: ignore[no-any-return]


# -- `python -m nbagent.dbos_engine worker --db URL` ------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbagent.dbos_engine",
        description="nbagent on DBOS: a queue worker that executes enqueued runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="execute runs from the nbagent DBOS queue")
    w.add_argument("--db", default=None, help="database URL (default $NBAGENT_DB_URL)")
    w.add_argument("--worker-id", default=None, help="stable, distinct id of this worker")
    w.add_argument("--concurrency", type=int, default=1, help="runs executed at once")
    w.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    w.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        help="module or script to import first (e.g. one that defines its own queue steps)",
    )
    ns = parser.parse_args(argv)
    for item in ns.imports:
        if item.endswith(".py"):
            load_script(item)
        else:
            importlib.import_module(item)
    try:
        work(ns.db, worker_id=ns.worker_id, concurrency=ns.concurrency, until_idle=ns.until_idle)
    except KeyboardInterrupt:
        return 130
    except NbagentError as e:
        print(f"nbagent: {e}", file=sys.stderr)
        return 2
    return 0
