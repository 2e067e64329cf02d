"""Flow control an agent declares (`durable_agent(..., limits=Limits(...))`), and its arithmetic.

```python
@durable_agent(
    "disk_runbook",
    trigger=Trigger(Kind.TELEMETRY, "disk"),
    key=lambda reading: reading.subject,
    limits=Limits(
        concurrency=1,  # one run per device at a time; the others wait, in order
        rate=Window(10, 60.0),  # at most 10 runs per device a minute; more are dropped
        debounce_s=5.0,  # start 5 s after the last reading of a burst, with that reading
        blast=BlastRadius(percent=10.0),  # at most 10 % of the fleet under remediation at once
        breakers={"clear_temp": Breaker(failures=5, within_s=60.0, cooloff_s=300.0)},
    ),
)
```

This module holds the declarations and the pure arithmetic (sliding windows, breaker states); the engine's
use of them, with their state in the KV bucket `nerve_limits`, is `nerve.runtime.engine.flow`. What each
limit does and what is kept as a fact: docs/engine.md, "Flow control".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from nerve.runtime.engine.errors import AgentDeclarationError
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The most starts a window counts (its state keeps one time per start: a bounded KV value).
MAX_WINDOW_COUNT: Final = 1000
#: The most runs that may wait for a slot (concurrency, blast radius) or be delayed (throttle) per key.
MAX_QUEUED: Final = 1000
#: Hops a trigger may be deep by default (the same default as central's loop guard).
DEFAULT_MAX_HOPS: Final = 8

OnBusy = Literal["drop", "merge"]
OnFull = Literal["wait", "drop"]
OnOpen = Literal["retry", "terminal"]


@dataclass(frozen=True, slots=True)
class Window:
    """At most `count` starts in any `period_s` seconds (a sliding window: exact, not on average)."""

    count: int
    period_s: float

    def __post_init__(self) -> None:
        """Check the numbers (raises `AgentDeclarationError`)."""
        if not 1 <= self.count <= MAX_WINDOW_COUNT or not self.period_s > 0:
            raise AgentDeclarationError(
                f"window {self.count}/{self.period_s}s: count must be 1-{MAX_WINDOW_COUNT}, period_s > 0"
            )


@dataclass(frozen=True, slots=True)
class BlastRadius:
    """At most `max_keys` keys, or `percent` % of the fleet, under remediation (open runs) at once.

    Agents that name the same `group` share the cap. Both given: the smaller. `on_full="wait"` parks a
    run until a key leaves (in order); `"drop"` drops its trigger. Each is a fact.
    """

    max_keys: int | None = None
    percent: float | None = None
    group: str = "remediation"
    on_full: OnFull = "wait"

    def __post_init__(self) -> None:
        """Check the numbers and the group (raises `AgentDeclarationError`)."""
        if self.max_keys is None and self.percent is None:
            raise AgentDeclarationError("blast radius: give max_keys, percent, or both")
        if self.max_keys is not None and self.max_keys < 1:
            raise AgentDeclarationError(f"blast radius: max_keys {self.max_keys} must be at least 1")
        if self.percent is not None and not 0 < self.percent <= 100:  # noqa: PLR2004 - a percentage
            raise AgentDeclarationError(f"blast radius: percent {self.percent} must be in (0, 100]")
        if not is_token(self.group):
            raise AgentDeclarationError(f"blast radius group {self.group!r}: use 1-64 of A-Z a-z 0-9 _ -")

    def cap(self, fleet: int) -> int:
        """How many keys may be under remediation at once in a fleet of `fleet` devices (at least 1)."""
        caps = []
        if self.max_keys is not None:
            caps.append(self.max_keys)
        if self.percent is not None:
            caps.append(int(fleet * self.percent / 100))
        return max(1, min(caps))


@dataclass(frozen=True, slots=True)
class Breaker:
    """A circuit breaker on an action: `failures` failures within `within_s` open it.

    While open, a step of the action fails at once (`on_open`: `"retry"` counts as a failed try, so the
    step's retry policy applies; `"terminal"` fails the step). After `cooloff_s` one step is let through
    (half-open): its success closes the breaker, its failure opens it again.
    """

    failures: int = 5
    within_s: float = 60.0
    cooloff_s: float = 30.0
    on_open: OnOpen = "retry"

    def __post_init__(self) -> None:
        """Check the numbers (raises `AgentDeclarationError`)."""
        if not 1 <= self.failures <= MAX_WINDOW_COUNT or self.within_s <= 0 or self.cooloff_s <= 0:
            raise AgentDeclarationError(
                f"breaker {self}: failures must be 1-{MAX_WINDOW_COUNT}, within_s and cooloff_s > 0"
            )


@dataclass(frozen=True, slots=True)
class Limits:
    """What an agent declares to bound its runs, per key unless said otherwise (docs/engine.md).

    - `concurrency`: at most this many open runs per key; the others wait in order (at most
      `max_queued`; beyond, dropped).
    - `throttle`: at most `count` starts per `period_s` per key; the others start later, in order (at most
      `max_queued` delayed; beyond, dropped).
    - `rate`: at most `count` runs per `period_s` per key; the others are dropped.
    - `debounce_s`: a run starts once its key has been quiet that long, with the last trigger; the
      triggers before it are merged into it.
    - `singleton`: at most one open run per key; a trigger while one is open is dropped or merged into it.
    - `blast`: a cap across keys (see `BlastRadius`).
    - `breakers`: a circuit breaker per action (see `Breaker`), for the steps that name the action.
    - `max_hops`: a trigger deeper than this is refused; `loop_guard`: a trigger caused by a run of the
      same agent and key is refused.
    """

    concurrency: int | None = None
    throttle: Window | None = None
    rate: Window | None = None
    debounce_s: float | None = None
    singleton: OnBusy | None = None
    blast: BlastRadius | None = None
    breakers: Mapping[str, Breaker] = field(default_factory=dict)
    max_queued: int = 100
    max_hops: int = DEFAULT_MAX_HOPS
    loop_guard: bool = True

    def __post_init__(self) -> None:
        """Check the numbers and the action names (raises `AgentDeclarationError`)."""
        if self.concurrency is not None and self.concurrency < 1:
            raise AgentDeclarationError(f"limits: concurrency {self.concurrency} must be at least 1")
        if self.debounce_s is not None and not self.debounce_s > 0:
            raise AgentDeclarationError(f"limits: debounce_s {self.debounce_s} must be above 0")
        if not 1 <= self.max_queued <= MAX_QUEUED:
            raise AgentDeclarationError(f"limits: max_queued {self.max_queued} must be 1-{MAX_QUEUED}")
        if self.max_hops < 0:
            raise AgentDeclarationError(f"limits: max_hops {self.max_hops} must be at least 0")
        if self.singleton not in {None, "drop", "merge"}:
            raise AgentDeclarationError(f"limits: singleton {self.singleton!r}: 'drop' or 'merge'")
        for action in self.breakers:
            if not is_token(action):
                raise AgentDeclarationError(f"limits: breaker action {action!r} is not a token")

    @property
    def gated(self) -> bool:
        """Whether a run may have to wait before its first step (debounce, throttle, concurrency, blast)."""
        return any(
            limit is not None for limit in (self.debounce_s, self.throttle, self.concurrency, self.blast)
        )


NO_LIMITS: Final = Limits()


# --- sliding windows -----------------------------------------------------------------------------------


def next_start(starts: list[float], now: float, window: Window) -> float:
    """When the next run may start, given the (sorted) starts counted so far: never before `now`.

    At most `window.count` starts fall in any `period_s`: the next comes a period after the `count`-th
    last one. Starts are kept in order: never before the last one.
    """
    earliest = now
    if len(starts) >= window.count:
        earliest = max(earliest, starts[-window.count] + window.period_s)
    if starts:
        earliest = max(earliest, starts[-1])
    return earliest


def counted(starts: list[float], at: float, window: Window, now: float) -> list[float]:
    """`starts` with `at` added, keeping what `next_start` needs (the last `count`) and starts to come."""
    added = [*starts, at]
    return added[-max(window.count, pending(added, now)) :]


def pending(starts: list[float], now: float) -> int:
    """How many of `starts` are still to come (delayed runs, for the throttle's queue bound)."""
    return sum(1 for start in starts if start > now)


# --- circuit breakers ----------------------------------------------------------------------------------

BreakerState = Literal["closed", "open", "half_open"]


class BreakerRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A breaker's state (one KV value per action): recent failures, and since when it is open."""

    failures: list[float] = msgspec.field(default_factory=list)
    opened: float = 0.0
    #: When the half-open probe was let through (another probe only a cool-off later, if it vanished).
    probing: float = 0.0


def breaker_state(record: BreakerRecord, now: float, breaker: Breaker) -> BreakerState:
    """Closed, open (failing fast), or half-open (one probe may go) at `now`."""
    if not record.opened:
        return "closed"
    if now - record.opened < breaker.cooloff_s:
        return "open"
    if record.probing and now - record.probing < breaker.cooloff_s:
        return "open"  # a probe is out: the others wait for its outcome
    return "half_open"


def breaker_failed(record: BreakerRecord, now: float, breaker: Breaker) -> BreakerRecord:
    """The state after a failure at `now`: open once `failures` fell within `within_s`, or a probe failed."""
    recent = [*(at for at in record.failures if now - at < breaker.within_s), now][-breaker.failures :]
    if record.opened or len(recent) >= breaker.failures:
        return BreakerRecord(failures=[], opened=now)
    return BreakerRecord(failures=recent)


def breaker_succeeded() -> BreakerRecord:
    """The state after a success: closed, failures forgotten."""
    return BreakerRecord()


__all__ = [
    "MAX_QUEUED",
    "MAX_WINDOW_COUNT",
    "NO_LIMITS",
    "BlastRadius",
    "Breaker",
    "BreakerRecord",
    "Limits",
    "Window",
    "breaker_failed",
    "breaker_state",
    "breaker_succeeded",
    "counted",
    "next_start",
    "pending",
]
