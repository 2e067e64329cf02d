"""Declared fallbacks of a step: when it fails for good, the next way of doing it, then a person.

```python
charged = await step.run(
    "charge",
    charge_primary,
    undo=refund_primary,
    fallbacks=[
        Fallback("charge_backup", charge_backup, undo=refund_backup),  # another gateway
        Person("charge_by_hand", route="payments", expires=4 * 3600),  # then a person
    ],
)
```

The primary runs as any `step.run` (retries included). Only when it failed for good does the first
fallback run, as a step of its own (its own name, so its own id and journal record, its own undo and
retry policy); when that fails too, the next. Before each fallback runs, a `fallback_taken` fact is kept
(a journalled step named `<fallback>:taken`). A `Person` is an approval (`step.approve`): approved means
the person did it (the step returns the decision); rejected or expired means it failed too. When every
way failed, `StepFailed` names the primary and each fallback's reason.

Exactly-once like any step, since each way is a journalled step: a resumed run finds the primary (and
every fallback before the one that was running) journalled as failed and goes straight to where it was;
the primary never runs again once it failed. The order is fixed by the declaration, so a replay reaches
the same steps in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from nerve.runtime.engine.errors import AgentDeclarationError, StepFailed
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from nerve.runtime.engine.agent import RetryPolicy
    from nerve.runtime.engine.step import Step

    StepFunction = Callable[[], Awaitable[Any]]

#: The kind of the fact kept when a fallback is taken.
FALLBACK_TAKEN: Final = "fallback_taken"
#: A fallback's "taken" fact is the step `<fallback name><TAKEN_SUFFIX>`.
TAKEN_SUFFIX: Final = ":taken"
PAIR: Final = 2


@dataclass(frozen=True, slots=True)
class Fallback:
    """Another way of doing a step: `fn` run as step `name`, with its own `undo`, `retry` and `action`."""

    name: str
    fn: StepFunction
    undo: StepFunction | None = None
    retry: RetryPolicy | None = None
    action: str | None = None


@dataclass(frozen=True, slots=True)
class Person:
    """The last resort: a person (`route`, a token naming who) does it, within `expires` seconds.

    Run as `step.approve(name, route=, expires=, summary=)`: approved means done (the step returns the
    decision as JSON); rejected, or nobody deciding in time, means this way failed too: the next way is
    taken, and after the last one the step fails (the run compensates, unless the agent catches it).
    """

    name: str
    route: str
    expires: float
    summary: str = ""


#: What `step.run(fallbacks=...)` takes: a `Fallback`, a `Person`, or `(name, fn)` for a bare `Fallback`.
FallbackSpec = Fallback | Person | tuple[str, "StepFunction"]


def declared(name: str, fallbacks: Sequence[FallbackSpec]) -> tuple[Fallback | Person, ...]:
    """`fallbacks` as `Fallback`/`Person`.

    Raises `AgentDeclarationError` for a malformed fallback, a name used twice, or a route that is no token.
    """
    ways: list[Fallback | Person] = []
    names = {name}
    for spec in fallbacks:
        way: Fallback | Person
        given: object = spec  # as declared at run time, whatever the annotations say
        if isinstance(given, Fallback | Person):
            way = given
        elif (
            isinstance(given, tuple)
            and len(given) == PAIR
            and isinstance(given[0], str)
            and callable(given[1])
        ):
            way = Fallback(given[0], given[1])
        else:
            msg = f"step {name!r}: fallback {spec!r} is not a Fallback, a Person or a (name, function) pair"
            raise AgentDeclarationError(msg)
        if isinstance(way, Person) and not is_token(way.route):
            msg = (
                f"step {name!r}: fallback {way.name!r}: route {way.route!r} is not a token (A-Z a-z 0-9 _ -)"
            )
            raise AgentDeclarationError(msg)
        if way.name in names or way.name.endswith(TAKEN_SUFFIX):
            msg = f"step {name!r}: fallback name {way.name!r} is used twice (or ends in {TAKEN_SUFFIX!r})"
            raise AgentDeclarationError(msg)
        names.add(way.name)
        ways.append(way)
    return tuple(ways)


async def run_with_fallbacks(
    step: Step,
    name: str,
    fn: StepFunction,
    *,
    undo: StepFunction | None,
    retry: RetryPolicy | None,
    action: str | None,
    fallbacks: Sequence[FallbackSpec],
) -> Any:  # noqa: ANN401 - what the way that succeeded returned, as JSON
    """`step.run(name, fn, ...)`, then each fallback in turn while the previous one failed for good.

    Raises `StepFailed` (named after the primary) when every way failed; anything else a step raises
    (a cancel, a lost lease, a replay during compensation) goes through untouched.
    """
    ways = declared(name, fallbacks)
    try:
        return await step.run(name, fn, undo=undo, retry=retry, action=action)
    except StepFailed as exc:
        if exc.step != name:  # not this step's own failure (the run is compensating, a limit)
            raise
        failed = exc
    reasons = [f"{name}: {failed.reason}"]
    for index, way in enumerate(ways):
        await step.fact(
            f"{way.name}{TAKEN_SUFFIX}",
            kind=FALLBACK_TAKEN,
            summary=f"step {failed.step!r} failed ({failed.reason}); taking fallback {way.name!r}"
            + (f" (a person: {way.route})" if isinstance(way, Person) else ""),
            data={"step": name, "failed": failed.step, "reason": failed.reason, "fallback": way.name},
            subject=None,
        )
        try:
            return await _take(step, way, last=index == len(ways) - 1)
        except StepFailed as exc:
            if exc.step != way.name:
                raise
            failed = exc
        reasons.append(f"{way.name}: {failed.reason}")
    raise StepFailed(step.run_id, name, "every way failed: " + "; ".join(reasons))


async def _take(step: Step, way: Fallback | Person, *, last: bool) -> Any:  # noqa: ANN401 - as `run_with_fallbacks`
    if isinstance(way, Fallback):
        return await step.run(way.name, way.fn, undo=way.undo, retry=way.retry, action=way.action)
    # Its expiry fails the step: only after the last way does that fail the run (if the agent lets the
    # `StepFailed` out); before it, the next way is taken, and the person's facts say so.
    decision = await step.approve(
        way.name,
        route=way.route,
        expires=way.expires,
        on_expiry="compensate" if last else "fallback",
        summary=way.summary,
    )
    if not decision.approved:
        by = f" by {decision.by}" if decision.by else ""
        comment = f": {decision.comment}" if decision.comment else ""
        raise StepFailed(step.run_id, way.name, f"{decision.outcome}{by}{comment}")
    return msgspec.to_builtins(decision)
