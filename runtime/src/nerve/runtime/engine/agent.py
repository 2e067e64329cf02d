"""Declaring a durable agent: an async function with a trigger, a key and a `step` object.

```python
@durable_agent(
    "payment_recovery",
    trigger=Trigger(Kind.EVENTS, "payment_failed"),
    key=lambda event: event.data["order"],
    waits_on=(Kind.EVENTS,),
)
async def payment_recovery(event: Envelope, step: Step) -> None:
    await step.run("offer", offer_alternative, undo=withdraw_offer)
    paid = await step.wait_for_event("paid", "payment_succeeded", match=same_order, timeout=3600)
    ...
```

One run per (agent, trigger event): the run id derives from both, so the same event twice starts one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.backoff import Backoff
from nerve.runtime.engine.errors import AgentDeclarationError
from nerve.runtime.engine.limits import NO_LIMITS, Limits
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.subjects import Kind, is_token, subject_root

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nerve.runtime.engine.step import Step
    from nerve.runtime.envelope.model import Envelope

    AgentFunction = Callable[[Envelope, Step], Awaitable[Any]]
    FailureHandler = Callable[[Envelope, "RunFailure"], Awaitable[None]]

#: Kinds a trigger or a wait may read: what devices and services publish, and results of commands.
READABLE_KINDS: Final = frozenset({Kind.TELEMETRY, Kind.EVENTS, Kind.RESULTS})


@dataclass(frozen=True, slots=True)
class Trigger:
    """Messages of `kind` named `name` (`*`: any) from `source` (a device or service, `*`: any).

    `where`, if given, is a predicate on the decoded envelope: only messages it accepts start a run.
    """

    kind: Kind
    name: str = "*"
    source: str = "*"
    where: Callable[[Envelope], bool] | None = None

    def __post_init__(self) -> None:
        """Check the kind and the tokens (raises `AgentDeclarationError`)."""
        if self.kind not in READABLE_KINDS:
            raise AgentDeclarationError(f"a trigger reads telemetry, events or results, not {self.kind}")
        for what, value in (("name", self.name), ("source", self.source)):
            if value != "*" and not is_token(value):
                raise AgentDeclarationError(f"trigger {what} {value!r}: use '*' or 1-64 of A-Z a-z 0-9 _ -")

    def subject(self, prefix: str) -> str:
        """The NATS subject filter."""
        return f"{subject_root(prefix)}.{self.source}.{self.kind.value}.{self.name}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a step is tried (`attempts` in all) and how long to wait between tries (jittered)."""

    attempts: int = 3
    initial_s: float = 0.1
    maximum_s: float = 10.0

    def __post_init__(self) -> None:
        """Check the numbers (raises `AgentDeclarationError`)."""
        if self.attempts < 1 or self.initial_s < 0 or self.maximum_s < self.initial_s:
            raise AgentDeclarationError(
                f"retry policy {self}: attempts must be at least 1 and 0 <= initial_s <= maximum_s"
            )

    def backoff(self) -> Backoff:
        """A fresh backoff for one step's tries."""
        return Backoff(initial=self.initial_s, maximum=self.maximum_s)


NO_RETRY: Final = RetryPolicy(attempts=1)


@dataclass(frozen=True, slots=True)
class RunFailure:
    """What a failure handler is told: which run, why it failed, and whether it was cancelled."""

    run_id: str
    key: str
    error: str
    cancelled: bool
    compensated: bool


@dataclass(frozen=True, slots=True)
class DurableAgent:
    """An agent the engine runs: see `durable_agent`."""

    name: str
    fn: AgentFunction
    trigger: Trigger
    key: Callable[[Envelope], str]
    waits_on: tuple[Kind, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_failure: FailureHandler | None = None
    limits: Limits = NO_LIMITS

    def __post_init__(self) -> None:
        """Check the name and the kinds waited on (raises `AgentDeclarationError`)."""
        if not is_token(self.name):
            raise AgentDeclarationError(f"agent name {self.name!r}: use 1-64 of A-Z a-z 0-9 _ -")
        for kind in self.waits_on:
            if kind not in READABLE_KINDS:
                raise AgentDeclarationError(f"agent {self.name}: cannot wait on {kind}")

    def run_id(self, trigger_id: str) -> str:
        """The id of the run that trigger event `trigger_id` starts (the same event: the same run)."""
        return derived_id(self.name, "run", trigger_id)


def durable_agent(
    name: str,
    *,
    trigger: Trigger,
    key: Callable[[Envelope], str],
    waits_on: tuple[Kind, ...] = (),
    retry: RetryPolicy | None = None,
    on_failure: FailureHandler | None = None,
    limits: Limits = NO_LIMITS,
) -> Callable[[AgentFunction], DurableAgent]:
    """Declare `fn(event, step)` as durable agent `name`, started by `trigger`, scoped by `key(event)`.

    `waits_on` names the kinds of stream `step.wait_for_event` reads (their positions are journalled at
    each step); `retry` is the default retry policy of its steps; `on_failure` is called once when a run
    fails for good, after its undos ran; `limits` is its flow control (docs/engine.md). Raises
    `AgentDeclarationError` for a wrong declaration.
    """

    def declare(fn: AgentFunction) -> DurableAgent:
        return DurableAgent(
            name=name,
            fn=fn,
            trigger=trigger,
            key=key,
            waits_on=waits_on,
            retry=retry or RetryPolicy(),
            on_failure=on_failure,
            limits=limits,
        )

    return declare
