"""The example agent of the harness's tests: an order saga whose effects land in a `Sink`."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from nerve.runtime.engine import RetryPolicy, Step, Terminal, Trigger, durable_agent
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.harness import AgentHarness


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


async def drive(
    h: AgentHarness, run_id: str, *, ship: str | None = None, rounds: int = 40, tick: float = 1.0
) -> str:
    """Let time pass `tick` seconds at a time until the run ended; its final state.

    With `ship`, the order is shipped once the run waits for it.
    """
    for _ in range(rounds):
        record = await h.run(run_id)
        if record is not None and record.terminal:
            return record.state
        if ship and record is not None and "shipped" in record.steps:
            await h.publish_event("order_shipped", {"order": ship}, event_id=f"shipped-{ship}")
            ship = None
        await h.advance(tick)
    return str(await h.run_state(run_id))
