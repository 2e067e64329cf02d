"""The agent harness on both bindings: an order saga done, compensated, cancelled, under duplicates."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import pytest

from nerve.runtime.engine import RetryPolicy, Step, Terminal, Trigger, durable_agent
from nerve.runtime.harness import AgentHarness
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.envelope.model import Envelope


class Sink:
    """Where effects land, as a service that keeps each request id once (JetStream, a payment API)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.landed: dict[str, list[str]] = defaultdict(list)

    async def effect(self, order: str, what: str, request_id: str) -> str:
        self.calls[f"{order}:{what}"] += 1
        if what not in self.landed[order]:  # one run per order: `what` stands for the step id
            self.landed[order].append(what)
        return request_id


sink = Sink()


@pytest.fixture(autouse=True)
def _fresh_sink() -> None:
    """Each test (and binding) counts its own effects."""
    sink.calls.clear()
    sink.landed.clear()


@durable_agent(
    "fulfil",
    trigger=Trigger(Kind.EVENTS, "order_placed", source="shop"),
    key=lambda event: str(event.data["order"]),
    waits_on=(Kind.EVENTS,),
    retry=RetryPolicy(attempts=2, initial_s=0.01, maximum_s=0.02),
)
async def fulfil(event: Envelope, step: Step) -> str:
    """Reserve, charge, wait for the shipment (2 s), cool down, notify; undo the charge and reservation."""
    order = str(event.data["order"])

    def act(what: str, name: str) -> Any:
        return lambda: sink.effect(order, what, step.id(name))

    await step.run("reserve", act("reserve", "reserve"), undo=act("release", "reserve"))
    await step.run("charge", act("charge", "charge"), undo=act("refund", "charge"))
    await step.fact("charged", kind="order_charged", summary=f"order {order} charged")
    shipped = await step.wait_for_event(
        "shipped", "order_shipped", match=lambda e: e.data.get("order") == order, timeout=2
    )
    if shipped is None:
        raise Terminal(f"order {order} not shipped in time")
    await step.sleep("cool", 1)
    await step.run("notify", act("notify", "notify"))
    return "fulfilled"


DONE = ["reserve", "charge", "notify"]
COMPENSATED = ["reserve", "charge", "refund", "release"]


async def drive(h: AgentHarness, run_id: str, *, ship: str | None = None, rounds: int = 40) -> str:
    """Let time pass a second at a time until the run ended; its final state.

    With `ship`, the order is shipped once the run waits for it.
    """
    for _ in range(rounds):
        record = await h.run(run_id)
        if record is not None and record.terminal:
            return record.state
        if ship and record is not None and "shipped" in record.steps:
            await h.publish_event("order_shipped", {"order": ship}, event_id=f"shipped-{ship}")
            ship = None
        await h.advance(1)
    return str(await h.run_state(run_id))


async def test_a_shipped_order_is_fulfilled(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-done"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        await h.publish_event("order_shipped", {"order": "o-done"})
        await h.wait_for_run(run_id, state="waiting")  # the cool-down sleep parks it
        assert sink.landed["o-done"] == ["reserve", "charge"]
        await h.advance(1)
        record = await h.wait_for_run(run_id)
        assert record.state == "done"
        assert record.result == "fulfilled"
        assert sink.landed["o-done"] == DONE
        facts = await h.facts("order_charged")
        assert [fact.summary for fact in facts] == ["order o-done charged"]


async def test_an_order_not_shipped_is_compensated_in_reverse(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-late"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_run(run_id, state="open")
        assert await drive(h, run_id) == "compensated"
        assert sink.landed["o-late"] == COMPENSATED
        undone = [fact.data["step"] for fact in await h.facts("compensated")]
        assert undone == ["charge", "reserve"]


async def test_every_message_delivered_twice_changes_nothing(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], deliver_twice=True, **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-twice"})
        run_id = fulfil.run_id(event.id)
        assert await drive(h, run_id, ship="o-twice") == "done"
        assert sink.landed["o-twice"] == DONE
        assert all(sink.calls[f"o-twice:{what}"] == 1 for what in DONE)
        assert len(await h.facts("order_charged")) == 1
        assert [record.run_id for record in await h.runs() if record.key == "o-twice"] == [run_id]
