"""What the engine and the steps of an agent raise.

```
NerveError
└── EngineError
    ├── StepError              raised by a step's function: how the engine treats the failure
    │   ├── Retryable          try the step again (after a backoff), up to its retry policy
    │   └── Terminal           do not try again: the run fails and compensates
    ├── StepFailed             a step failed for good (raised out of `step.run` to the agent)
    ├── RunCancelled           the run was cancelled (raised out of the next step to the agent)
    ├── LeaseLost              another process claimed the run: this one stops at once
    └── AgentDeclarationError  an agent or a step is declared wrong (a name used twice, …)
```

Any other exception from a step's function is treated as `Retryable`.
"""

from __future__ import annotations

from nerve.runtime.errors import NerveError


class EngineError(NerveError):
    """Root of the engine's errors."""


class StepError(EngineError):
    """Raised by a step's function to say how its failure is to be treated."""


class Retryable(StepError):
    """The step may succeed if tried again (a timeout, a busy service)."""


class Terminal(StepError):
    """The step will not succeed however often it is tried: the run fails and its undos run."""


class StepFailed(EngineError):
    """Step `step` of run `run_id` failed for good; `reason` says why (its last error)."""

    def __init__(self, run_id: str, step: str, reason: str) -> None:
        self.run_id = run_id
        self.step = step
        self.reason = reason
        super().__init__(f"run {run_id}: step {step!r} failed: {reason}")


class RunCancelled(EngineError):
    """Run `run_id` was cancelled: its registered undos run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} was cancelled")


class LeaseLost(EngineError):
    """Another process claimed run `run_id` (this one was too slow to renew): this one stops."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id}: lease lost to another process; stopping here")


class AgentDeclarationError(EngineError):
    """An agent or one of its steps is declared wrong; the message says what and where."""
