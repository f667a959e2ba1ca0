"""nbagent on DBOS: the same steps as a DBOS workflow and DBOS steps, on PostgreSQL or SQLite.

Public entry points (see :mod:`nbagent._dbos` for the design)::

    from nbagent import dbos_engine

    dbos_engine.run("research-1", main, db_url="postgresql://...")   # launch, run, shut down

    engine = dbos_engine.launch("postgresql://...")                   # or step by step
    engine.run_workflow("research-1", main, max_cost_usd=2.0)
    ids = engine.enqueue_runs(["r1", "r2", "r3"], main)               # a batch for workers
    engine.wait(ids.values())
    dbos_engine.shutdown()

    python -m nbagent.dbos_engine worker --db postgresql://... --worker-id w1

Importing this module does not import DBOS: a missing extra is reported, with
the command that installs it, when the engine is first used.
"""

from __future__ import annotations

import sys

from ._dbos import (
    APP_VERSION,
    QUEUE_NAME,
    WORKFLOW_NAME,
    DbosEngineError,
    DbosRun,
    Engine,
    current_engine,
    enqueue_runs,
    launch,
    load_script,
    main,
    program_runs,
    run,
    run_workflow,
    shutdown,
    step,
    work,
)
from ._pgstore import PgStore, open_pg_store

__all__ = [
    "APP_VERSION",
    "QUEUE_NAME",
    "WORKFLOW_NAME",
    "DbosEngineError",
    "DbosRun",
    "Engine",
    "PgStore",
    "current_engine",
    "enqueue_runs",
    "launch",
    "load_script",
    "open_pg_store",
    "program_runs",
    "run",
    "run_workflow",
    "shutdown",
    "step",
    "work",
]

if __name__ == "__main__":
    sys.exit(main())
