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

A command step names its fallbacks the same way (`step.command(..., fallbacks=[...])`): each a
`CommandFallback` (another action, device or arguments: another gateway) or a `Person`. A way fails
when no verified result came in time (after its attempts) or when its device answered anything but
`ok`; that answer stays journalled as the step's result, so a resumed run takes the same turn.

```python
result = await step.command(
    "clear",
    device=step.key,
    action="clear_temp",
    args={},
    ttl=30,
    fallbacks=[
        CommandFallback("rotate", device=step.key, action="rotate_logs"),
        Person("clear_by_hand", route="ops", expires=3600),
    ],
)  # the device's `ok` result of the way that worked, or the person's `Decision`
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from nerve.runtime.engine.errors import AgentDeclarationError, StepFailed
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from nerve.runtime.engine.agent import RetryPolicy
    from nerve.runtime.engine.approval import Decision
    from nerve.runtime.engine.step import Step
    from nerve.runtime.envelope.model import CommandResult

    StepFunction = Callable[[], Awaitable[Any]]

#: The kind of the fact kept when a fallback is taken.
FALLBACK_TAKEN: Final = "fallback_taken"
#: A fallback's "taken" fact is the step `<fallback name><TAKEN_SUFFIX>`.
TAKEN_SUFFIX: Final = ":taken"
PAIR: Final = 2
R = TypeVar("R")


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


@dataclass(frozen=True, slots=True)
class CommandFallback:
    """Another way of a command step: `action` with `args` to `device`, sent as command step `name`.

    `ttl` and `attempts` (None: the primary command's) as `step.command` takes them.
    """

    name: str
    device: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)
    ttl: float | None = None
    attempts: int | None = None


#: What `step.run(fallbacks=...)` takes: a `Fallback`, a `Person`, or `(name, fn)` for a bare `Fallback`.
FallbackSpec = Fallback | Person | tuple[str, "StepFunction"]


def declared(name: str, fallbacks: Sequence[FallbackSpec]) -> tuple[Fallback | Person, ...]:
    """`fallbacks` (of `step.run`) as `Fallback`/`Person`.

    Raises `AgentDeclarationError` for a malformed fallback, a name used twice, or a route that is no token.
    """
    ways: list[Fallback | Person] = []
    for spec in fallbacks:
        given: object = spec  # as declared at run time, whatever the annotations say
        if isinstance(given, Fallback | Person):
            ways.append(given)
        elif (
            isinstance(given, tuple)
            and len(given) == PAIR
            and isinstance(given[0], str)
            and callable(given[1])
        ):
            ways.append(Fallback(given[0], given[1]))
        else:
            msg = f"step {name!r}: fallback {spec!r} is not a Fallback, a Person or a (name, function) pair"
            raise AgentDeclarationError(msg)
    _check_ways(name, ways)
    return tuple(ways)


def declared_commands(
    name: str, fallbacks: Sequence[CommandFallback | Person]
) -> tuple[CommandFallback | Person, ...]:
    """`fallbacks` of command step `name`, checked as `declared` checks those of `step.run`.

    Each command's device and action must be tokens, its attempts at least 1, its ttl above 0.
    """
    ways: list[CommandFallback | Person] = []
    for spec in fallbacks:
        given: object = spec
        if not isinstance(given, CommandFallback | Person):
            msg = f"step {name!r}: fallback {spec!r} of a command is not a CommandFallback or a Person"
            raise AgentDeclarationError(msg)
        if isinstance(given, CommandFallback):
            for what, value in (("device", given.device), ("action", given.action)):
                if not is_token(value):
                    msg = f"step {name!r}: fallback {given.name!r}: {what} {value!r} is not a token"
                    raise AgentDeclarationError(msg)
            if given.attempts is not None and given.attempts < 1:
                msg = f"step {name!r}: fallback {given.name!r}: attempts must be at least 1"
                raise AgentDeclarationError(msg)
            if given.ttl is not None and not given.ttl > 0:
                msg = f"step {name!r}: fallback {given.name!r}: ttl {given.ttl!r} must be above 0 seconds"
                raise AgentDeclarationError(msg)
        ways.append(given)
    _check_ways(name, ways)
    return tuple(ways)


def _check_ways(name: str, ways: Sequence[Fallback | CommandFallback | Person]) -> None:
    names = {name}
    for way in ways:
        if isinstance(way, Person) and not is_token(way.route):
            msg = (
                f"step {name!r}: fallback {way.name!r}: route {way.route!r} is not a token (A-Z a-z 0-9 _ -)"
            )
            raise AgentDeclarationError(msg)
        if way.name in names or way.name.endswith(TAKEN_SUFFIX):
            msg = f"step {name!r}: fallback name {way.name!r} is used twice (or ends in {TAKEN_SUFFIX!r})"
            raise AgentDeclarationError(msg)
        names.add(way.name)


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

    async def first() -> Any:  # noqa: ANN401 - as `step.run`
        return await step.run(name, fn, undo=undo, retry=retry, action=action)

    async def take(way: Fallback | Person, *, last: bool) -> Any:  # noqa: ANN401 - as `step.run`
        if isinstance(way, Fallback):
            return await step.run(way.name, way.fn, undo=way.undo, retry=way.retry, action=way.action)
        return msgspec.to_builtins(await _ask(step, way, last=last))

    return await _in_turn(step, name, first, ways, take)


async def command_with_fallbacks(
    step: Step,
    name: str,
    *,
    device: str,
    action: str,
    args: dict[str, Any],
    ttl: float,
    attempts: int,
    fallbacks: Sequence[CommandFallback | Person],
) -> CommandResult | Decision:
    """`step.command(name, ...)`, then each fallback in turn while the previous way failed.

    A command way failed when `step.command` raised its `StepFailed` (no verified result in time) or the
    device answered anything but `ok`. Returns the `ok` result, or an approving person's `Decision`;
    raises `StepFailed` (named after the primary) when every way failed.
    """
    ways = declared_commands(name, fallbacks)

    primary = CommandFallback(name, device=device, action=action, args=args, ttl=ttl, attempts=attempts)

    async def send(way: CommandFallback) -> CommandResult:
        result = await step.command(
            way.name,
            device=way.device,
            action=way.action,
            args=way.args,
            ttl=ttl if way.ttl is None else way.ttl,
            attempts=attempts if way.attempts is None else way.attempts,
        )
        if result.status != "ok":
            because = f": {result.reason}" if result.reason else ""
            raise StepFailed(step.run_id, way.name, f"{way.device} answered {result.status}{because}")
        return result

    async def first() -> CommandResult | Decision:
        return await send(primary)

    async def take(way: CommandFallback | Person, *, last: bool) -> CommandResult | Decision:
        return await (_ask(step, way, last=last) if isinstance(way, Person) else send(way))

    return await _in_turn(step, name, first, ways, take)


async def _in_turn(
    step: Step,
    name: str,
    first: Callable[[], Awaitable[R]],
    ways: Sequence[Fallback | CommandFallback | Person],
    take: Callable[..., Awaitable[R]],
) -> R:
    """`first()`, then `take(way, last=...)` for each way in turn while the one before failed for good.

    Before each way, a `fallback_taken` fact (step `<way>:taken`). Only a `StepFailed` of the way itself
    moves on; anything else goes through.
    """
    try:
        return await first()
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
            + _what(way),
            data={"step": name, "failed": failed.step, "reason": failed.reason, "fallback": way.name},
            subject=None,
        )
        try:
            return await take(way, last=index == len(ways) - 1)
        except StepFailed as exc:
            if exc.step != way.name:
                raise
            failed = exc
        reasons.append(f"{way.name}: {failed.reason}")
    raise StepFailed(step.run_id, name, "every way failed: " + "; ".join(reasons))


def _what(way: Fallback | CommandFallback | Person) -> str:
    if isinstance(way, Person):
        return f" (a person: {way.route})"
    if isinstance(way, CommandFallback):
        return f" ({way.action} to {way.device})"
    return ""


async def _ask(step: Step, way: Person, *, last: bool) -> Decision:
    """A person's way: approved is done; rejected or expired fails it (`StepFailed` of `way.name`)."""
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
    return decision
