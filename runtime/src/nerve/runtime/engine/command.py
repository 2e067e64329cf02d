"""`step.command`: a command signed by central, sent once, and a durable wait for the device's result.

1. The step journals what it awaits (the NERVE_RESULTS position before the send, the due time, the timer)
   and schedules its timer: ttl plus `CLOCK_SKEW_S`, a nats-server message schedule like a sleep's.
2. It signs and publishes the command; the command id is the step id (the n-th attempt's derives from it),
   so a resumed run publishes the same id again and JetStream keeps it once (the edge runs an id once).
3. It reads NERVE_RESULTS from the journalled position for a result whose `causationid` is the command id:
   a result stored between the send and the wait, or while no engine ran, is found. Only a result that
   verifies against the device registry (`DeviceKeys`) is acted on, or the bridge's unsigned `expired`
   for the command this process sent, stored once that command's `expires` passed
   (`nerve.runtime.trust.expiry`); any other is refused (a sampled `result_refused` fact, through
   `ResultRefusals`: central's own) and the wait goes on.
4. When the timer fires first, the command is sent again under a new id if `attempts` are left (a
   retryable timeout), else the step fails (`StepFailed`: terminal, the run compensates unless the agent
   catches it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
from nats.errors import Error as NatsError

from nerve.runtime.engine.errors import AgentDeclarationError, StepFailed
from nerve.runtime.engine.journal import StepRecord
from nerve.runtime.engine.step import mark_retrieved
from nerve.runtime.engine.timers import forget, has_fired
from nerve.runtime.envelope.codec import decode, to_json
from nerve.runtime.envelope.model import Command, CommandResult, derived_id
from nerve.runtime.jetstream.client import last_sequence, publish_envelope
from nerve.runtime.jetstream.streams import STREAM_OF_KIND
from nerve.runtime.subjects import Address, Kind, is_token
from nerve.runtime.trust.expiry import expired_claim_refusal

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from nerve.runtime.engine.step import Step
    from nerve.runtime.envelope.model import Envelope

log = logging.getLogger(__name__)

#: Added to a command's ttl before its step times out: the device's clock, and the trip back.
CLOCK_SKEW_S: Final = 5.0
RESULTS_STREAM: Final = STREAM_OF_KIND[Kind.RESULTS]


class ResultRefusals(Protocol):
    """Whose results to believe, and what to do with the others (central's runner is one)."""

    async def refuse_result(self, result: CommandResult) -> bool:
        """True if `result` does not verify against its device's registered key (then it is counted)."""
        ...


def _ids(step: Step, name: str, attempt: int) -> tuple[str, str]:
    """The command id and the timer id of attempt `attempt` (1: the step id itself)."""
    if attempt <= 1:
        return step.id(name), derived_id(step.run_id, "timer", name)
    command_id = derived_id(step.id(name), "attempt", str(attempt))
    return command_id, derived_id(command_id, "timer")


@dataclass
class Sent:
    """A command step sent (`Step.send`), or found done or failed in the journal: what `wait_for` needs."""

    name: str
    device: str
    action: str
    args: dict[str, Any]
    ttl: float
    attempts: int
    #: The attempt under way (None: the journal says how the step ended).
    journalled: StepRecord | None = None
    #: How it ended, from the journal: its result, or why it failed.
    result: CommandResult | None = None
    error: str = ""
    #: The command this process last published for the step (None: none since it resumed): the one an
    #: unsigned `expired` result may answer (`nerve.runtime.trust.expiry`).
    command: Command | None = None


async def send_command(
    step: Step,
    name: str,
    *,
    device: str,
    action: str,
    args: dict[str, Any],
    ttl: float,
    attempts: int,
) -> Sent:
    """What `Step.send` does (see the module docstring): journal and send, or find the step's end."""
    sent = Sent(name=name, device=device, action=action, args=args, ttl=ttl, attempts=attempts)
    journalled = step._enter(name)  # noqa: SLF001 - a step of Step's, kept in a module of its own
    if journalled is not None and journalled.status == "done":
        sent.result = decode(str(journalled.result["result"]).encode(), CommandResult)
        return sent
    if journalled is not None and journalled.status == "failed":
        sent.error = journalled.error or "failed"
        return sent
    _check(step, name, device, action, attempts, ttl)
    sent.journalled = await _attempt(step, sent, journalled)
    return sent


async def wait_for(step: Step, sent: Sent) -> CommandResult:
    """What `Step.result` does: the device's verified result, sending again while `attempts` last."""
    if sent.result is not None:
        return sent.result
    journalled = sent.journalled
    if journalled is None:
        raise StepFailed(step.run_id, sent.name, sent.error)
    ctx = step._ctx  # noqa: SLF001
    while True:
        command_id, _timer = _ids(step, sent.name, journalled.attempts)
        found = await _await_result(step, journalled, command_id, sent)
        if found is not None:
            result, seq = found
            done = msgspec.structs.replace(
                journalled,
                status="done",
                result={"result": to_json(result).decode(), "seq": seq},
                finished=step.now(),
            )
            # Carried by the run's next write: a crash before it reads the same result again, from there.
            step._record_later(sent.name, done, forget_timer=journalled.timer)  # noqa: SLF001
            return result
        await forget(ctx.js, prefix=ctx.prefix, timer_id=journalled.timer)
        error = f"no result from {sent.device} to {sent.action} within {sent.ttl + CLOCK_SKEW_S:g}s"
        if journalled.attempts >= sent.attempts:
            failed = msgspec.structs.replace(journalled, status="failed", error=error, finished=step.now())
            await step._record(sent.name, failed)  # noqa: SLF001
            raise StepFailed(step.run_id, sent.name, error)
        log.info("engine: run %s step %r: %s (try %d)", step.run_id, sent.name, error, journalled.attempts)
        journalled = await _attempt(
            step, sent, msgspec.structs.replace(journalled, status="started", error=error)
        )


async def _attempt(step: Step, sent: Sent, journalled: StepRecord | None) -> StepRecord:
    """Begin an attempt (or resume the one begun) and send its command (again: the same id, kept once)."""
    journalled, journalling = await _begin(step, sent.name, journalled, sent.ttl)
    command_id, _timer = _ids(step, sent.name, journalled.attempts)
    if journalled.due > step.now():
        # The send in this task, its journalling beside it (a loop turn less than gathering both).
        journal = asyncio.ensure_future(journalling)
        journal.add_done_callback(mark_retrieved)
        sent.command = await _publish(step, command_id, sent.device, sent.action, sent.args, sent.ttl)
        await journal
    else:
        await journalling
    return journalled


def _check(step: Step, name: str, device: str, action: str, attempts: int, ttl: float) -> None:  # noqa: PLR0917
    for what, value in (("device", device), ("action", action)):
        if not is_token(value):
            raise AgentDeclarationError(f"step {name!r}: {what} {value!r} is not valid")
    if attempts < 1:
        raise AgentDeclarationError(f"step {name!r}: attempts must be at least 1")
    if not ttl > 0:  # NaN too: a command that expired when it was sent is no command
        raise AgentDeclarationError(f"step {name!r}: ttl {ttl!r} must be above 0 seconds")
    if step._ctx.signer is None:  # noqa: SLF001
        raise AgentDeclarationError(f"step {name!r}: the engine has no signer to sign commands with")
    step._check_duration(name, ttl + CLOCK_SKEW_S)  # noqa: SLF001


async def _begin(
    step: Step, name: str, journalled: StepRecord | None, ttl: float
) -> tuple[StepRecord, Awaitable[None]]:
    """A new attempt (a place in NERVE_RESULTS before its send, its timer), or the one begun before.

    Returns it with what is left to journal and schedule, which goes with the send when the place comes
    from the journal's last entry (`RunRecord.results_from`): stored before the send, so a crash before
    this attempt's own entry is written resends the same id and reads from there again. Without one, the
    stream is asked and the entry is written before the send.
    """
    ctx = step._ctx  # noqa: SLF001
    if journalled is not None and journalled.status == "waiting":
        step._before_new_step(new=False)  # noqa: SLF001
        if not await has_fired(ctx.js, prefix=ctx.prefix, timer_id=journalled.timer):
            await step._schedule(journalled.timer, journalled.due, name)  # noqa: SLF001
        return journalled, _nothing()
    attempt = (journalled.attempts if journalled is not None else 0) + 1
    step._before_new_step(new=journalled is None)  # noqa: SLF001
    reading = step._positions_soon()  # noqa: SLF001
    # Stored before this send whatever happens to it: in the journal's last entry (or now, then the entry
    # goes first).
    from_seq = step.record.results_from
    ahead = from_seq is not None
    if from_seq is None:
        from_seq = await last_sequence(ctx.js, RESULTS_STREAM)
    now = step.now()
    _command_id, timer_id = _ids(step, name, attempt)
    waiting = StepRecord(
        status="waiting",
        attempts=attempt,
        due=now + ttl + CLOCK_SKEW_S,
        timer=timer_id,
        stream=RESULTS_STREAM,
        from_seq=from_seq,
        started=journalled.started if journalled is not None else now,
    )

    async def journal() -> None:
        await step._record(name, waiting, positions=await reading)  # noqa: SLF001

    async def schedule_timer() -> None:
        await step._schedule(timer_id, waiting.due, name)  # noqa: SLF001

    async def both() -> None:
        await asyncio.gather(journal(), schedule_timer())

    if ahead:
        return waiting, both()
    await journal()
    return waiting, schedule_timer()


async def _nothing() -> None:
    return None


async def _publish(  # noqa: PLR0917
    step: Step, command_id: str, device: str, action: str, args: dict[str, Any], ttl: float
) -> Command:
    ctx = step._ctx  # noqa: SLF001
    signer = ctx.signer
    if signer is None:  # checked by the caller
        raise AgentDeclarationError("the engine has no signer")
    trigger: Envelope = step._trigger  # noqa: SLF001
    command = Command.create(
        device=device,
        action=action,
        args=args,
        source=f"nerve://central/{step._agent.name}",  # noqa: SLF001
        ttl=timedelta(seconds=ttl),
        cause=trigger,
        command_id=command_id,
    )
    signed = signer.sign(command)
    subject = Address(device=device, kind=Kind.COMMANDS, name=action).subject(ctx.prefix)
    await publish_envelope(ctx.js, subject, signed, codec=ctx.codec)
    return signed


async def _await_result(
    step: Step, waiting: StepRecord, command_id: str, sent: Sent
) -> tuple[CommandResult, int] | None:
    """The first verified result of `command_id` after `waiting.from_seq`, or None when the timer fired."""
    ctx = step._ctx  # noqa: SLF001
    subject = Address(device=sent.device, kind=Kind.RESULTS, name=sent.action).subject(ctx.prefix)

    def answers(result: Envelope) -> bool:
        return result.causationid == command_id

    while True:
        # Already stored (a device answers fast): no subscription to make.
        found = await step._look(subject, RESULTS_STREAM, CommandResult, answers, waiting.from_seq)  # noqa: SLF001
        if found is None:
            found = await step._watch(waiting, subject, RESULTS_STREAM, CommandResult, answers)  # noqa: SLF001
        if found is None:
            return None
        result, seq = found
        if not isinstance(result, CommandResult):  # cannot happen: decoded as one
            return None
        if await _bridge_expired(step, result, seq, sent.command) or not await _refused(step, result):
            return result, seq
        # Read on after the refused one.
        waiting = msgspec.structs.replace(waiting, from_seq=seq)


async def _bridge_expired(step: Step, result: CommandResult, seq: int, command: Command | None) -> bool:
    """Whether `result` (stored at `seq`) is an unsigned `expired` for `command` to believe.

    The rule is `expired_claim_refusal`'s; the time it is judged by is the time JetStream stored the
    result (asked only for an unsigned `expired`), so a claim stored early is refused even when read late.
    """
    if command is None or result.status != "expired" or result.sig:
        return False
    try:
        stored = (await step._ctx.js.get_msg(RESULTS_STREAM, seq)).time  # noqa: SLF001
    except (NatsError, TimeoutError) as exc:
        log.warning("engine: result %s: cannot read when it was stored (%s): refused", result.id, exc)
        return False
    if stored is None:  # every JetStream message has its time; a server without one is not believed
        return False
    if expired_claim_refusal(result, command, arrived=stored) is not None:
        return False
    log.info("engine: run %s: command %s expired before the bridge sent it", step.run_id, command.id)
    return True


async def _refused(step: Step, result: CommandResult) -> bool:
    ctx = step._ctx  # noqa: SLF001
    if ctx.refusals is not None:
        return await ctx.refusals.refuse_result(result)
    refusal = ctx.device_keys.refusal(result) if ctx.device_keys is not None else None
    if ctx.device_keys is None or refusal is not None:
        reason = refusal.reason if refusal is not None else "the engine has no device registry"
        log.warning("engine: result %s of command %s refused: %s", result.id, result.causationid, reason)
        return True
    return False
