"""The durable agent engine: agents declared with a trigger and a key, steps journalled in JetStream.

`durable_agent` declares an agent, `Step` is what its function does everything through, `Engine` runs
agents (several processes share the work). How to write an agent and what is guaranteed: docs/engine.md.
"""

from nerve.runtime.engine.agent import NO_RETRY, DurableAgent, RetryPolicy, RunFailure, Trigger, durable_agent
from nerve.runtime.engine.approval import Decision
from nerve.runtime.engine.command import CLOCK_SKEW_S, ResultRefusals
from nerve.runtime.engine.engine import Engine, ensure_engine_storage, wait_for_run
from nerve.runtime.engine.errors import (
    AgentDeclarationError,
    EngineError,
    LeaseLost,
    Retryable,
    RunCancelled,
    StepError,
    StepFailed,
    Terminal,
)
from nerve.runtime.engine.fallback import FALLBACK_TAKEN, CommandFallback, Fallback, Person
from nerve.runtime.engine.journal import RunRecord, StepRecord, UndoRecord
from nerve.runtime.engine.limits import BlastRadius, Breaker, Limits, Window
from nerve.runtime.engine.names import ENGINE_NAMES, RUNS_BUCKET, TIMERS_STREAM
from nerve.runtime.engine.settings import EngineSettings
from nerve.runtime.engine.step import Step

__all__ = [
    "CLOCK_SKEW_S",
    "ENGINE_NAMES",
    "FALLBACK_TAKEN",
    "NO_RETRY",
    "RUNS_BUCKET",
    "TIMERS_STREAM",
    "AgentDeclarationError",
    "BlastRadius",
    "Breaker",
    "CommandFallback",
    "Decision",
    "DurableAgent",
    "Engine",
    "EngineError",
    "EngineSettings",
    "Fallback",
    "LeaseLost",
    "Limits",
    "Person",
    "ResultRefusals",
    "RetryPolicy",
    "Retryable",
    "RunCancelled",
    "RunFailure",
    "RunRecord",
    "Step",
    "StepError",
    "StepFailed",
    "StepRecord",
    "Terminal",
    "Trigger",
    "UndoRecord",
    "Window",
    "durable_agent",
    "ensure_engine_storage",
    "wait_for_run",
]
