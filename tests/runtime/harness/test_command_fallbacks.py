"""`step.command(fallbacks=...)` on both bindings: another action or device, then a person.

The devices are the harness's own (`AgentHarness.answer` signs as the device); a `Responder` answers
every command of an action as a test scripts it, once per command id.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest
from tests.runtime.harness.people import OPERATOR, decide

from nerve.runtime.engine import (
    CLOCK_SKEW_S,
    AgentDeclarationError,
    CommandFallback,
    Decision,
    Fallback,
    Person,
    StepFailed,
    Trigger,
    durable_agent,
)
from nerve.runtime.engine.fallback import declared_commands
from nerve.runtime.envelope.model import CommandResult
from nerve.runtime.harness import AgentHarness
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.subjects import Address, Kind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nerve.runtime.engine import Step
    from nerve.runtime.envelope.model import Command, Envelope, ResultStatus

TTL = 2.0


@durable_agent(
    "clearer",
    trigger=Trigger(Kind.EVENTS, "disk_full", source="ops"),
    key=lambda event: str(event.data["device"]),
)
async def clearer(event: Envelope, step: Step) -> str:
    try:
        outcome = await step.command(
            "clear",
            device=step.key,
            action="clear_temp",
            args={"older_than_s": 60},
            ttl=TTL,
            fallbacks=[
                CommandFallback("rotate", device=step.key, action="rotate_logs", args={"keep": 2}),
                CommandFallback("gateway", device="gw1", action="clear_temp", args={"for": step.key}),
                Person("clear_by_hand", route="ops", expires=30, summary=f"clear {step.key} by hand"),
            ],
        )
    except StepFailed as exc:
        return f"failed: {exc.reason}"
    if isinstance(outcome, Decision):
        return f"a person: {outcome.outcome}"
    return f"{outcome.action} by {outcome.subject}"


class Responder:
    """Answers each command of an action, once per command id, with the status scripted for it.

    An action without a status (or `None`) is not answered: its way times out.
    """

    def __init__(self, h: AgentHarness, script: dict[str, ResultStatus | None]) -> None:
        self.h = h
        self.script = script
        self.answered: list[Command] = []
        self.seen: set[str] = set()

    async def answer_pending(self) -> None:
        """Answer, as scripted, each command not answered yet."""
        for command in await self.h.commands():
            status = self.script.get(command.action)
            if command.id in self.seen or status is None:
                continue
            self.seen.add(command.id)
            self.answered.append(command)
            await self.h.answer(command, status=status, reason="" if status == "ok" else "disk busy")

    async def run(self, stop: asyncio.Event) -> None:
        # Stopped by `stop`, not by a cancel: Python 3.11 can lose a cancel inside nats-py's requests
        # (`asyncio.wait_for`), and a loop waiting for one would never end.
        while not stop.is_set():
            await self.answer_pending()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    await stop.wait()


@contextlib.asynccontextmanager
async def responding(h: AgentHarness, **script: ResultStatus | None) -> AsyncIterator[Responder]:
    responder = Responder(h, script)
    stop = asyncio.Event()
    task = asyncio.create_task(responder.run(stop))
    try:
        yield responder
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


async def disk_full(h: AgentHarness, device: str = "dev1") -> str:
    event = await h.publish_event("disk_full", {"device": device}, source="ops")
    return clearer.run_id(event.id)


async def sent(h: AgentHarness) -> list[tuple[str, str]]:
    return [(command.action, command.subject or "") for command in await h.commands()]


async def test_an_ok_answer_takes_no_fallback(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR, **binding) as h:
        async with responding(h, clear_temp="ok"):
            record = await h.wait_for_run(await disk_full(h))
        assert (record.state, record.result) == ("done", "clear_temp by dev1")
        assert list(record.steps) == ["clear"]
        assert await sent(h) == [("clear_temp", "dev1")]
        assert await h.facts("fallback_taken") == []


async def test_an_answer_other_than_ok_hands_over_to_the_next_way(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR, **binding) as h:
        async with responding(h, clear_temp="failed", rotate_logs="ok"):
            trigger = await h.publish_event("disk_full", {"device": "dev1"}, source="ops")
            record = await h.wait_for_run(clearer.run_id(trigger.id))
        assert (record.state, record.result) == ("done", "rotate_logs by dev1")
        assert list(record.steps) == ["clear", "rotate:taken", "rotate"]
        assert record.steps["clear"].status == "done"  # the device's answer stays journalled: a replay
        assert await sent(h) == [("clear_temp", "dev1"), ("rotate_logs", "dev1")]  # turns the same way
        (rotate,) = await h.commands("rotate_logs")
        assert rotate.data == {"keep": 2}
        [taken] = await h.facts("fallback_taken")
        assert taken.data == {
            "run": clearer.run_id(trigger.id),
            "step": "clear",
            "failed": "clear",
            "reason": "dev1 answered failed: disk busy",
            "fallback": "rotate",
        }


async def test_an_ok_signed_by_another_device_is_no_answer_and_the_way_times_out() -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR) as h:
        run_id = await disk_full(h)
        await h.wait_for_step(run_id, "clear", status="waiting")
        (command,) = await h.commands("clear_temp")
        forged = h.device("dev2").sign(CommandResult.for_command(command, source="nerve://dev1", status="ok"))
        subject = Address(device="dev1", kind=Kind.RESULTS, name="clear_temp").subject(h.prefix)
        await publish_envelope(h.js, subject, forged)
        await h.advance(TTL + CLOCK_SKEW_S + 1)
        await h.wait_for_step(run_id, "rotate", status="waiting")
        [taken] = await h.facts("fallback_taken")
    assert taken.data["reason"] == f"no result from dev1 to clear_temp within {TTL + CLOCK_SKEW_S:g}s"


async def test_no_answer_then_a_refusal_then_a_person() -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR) as h:
        async with responding(h, rotate_logs="rejected", clear_temp=None):
            run_id = await disk_full(h)
            await h.wait_for_step(run_id, "clear", status="waiting")
            await h.advance(TTL + CLOCK_SKEW_S + 1)  # no answer from dev1 to clear_temp in time
            await h.wait_for_step(run_id, "gateway", status="waiting")
            await h.advance(TTL + CLOCK_SKEW_S + 1)  # nor from the gateway
            await decide(h, run_id, "clear_by_hand", approve=True)
            record = await h.wait_for_run(run_id)
        assert (record.state, record.result) == ("done", "a person: approved")
        assert [fact.data["fallback"] for fact in await h.facts("fallback_taken")] == [
            "rotate",
            "gateway",
            "clear_by_hand",
        ]
        assert await sent(h) == [("clear_temp", "dev1"), ("rotate_logs", "dev1"), ("clear_temp", "gw1")]


async def test_when_every_way_failed_the_step_fails_naming_each(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR, **binding) as h:
        async with responding(h, clear_temp="failed", rotate_logs="expired"):
            run_id = await disk_full(h)
            await decide(h, run_id, "clear_by_hand", approve=False)
            record = await h.wait_for_run(run_id)
        assert record.state == "done"  # the agent caught the StepFailed
        assert record.result == (
            "failed: every way failed: clear: dev1 answered failed: disk busy; rotate: dev1 answered "
            "expired: disk busy; gateway: gw1 answered failed: disk busy; clear_by_hand: rejected by "
            "central: phoned"
        )


@pytest.mark.parametrize("twice", [False, True])
async def test_a_crash_at_any_journal_write_sends_each_way_once(*, twice: bool) -> None:
    async with AgentHarness(agents=[clearer], signer=OPERATOR) as clean:
        async with responding(clean, clear_temp="failed", rotate_logs="ok"):
            await clean.wait_for_run(await disk_full(clean))
        writes = clean.journal_writes
    assert writes >= 4
    for crash_at in range(1, writes + 1):
        for when in ("before", "after"):
            async with (
                AgentHarness(
                    agents=[clearer], signer=OPERATOR, crash_at=crash_at, crash_when=when, deliver_twice=twice
                ) as h,
                responding(h, clear_temp="failed", rotate_logs="ok") as responder,
            ):
                run_id = await disk_full(h)
                for _ in range(160):  # a second at a time: the lease is one (HARNESS_SETTINGS)
                    if (record := await h.run(run_id)) is not None and record.terminal:
                        break
                    # A device answers within a moment, long before the command's ttl.
                    await asyncio.sleep(0.02)
                    await responder.answer_pending()
                    await h.advance(1)  # past a trigger's 30 s ack wait, when the crash lost it
                record = await h.wait_for_run(run_id)
                taken = [fact.data["fallback"] for fact in await h.facts("fallback_taken")]
                commands = await sent(h)
            assert (record.state, record.result) == ("done", "rotate_logs by dev1"), (crash_at, when)
            # Each way's command under one id (a re-send is kept once), each answered once.
            assert commands == [("clear_temp", "dev1"), ("rotate_logs", "dev1")], (crash_at, when)
            assert len(responder.answered) == 2, (crash_at, when)
            assert taken == ["rotate"], (crash_at, when)


@durable_agent(
    "hasty",
    trigger=Trigger(Kind.EVENTS, "hurry", source="ops"),
    key=lambda event: str(event.data["device"]),
)
async def hasty(event: Envelope, step: Step) -> str:
    result = await step.command(
        "clear", device=step.key, action="clear_temp", args={}, ttl=float(str(event.data["ttl"]))
    )
    return result.status


@pytest.mark.parametrize("ttl", [0.0, -5.0])
async def test_a_command_that_would_expire_when_sent_is_refused_and_never_sent(ttl: float) -> None:
    async with AgentHarness(agents=[hasty], signer=OPERATOR) as h:
        event = await h.publish_event("hurry", {"device": "dev1", "ttl": ttl}, source="ops")
        record = await h.wait_for_run(hasty.run_id(event.id))
        assert await h.commands() == []
    assert record.state == "failed"
    assert f"ttl {ttl!r} must be above 0 seconds" in record.error


def test_command_fallbacks_are_checked_when_declared() -> None:
    async def nothing() -> None:
        return None

    ways = declared_commands(
        "a", [CommandFallback("b", device="d", action="x"), Person("c", route="ops", expires=1)]
    )
    assert [way.name for way in ways] == ["b", "c"]
    with pytest.raises(AgentDeclarationError, match="used twice"):
        declared_commands("a", [CommandFallback("a", device="d", action="x")])
    with pytest.raises(AgentDeclarationError, match="device 'd 1' is not a token"):
        declared_commands("a", [CommandFallback("b", device="d 1", action="x")])
    with pytest.raises(AgentDeclarationError, match=r"action 'x\.y' is not a token"):
        declared_commands("a", [CommandFallback("b", device="d", action="x.y")])
    with pytest.raises(AgentDeclarationError, match="attempts must be at least 1"):
        declared_commands("a", [CommandFallback("b", device="d", action="x", attempts=0)])
    with pytest.raises(AgentDeclarationError, match="ttl 0 must be above 0 seconds"):
        declared_commands("a", [CommandFallback("b", device="d", action="x", ttl=0)])
    with pytest.raises(AgentDeclarationError, match="ttl nan must be above 0 seconds"):
        declared_commands("a", [CommandFallback("b", device="d", action="x", ttl=float("nan"))])
    with pytest.raises(AgentDeclarationError, match="not a CommandFallback or a Person"):
        declared_commands("a", [Fallback("b", nothing)])  # type: ignore[list-item]
