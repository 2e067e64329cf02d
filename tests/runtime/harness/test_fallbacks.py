"""Declared step fallbacks (`step.run(fallbacks=...)`) on both bindings: another gateway, then a person."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from tests.runtime.harness.people import OPERATOR, decide

from nerve.runtime.engine import (
    AgentDeclarationError,
    Fallback,
    Person,
    RetryPolicy,
    Trigger,
    durable_agent,
)
from nerve.runtime.engine.fallback import declared
from nerve.runtime.harness import AgentHarness
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nerve.runtime.engine import Step
    from nerve.runtime.envelope.model import Envelope

ATTEMPTS = 2


class Gateways:
    """Payment gateways that keep each charge id once; `down` lists the ones that fail for every order."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.charged: dict[str, set[str]] = {}
        self.refunded: list[str] = []
        #: A gateway waits for this before charging (to crash the engine while a charge is under way).
        self.hold: asyncio.Event | None = None

    def charge(self, gateway: str, down: list[str], charge_id: str) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            self.calls[gateway] += 1
            if gateway in down:
                raise ConnectionError(f"{gateway} is down")
            if self.hold is not None and gateway == "backup":
                await self.hold.wait()
            self.charged.setdefault(gateway, set()).add(charge_id)
            return gateway

        return call

    def refund(self, gateway: str, charge_id: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            if charge_id not in self.refunded and charge_id in self.charged.get(gateway, set()):
                self.refunded.append(charge_id)

        return call


gateways = Gateways()


@pytest.fixture(autouse=True)
def _fresh_gateways() -> None:
    global gateways  # noqa: PLW0603 - one set of gateways per test, read by the agent below
    gateways = Gateways()


@durable_agent(
    "charge",
    trigger=Trigger(Kind.EVENTS, "order_placed", source="shop"),
    key=lambda event: str(event.data["order"]),
    retry=RetryPolicy(attempts=ATTEMPTS, initial_s=0.01, maximum_s=0.02),
)
async def charge(event: Envelope, step: Step) -> Any:
    order, down = str(event.data["order"]), list(event.data.get("down", []))
    return await step.run(
        "charge",
        gateways.charge("primary", down, step.id("charge")),
        undo=gateways.refund("primary", step.id("charge")),
        fallbacks=[
            Fallback(
                "charge_backup",
                gateways.charge("backup", down, step.id("charge_backup")),
                undo=gateways.refund("backup", step.id("charge_backup")),
            ),
            Person("charge_by_hand", route="payments", expires=30, summary=f"charge order {order} by hand"),
        ],
    )


async def placed(h: AgentHarness, order: str, *down: str) -> str:
    event = await h.publish_event("order_placed", {"order": order, "down": list(down)})
    return charge.run_id(event.id)


async def test_a_primary_that_works_takes_no_fallback(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR, **binding) as h:
        run_id = await placed(h, "o-1")
        record = await h.wait_for_run(run_id)
        assert (record.state, record.result) == ("done", "primary")
        assert list(record.steps) == ["charge"]
        assert gateways.calls == Counter({"primary": 1})
        assert await h.facts("fallback_taken") == []


async def test_a_primary_that_fails_for_good_hands_over_to_the_next_gateway(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR, **binding) as h:
        run_id = await placed(h, "o-2", "primary")
        record = await h.wait_for_run(run_id)
        assert (record.state, record.result) == ("done", "backup")
        assert list(record.steps) == ["charge", "charge_backup:taken", "charge_backup"]
        assert record.steps["charge"].status == "failed"
        assert gateways.calls == Counter({"primary": ATTEMPTS, "backup": 1})  # its retries, then never again
        [taken] = await h.facts("fallback_taken")
        assert taken.data["fallback"] == "charge_backup"
        assert taken.data["reason"] == "ConnectionError: primary is down"
        assert [entry.step for entry in record.undos] == ["charge", "charge_backup"]


async def test_when_every_gateway_fails_a_person_charges_by_hand(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR, **binding) as h:
        run_id = await placed(h, "o-3", "primary", "backup")
        await decide(h, run_id, "charge_by_hand", approve=True)
        record = await h.wait_for_run(run_id)
        assert record.state == "done"
        assert record.result["outcome"] == "approved"
        assert record.result["comment"] == "phoned"
        assert [fact.data["fallback"] for fact in await h.facts("fallback_taken")] == [
            "charge_backup",
            "charge_by_hand",
        ]
        assert len(await h.facts("approval_requested")) == 1
        assert len(await h.facts("approved")) == 1


async def test_a_person_who_refuses_fails_the_step_and_every_undo_runs(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR, **binding) as h:
        run_id = await placed(h, "o-4", "primary", "backup")
        await decide(h, run_id, "charge_by_hand", approve=False)
        record = await h.wait_for_run(run_id)
        assert record.state == "compensated"
        assert (
            "step 'charge' failed: every way failed: charge: ConnectionError: primary is down" in record.error
        )
        assert "charge_by_hand: rejected by central: phoned" in record.error
        # Both charges' undos were registered before their tries (a try that failed may have charged).
        assert [fact.data["step"] for fact in await h.facts("compensated")] == ["charge_backup", "charge"]


async def test_nobody_deciding_in_time_fails_the_step() -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR) as h:
        run_id = await placed(h, "o-5", "primary", "backup")
        await h.wait_for_step(run_id, "charge_by_hand", status="waiting")
        await h.advance(31)
        record = await h.wait_for_run(run_id)
        assert record.state == "compensated"
        assert "charge_by_hand: the approval expired" in record.error
        [expired] = await h.facts("approval_expired")
        assert expired.summary.endswith(": the run compensates")  # the last way: it does
        [asked] = await h.facts("approval_requested")
        assert asked.summary.endswith("then: compensate")


@durable_agent(
    "ask_first",
    trigger=Trigger(Kind.EVENTS, "order_held", source="shop"),
    key=lambda event: str(event.data["order"]),
    retry=RetryPolicy(attempts=ATTEMPTS, initial_s=0.01, maximum_s=0.02),
)
async def ask_first(event: Envelope, step: Step) -> Any:
    down = list(event.data.get("down", []))
    return await step.run(
        "charge",
        gateways.charge("primary", down, step.id("charge")),
        fallbacks=[
            Person("ask_ops", route="ops", expires=30, summary="charge it by hand"),
            Fallback("charge_backup", gateways.charge("backup", down, step.id("charge_backup"))),
        ],
    )


async def test_a_person_before_the_last_way_says_the_next_way_follows_not_that_the_run_compensates() -> None:
    async with AgentHarness(agents=[ask_first], signer=OPERATOR) as h:
        event = await h.publish_event("order_held", {"order": "o-7", "down": ["primary"]})
        run_id = ask_first.run_id(event.id)
        await h.wait_for_step(run_id, "ask_ops", status="waiting")
        await h.advance(31)
        record = await h.wait_for_run(run_id)
        [asked] = await h.facts("approval_requested")
        [expired] = await h.facts("approval_expired")
        compensated = await h.facts("compensated") + await h.facts("run_failed")
    assert (record.state, record.result) == ("done", "backup")  # the next way was taken, and worked
    assert asked.data["on_expiry"] == "fallback"
    assert asked.summary.endswith("then: fallback")
    assert expired.data["on_expiry"] == "fallback"
    assert expired.summary.endswith(": this way failed; the step's next fallback is taken")
    assert "compensat" not in asked.summary + expired.summary
    assert compensated == []
    assert record.steps["ask_ops"].status == "failed"


async def test_a_crash_while_the_fallback_runs_resumes_it_and_never_the_primary(
    binding: dict[str, Any],
) -> None:
    gateways.hold = asyncio.Event()
    async with AgentHarness(agents=[charge], signer=OPERATOR, **binding) as h:
        run_id = await placed(h, "o-6", "primary")
        await h.wait_for_step(run_id, "charge_backup", status="started")  # its undo is journalled first
        assert gateways.calls == Counter({"primary": ATTEMPTS, "backup": 1})
        await h.crash_and_restart()
        gateways.hold.set()
        record = await h.wait_for_run(run_id)
        assert (record.state, record.result) == ("done", "backup")
        assert gateways.calls["primary"] == ATTEMPTS  # the primary failed for good: never tried again
        assert gateways.calls["backup"] == 2  # the charge under way ran again (at-least-once)
        assert len(gateways.charged["backup"]) == 1  # under one charge id: the gateway kept it once
        assert len(await h.facts("fallback_taken")) == 1


async def test_a_crash_at_any_journal_write_charges_once() -> None:
    async with AgentHarness(agents=[charge], signer=OPERATOR) as clean:
        await clean.wait_for_run(await placed(clean, "o-clean", "primary"))
        writes = clean.journal_writes
    for crash_at in range(1, writes + 1):
        for when in ("before", "after"):
            gateways.calls.clear()
            order = f"o-{crash_at}-{when}"
            async with AgentHarness(
                agents=[charge], signer=OPERATOR, crash_at=crash_at, crash_when=when
            ) as h:
                run_id = await placed(h, order, "primary")
                for _ in range(160):  # a second at a time: the lease is one (HARNESS_SETTINGS)
                    if (record := await h.run(run_id)) is not None and record.terminal:
                        break
                    await h.advance(1)  # past a trigger's 30 s ack wait, when the crash lost it
                record = await h.wait_for_run(run_id)
                taken = [fact.data["fallback"] for fact in await h.facts("fallback_taken")]
            assert (record.state, record.result) == ("done", "backup"), (crash_at, when)
            # The primary runs again only when the crash came before its failure was journalled.
            assert gateways.calls["primary"] <= ATTEMPTS + 1, (crash_at, when)
            assert taken == ["charge_backup"], (crash_at, when)


def test_fallbacks_are_checked_when_declared() -> None:
    async def nothing() -> None:
        return None

    assert [way.name for way in declared("a", [("b", nothing), Person("c", route="ops", expires=1)])] == [
        "b",
        "c",
    ]
    with pytest.raises(AgentDeclarationError, match="used twice"):
        declared("a", [("a", nothing)])
    with pytest.raises(AgentDeclarationError, match="used twice"):
        declared("a", [("b", nothing), Fallback("b", nothing)])
    with pytest.raises(AgentDeclarationError, match="route 'ops team' is not a token"):
        declared("a", [Person("b", route="ops team", expires=60)])
    with pytest.raises(AgentDeclarationError, match="not a Fallback"):
        declared("a", ["b"])  # type: ignore[list-item]
