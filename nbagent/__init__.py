"""nbagent: durable, idempotent, observable and cost-capped LLM agents in Jupyter.

In a notebook::

    %load_ext nbagent
    %nbagent start research-1 --cap-usd 2.00 --max-steps 50

    %%step plan
    plan = ask_llm(goal).split("\\n")

In Python::

    run = nbagent.Run("research-1", max_cost_usd=2.0, max_steps=50)

    @run.step("plan")
    def plan(goal): ...
"""

from __future__ import annotations

from ._cassette import Cassette, cassette_client
from ._client import async_openai_client, default_client, openai_client, simulated_client
from ._effects import effect, once
from ._engine import (
    Run,
    RunStatus,
    StepContext,
    StepTimeout,
    UnsavedValueWarning,
    current_run,
    current_step,
    format_usd,
    idempotency_key,
)
from ._errors import (
    CapExceeded,
    CircuitOpenError,
    CostCapExceeded,
    NbagentError,
    RunStopped,
    StepCapExceeded,
    StepError,
    StepLockedError,
    StoreError,
    StoreFormatError,
    ToolSchemaError,
    UnrestoredValueError,
)
from ._magics import load_ipython_extension, unload_ipython_extension
from ._otel import export_jsonl, export_otel
from ._payments import FakePayments
from ._pricing import PriceBook
from ._retry import retry_policy
from ._script import cell_step
from ._simulator import SimulatedLLM
from ._store import FORMAT_VERSION, Store
from ._tools import tool

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "CapExceeded",
    "Cassette",
    "CircuitOpenError",
    "CostCapExceeded",
    "FakePayments",
    "NbagentError",
    "PriceBook",
    "Run",
    "RunStatus",
    "RunStopped",
    "SimulatedLLM",
    "StepCapExceeded",
    "StepContext",
    "StepError",
    "StepLockedError",
    "StepTimeout",
    "Store",
    "StoreError",
    "StoreFormatError",
    "ToolSchemaError",
    "UnrestoredValueError",
    "UnsavedValueWarning",
    "async_openai_client",
    "cassette_client",
    "cell_step",
    "current_run",
    "current_step",
    "default_client",
    "effect",
    "export_jsonl",
    "export_otel",
    "format_usd",
    "idempotency_key",
    "load_ipython_extension",
    "once",
    "retry_policy",
    "openai_client",
    "simulated_client",
    "tool",
    "unload_ipython_extension",
]
