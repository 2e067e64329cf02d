"""Tests of a durable agent with the harness: the example of docs/testing-agents.md, word for word."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from nerve.runtime.engine import Terminal, Trigger, durable_agent
from nerve.runtime.harness import AgentHarness
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.engine import Step
    from nerve.runtime.envelope.model import Envelope

#: The shop: one reservation per order, and the request that made it. Holding an order twice, or
#: releasing it twice, changes nothing: a step runs again after a crash, so its effect must be idempotent.
reservations: dict[str, str] = {}
released: list[str] = []


async def hold(order: str, request_id: str) -> None:
    reservations.setdefault(order, request_id)


async def release(order: str) -> None:
    if reservations.pop(order, None) is not None:
        released.append(order)


@durable_agent(
    "payment_recovery",
    trigger=Trigger(Kind.EVENTS, "payment_failed", source="shop"),
    key=lambda event: str(event.data["order"]),
    waits_on=(Kind.EVENTS,),
)
async def payment_recovery(event: Envelope, step: Step) -> str:
    order = str(event.data["order"])
    await step.run("reserve", lambda: hold(order, step.id("reserve")), undo=lambda: release(order))
    await step.fact(
        "offered", kind="recovery_flow_initiated", summary=f"order {order}: other payment offered"
    )
    paid = await step.wait_for_event(
        "paid", "payment_succeeded", match=lambda e: e.data.get("order") == order, timeout=3600
    )
    if paid is None:
        raise Terminal("not paid within an hour")  # the run fails: "reserve" is undone
    return "recovered"


@pytest.fixture(autouse=True)
def _empty_shop() -> None:
    reservations.clear()
    released.clear()


async def test_a_paid_order_is_recovered() -> None:
    async with AgentHarness(agents=[payment_recovery]) as h:
        failed = await h.publish_event("payment_failed", {"order": "o-1"})
        run_id = payment_recovery.run_id(failed.id)
        await h.wait_for_step(run_id, "paid", status="waiting")
        await h.publish_event("payment_succeeded", {"order": "o-1"})
        record = await h.wait_for_run(run_id)
        assert (record.state, record.result) == ("done", "recovered")
        assert list(reservations) == ["o-1"]
        assert released == []
        assert [fact.kind for fact in await h.facts()] == ["recovery_flow_initiated"]


async def test_an_unpaid_order_is_released_after_an_hour() -> None:
    async with AgentHarness(agents=[payment_recovery]) as h:
        failed = await h.publish_event("payment_failed", {"order": "o-2"})
        run_id = payment_recovery.run_id(failed.id)
        await h.wait_for_step(run_id, "paid", status="waiting")
        await h.advance(3599)
        assert await h.run_state(run_id) == "open"  # still waiting
        await h.advance(1)  # the hour is up (a durable timer, on the fake clock)
        assert (await h.wait_for_run(run_id)).state == "compensated"
        assert (reservations, released) == ({}, ["o-2"])
        kinds = [fact.kind for fact in await h.facts()]
        assert kinds == ["recovery_flow_initiated", "compensated", "run_failed"]


async def test_the_same_failure_twice_starts_one_run() -> None:
    async with AgentHarness(agents=[payment_recovery], deliver_twice=True) as h:
        failed = await h.publish_event("payment_failed", {"order": "o-3"}, event_id="evt-3")
        await h.publish_event("payment_failed", {"order": "o-3"}, event_id="evt-3")  # kept once
        run_id = payment_recovery.run_id(failed.id)
        await h.wait_for_step(run_id, "paid", status="waiting")
        await h.advance(3600)
        await h.wait_for_run(run_id)
        assert len(await h.runs()) == 1
        assert released == ["o-3"]


async def test_a_crash_at_any_journal_write_changes_nothing() -> None:
    async with AgentHarness(agents=[payment_recovery]) as clean:
        failed = await clean.publish_event("payment_failed", {"order": "o-4"})
        await clean.wait_for_step(payment_recovery.run_id(failed.id), "paid", status="waiting")
        await clean.advance(3600)
        await clean.wait_for_run(payment_recovery.run_id(failed.id))
        writes = clean.journal_writes
    for crash_at in range(1, writes + 1):
        for when in ("before", "after"):
            order = f"o-{crash_at}-{when}"
            async with AgentHarness(agents=[payment_recovery], crash_at=crash_at, crash_when=when) as h:
                failed = await h.publish_event("payment_failed", {"order": order})
                run_id = payment_recovery.run_id(failed.id)
                for _ in range(10):  # let time pass until the run ended
                    if (record := await h.run(run_id)) is not None and record.terminal:
                        break
                    await h.advance(600)
                assert await h.run_state(run_id) == "compensated", (crash_at, when)
                assert order not in reservations, (crash_at, when)
                assert released.count(order) == 1, (crash_at, when)
