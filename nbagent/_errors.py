"""The exceptions nbagent raises.

Every message names the thing that went wrong and the fix, so a learner
can act on it without reading nbagent's source.
"""

from __future__ import annotations


class NbagentError(Exception):
    """Base class of every error nbagent raises on purpose."""


class StoreError(NbagentError):
    """The on-disk store cannot be opened, read or written."""


class StoreFormatError(StoreError):
    """The store was written by a newer nbagent (or is not an nbagent store)."""


class StepError(NbagentError):
    """A step was declared or used wrongly (bad name, duplicate, bad option)."""


class UnrestoredValueError(NbagentError, NameError):
    """A variable made by a step could not be saved, so it is gone after a restart."""


class StepLockedError(NbagentError):
    """Another live kernel or process is executing the same step right now."""


class RunStopped(NbagentError):
    """The run was stopped (by the user or after an auth failure); resume it to go on."""


class CapExceeded(NbagentError):
    """A hard ceiling of the run (cost, steps, LLM calls) would be crossed."""


class CostCapExceeded(CapExceeded):
    """The next LLM call could push the run's spend above its cost cap."""


class StepCapExceeded(CapExceeded):
    """The run executed as many steps (or LLM calls) as its cap allows: possible loop."""


class CircuitOpenError(NbagentError):
    """Too many rate-limit errors from one endpoint: calls fail fast for a cool-down."""


class ToolSchemaError(NbagentError):
    """Tool-call arguments from the model do not validate against the tool's schema."""


__all__ = [
    "CapExceeded",
    "CircuitOpenError",
    "CostCapExceeded",
    "NbagentError",
    "RunStopped",
    "StepCapExceeded",
    "StepError",
    "StepLockedError",
    "StoreError",
    "StoreFormatError",
    "ToolSchemaError",
    "UnrestoredValueError",
]
