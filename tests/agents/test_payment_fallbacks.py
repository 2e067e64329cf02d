"""The payment saga's offer fallbacks, on the harness: when the shop cannot be sent the offer, another
gateway is, then a person offers by hand; a crash at any journal write changes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from nacl.signing import SigningKey
from nats.errors import TimeoutError as NatsTimeout
from tests.runtime.harness.people import decide

from nerve.agents.payment import AGENT, OFFER_BY_HAND, payment_recovery
from nerve.runtime.central.agent import AgentContext
from nerve.runtime.config.settings import load_settings
from nerve.runtime.engine import RetryPolicy
from nerve.runtime.harness import AgentHarness
from nerve.runtime.trust.signing import Signer

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from nerve.runtime.engine import DurableAgent, RunRecord

CENTRAL = Signer("central", SigningKey.generate())
FAST = RetryPolicy(attempts=2, initial_s=0.01, maximum_s=0.02)
SHOP_OFFER = "nerve.shop.commands.offer_alternative_payment"


class Outage:
    """JetStream as the saga's context sees it, where subjects in `down` cannot be stored (a gateway's)."""

    def __init__(self, *down: str) -> None:
        self.down = set(down)
        self.refused = 0
        self.js: JetStreamContext | None = None

    async def publish(self, subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
        assert self.js is not None
        if subject in self.down:
            self.refused += 1
            raise NatsTimeout
        return await self.js.publish(subject, payload, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.js, name)


def saga(outage: Outage, **payment: Any) -> DurableAgent:
    settings = load_settings(overrides={"central": {"payment": {"wait_s": 600, **payment}}})
    ctx = AgentContext(js=outage, settings=settings, signer=CENTRAL, agent=AGENT)  # type: ignore[arg-type]
    return payment_recovery(ctx, settings.central.payment, retry=FAST)


async def failed_payment(h: AgentHarness, agent: DurableAgent, outage: Outage, order: str) -> str:
    outage.js = h.js
    event = await h.publish_event("payment_failed", {"order_id": order, "customer_id": "c-1"})
    return agent.run_id(event.id)


async def offers(h: AgentHarness) -> list[str]:
    return [command.subject for command in await h.commands("offer_alternative_payment")]


async def test_an_offer_the_shop_cannot_get_goes_to_the_next_gateway() -> None:
    outage = Outage(SHOP_OFFER)
    agent = saga(outage, fallback_sources=["backup-gw"])
    async with AgentHarness(agents=[agent], signer=CENTRAL) as h:
        run_id = await failed_payment(h, agent, outage, "o-1")
        await h.wait_for_step(run_id, "paid", status="waiting")
        await h.publish_event("payment_succeeded", {"order_id": "o-1"})
        record = await h.wait_for_run(run_id)
        assert record.state == "done"
        assert outage.refused == FAST.attempts  # the shop's offer: its tries, then never again
        assert await offers(h) == ["backup-gw"]
        [taken] = await h.facts("fallback_taken")
        assert (taken.data["step"], taken.data["fallback"]) == ("offer", "offer_via_backup-gw")
        assert [fact.kind for fact in await h.facts()] == [
            "recovery_flow_initiated",
            "fallback_taken",
            "payment_recovered",
        ]


async def test_when_no_service_can_offer_a_person_does(binding: dict[str, Any]) -> None:
    outage = Outage(SHOP_OFFER)
    agent = saga(outage)
    async with AgentHarness(agents=[agent], signer=CENTRAL, **binding) as h:
        run_id = await failed_payment(h, agent, outage, "o-2")
        await decide(h, run_id, OFFER_BY_HAND, approve=True, signer=CENTRAL, comment="called them")
        await h.wait_for_step(run_id, "paid", status="waiting")
        await h.publish_event("payment_succeeded", {"order_id": "o-2"})
        record = await h.wait_for_run(run_id)
        assert record.state == "done"
        assert record.result["offer"]["outcome"] == "approved"
        assert await offers(h) == []
        kinds = [fact.kind for fact in await h.facts()]
        assert kinds == [
            "recovery_flow_initiated",
            "fallback_taken",
            "approval_requested",
            "approved",
            "payment_recovered",
        ]
        [asked] = await h.facts("approval_requested")
        assert asked.data["route"] == "payments"


async def test_a_person_who_cannot_offer_either_winds_the_order_up() -> None:
    outage = Outage(SHOP_OFFER, "nerve.backup-gw.commands.offer_alternative_payment")
    agent = saga(outage, fallback_sources=["backup-gw"])
    async with AgentHarness(agents=[agent], signer=CENTRAL) as h:
        run_id = await failed_payment(h, agent, outage, "o-3")
        await decide(h, run_id, OFFER_BY_HAND, approve=False, signer=CENTRAL, comment="called them")
        record = await h.wait_for_run(run_id)
        assert record.state == "compensated"
        assert "offer_by_hand: rejected by central: called them" in record.error
        sent = [(command.subject, command.action) for command in await h.commands()]
        assert sent == [("shop", "release_reservation"), ("shop", "notify_customer")]
        kinds = [fact.kind for fact in await h.facts()]
        assert kinds[:2] == ["recovery_flow_initiated", "fallback_taken"]
        assert kinds[-4:] == ["compensated", "compensated", "escalated", "run_failed"]


async def test_without_a_person_route_a_failed_offer_fails_the_run() -> None:
    outage = Outage(SHOP_OFFER)
    agent = saga(outage, person_route=None)
    async with AgentHarness(agents=[agent], signer=CENTRAL) as h:
        run_id = await failed_payment(h, agent, outage, "o-4")
        record = await h.wait_for_run(run_id)
        assert record.state == "compensated"
        assert await h.facts("fallback_taken") == []


async def run_to_end(h: AgentHarness, run_id: str) -> RunRecord:
    """Let time pass a second at a time (past a lost trigger's 30 s ack wait) until the run ended.

    Not more at once: a lease is a second (HARNESS_SETTINGS), and the run may be executing a step.
    """
    for _ in range(160):
        if (record := await h.run(run_id)) is not None and record.terminal:
            return record
        if record is not None and "paid" in record.steps:
            await h.publish_event("payment_succeeded", {"order_id": record.key}, event_id=f"ps-{record.key}")
        await h.advance(1)
    return await h.wait_for_run(run_id)


async def test_a_crash_at_any_journal_write_offers_once_through_the_gateway() -> None:
    outage = Outage(SHOP_OFFER)
    agent = saga(outage, fallback_sources=["backup-gw"])
    async with AgentHarness(agents=[agent], signer=CENTRAL) as clean:
        await run_to_end(clean, await failed_payment(clean, agent, outage, "o-clean"))
        writes = clean.journal_writes
    assert writes > 5
    for crash_at in range(1, writes + 1):
        for when in ("before", "after"):
            outage.refused = 0
            order = f"o-{crash_at}-{when}"
            async with AgentHarness(agents=[agent], signer=CENTRAL, crash_at=crash_at, crash_when=when) as h:
                record = await run_to_end(h, await failed_payment(h, agent, outage, order))
                sent = await offers(h)
                taken = len(await h.facts("fallback_taken"))
            assert record.state == "done", (crash_at, when, record.error)
            assert sent == ["backup-gw"], (crash_at, when)  # one offer, kept once
            assert taken == 1, (crash_at, when)
            # The shop is asked again only when the crash came before its failure was journalled.
            assert outage.refused <= FAST.attempts + 1, (crash_at, when)


@pytest.fixture
def binding(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The harness on a real nats-server (this test's), as docs/testing-agents.md's "nats" binding."""
    request.applymarker(pytest.mark.broker)
    server = request.getfixturevalue("nats_server")
    return {"binding": "nats", "nats_url": server.url}
