"""The payment-recovery saga end to end on a real nats-server; the shop is played with plain nats-py."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest
from nacl.signing import SigningKey

from nerve.agents.payment import AGENT, PaymentRecovery, payment_recovery
from nerve.runtime.central.agent import AgentContext
from nerve.runtime.config.settings import PaymentRecoverySettings, load_settings
from nerve.runtime.engine import Engine, EngineSettings, RunFailure, wait_for_run
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, Event, Fact
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM, FACTS_STREAM, STREAM_OF_KIND, ensure_streams
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages
from nerve.runtime.trust.signing import Signer, Verifier

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker

CENTRAL = Signer("central", SigningKey.generate())
COMMANDS_STREAM = STREAM_OF_KIND[Kind.COMMANDS]
EVENTS_STREAM = STREAM_OF_KIND[Kind.EVENTS]
FAST = EngineSettings(lease_s=1.0)


@pytest.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    context = nc.jetstream()
    await ensure_streams(context, "nerve")
    return context


def agent(nc: NatsClient, nats_server: NatsServer, wait_s: float) -> DurableAgent:
    settings = load_settings(
        overrides={"nats": {"url": nats_server.url}, "central": {"payment": {"wait_s": wait_s}}}
    )
    ctx = AgentContext(js=nc.jetstream(), settings=settings, signer=CENTRAL, agent=AGENT)
    return payment_recovery(ctx, settings.central.payment)


@dataclass
class Running:
    """An engine running the saga, and the saga."""

    engine: Engine
    saga: DurableAgent

    def run_id(self, event_id: str) -> str:
        return self.saga.run_id(event_id)


@pytest.fixture
async def slow(nc: NatsClient, nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Running]:
    """An engine running the saga with an hour to pay."""
    saga = agent(nc, nats_server, 3600)
    async with Engine(nc=nc, agents=[saga], settings=FAST, signer=CENTRAL) as engine:
        yield Running(engine, saga)


async def at_step(engine: Engine, run_id: str, step: str) -> None:
    """Once run `run_id` has begun step `step`."""
    async with asyncio.timeout(20):
        while True:
            record = await engine.record(run_id)
            if record is not None and step in record.steps:
                return
            await asyncio.sleep(0.05)


async def shop_event(
    js: JetStreamContext, event_type: str, data: dict[str, Any], *, event_id: str, msg_id: str = ""
) -> None:
    """What the shop does: a structured JSON CloudEvent on `nerve.shop.events.<type>`, with plain nats-py."""
    document = {
        "specversion": "1.0",
        "id": event_id,
        "source": "https://shop.example/payments",
        "type": event_type,
        "subject": str(data.get("order_id", "")) or None,
        "time": "2026-12-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    }
    await js.publish(
        f"nerve.shop.events.{event_type}",
        json.dumps({k: v for k, v in document.items() if v is not None}).encode(),
        headers={"Nats-Msg-Id": msg_id or event_id, "Content-Type": "application/cloudevents+json"},
    )


def new_order() -> str:
    return f"o-{uuid.uuid4().hex[:10]}"


async def commands_for(js: JetStreamContext, order: str) -> list[tuple[str, Command]]:
    found = []
    for message in await stream_messages(js, COMMANDS_STREAM):
        command = decode(message.data, Command)
        if command.data.get("order_id") == order:
            found.append((message.subject, command))
    return found


async def events_for(js: JetStreamContext, order: str) -> list[tuple[str, Event]]:
    found = []
    for message in await stream_messages(js, EVENTS_STREAM):
        event = decode(message.data, Event)
        if (
            isinstance(event.data, dict)
            and event.data.get("order_id") == order
            and message.subject.startswith("nerve.central.")
        ):
            found.append((message.subject, event))
    return found


async def facts_for(js: JetStreamContext, order: str) -> list[Fact]:
    facts = [decode(message.data, Fact) for message in await stream_messages(js, FACTS_STREAM)]
    return [fact for fact in facts if fact.subject == order]


async def test_a_payment_that_succeeds_after_the_offer_recovers_the_order(
    slow: Running, js: JetStreamContext
) -> None:
    order = new_order()
    await shop_event(
        js,
        "payment_failed",
        {"order_id": order, "customer_id": "c-7", "reason": "card declined"},
        event_id=f"pf-{order}",
    )
    run_id = slow.run_id(f"pf-{order}")
    # The shop sees the offer; the customer pays another way.
    await at_step(slow.engine, run_id, "paid")
    await shop_event(js, "payment_succeeded", {"order_id": "another-order"}, event_id=f"ps-x-{order}")
    await shop_event(
        js, "payment_succeeded", {"order_id": order, "method": "bank_transfer"}, event_id=f"ps-{order}"
    )
    record = await wait_for_run(slow.engine.kv, run_id, timeout=20)
    assert record.state == "done"
    assert record.key == order
    assert record.result["payment_event"] == f"ps-{order}"
    commands = await commands_for(js, order)
    assert [subject for subject, _ in commands] == ["nerve.shop.commands.offer_alternative_payment"]
    offer = commands[0][1]
    Verifier.from_config({"central": CENTRAL.public_key}).verify(offer)  # signed by central
    assert (offer.subject, offer.data["customer_id"], offer.causationid) == ("shop", "c-7", f"pf-{order}")
    assert [subject for subject, _ in await events_for(js, order)] == [
        "nerve.central.events.recovery_flow_initiated",
        "nerve.central.events.recovery_flow_completed",
    ]
    assert [fact.kind for fact in await facts_for(js, order)] == [
        "recovery_flow_initiated",
        "payment_recovered",
    ]


async def test_a_payment_that_came_before_the_wait_still_counts(slow: Running, js: JetStreamContext) -> None:
    order = new_order()
    await shop_event(js, "payment_failed", {"order_id": order}, event_id=f"pf-{order}")
    await shop_event(js, "payment_succeeded", {"order_id": order}, event_id=f"ps-{order}")
    record = await wait_for_run(slow.engine.kv, slow.run_id(f"pf-{order}"), timeout=20)
    assert (record.state, record.result["outcome"]) == ("done", "recovered")


async def test_no_payment_in_time_releases_notifies_and_escalates_once(
    nc: NatsClient, nats_server: NatsServer, js: JetStreamContext
) -> None:
    saga = agent(nc, nats_server, wait_s=1.0)
    order = new_order()
    async with Engine(nc=nc, agents=[saga], settings=FAST, signer=CENTRAL) as engine:
        data = {"order_id": order, "customer_id": "c-9"}
        await shop_event(js, "payment_failed", data, event_id=f"pf-{order}")
        run_id = saga.run_id(f"pf-{order}")
        record = await wait_for_run(engine.kv, run_id, timeout=20)
        # The same payment_failed again: once as a duplicate JetStream drops, once as one it stores again
        # (outside its duplicate window a redelivered event looks so): no second run, nothing sent twice.
        await shop_event(js, "payment_failed", data, event_id=f"pf-{order}")
        await shop_event(js, "payment_failed", data, event_id=f"pf-{order}", msg_id=f"again-{order}")
        async with asyncio.timeout(20):
            while (await js.consumer_info(EVENTS_STREAM, f"nerve-engine-{AGENT}")).num_pending:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # let the engine take it (nothing to wait for: nothing must happen)
        again = await engine.record(run_id)
    assert record.state == "compensated"
    assert "not paid within 1s" in record.error
    assert again is not None
    assert again.updated == record.updated
    commands = [subject.rsplit(".", 1)[-1] for subject, _ in await commands_for(js, order)]
    assert commands == ["offer_alternative_payment", "release_reservation", "notify_customer"]
    notify = (await commands_for(js, order))[2][1]
    assert notify.data == {"order_id": order, "customer_id": "c-9", "message": "payment_not_recovered"}
    assert [subject.rsplit(".", 1)[-1] for subject, _ in await events_for(js, order)] == [
        "recovery_flow_initiated",
        "recovery_escalated",
    ]
    facts = await facts_for(js, order)
    assert [fact.kind for fact in facts] == [
        "recovery_flow_initiated",
        "compensated",
        "compensated",
        "escalated",
        "run_failed",
    ]
    assert [fact.data["step"] for fact in facts[1:3]] == ["offer", "initiate"]
    assert "a person must look" in facts[3].summary


async def test_a_cancelled_recovery_compensates_without_escalating(
    slow: Running, js: JetStreamContext
) -> None:
    order = new_order()
    await shop_event(js, "payment_failed", {"order_id": order}, event_id=f"pf-{order}")
    run_id = slow.run_id(f"pf-{order}")
    await at_step(slow.engine, run_id, "paid")
    await slow.engine.cancel(run_id)
    record = await wait_for_run(slow.engine.kv, run_id, timeout=20)
    assert (record.state, record.cancelled) == ("compensated", True)
    kinds = [fact.kind for fact in await facts_for(js, order)]
    assert kinds == ["recovery_flow_initiated", "compensated", "compensated", "run_cancelled"]


async def test_a_payment_failed_without_an_order_is_dead_lettered(
    slow: Running, js: JetStreamContext
) -> None:
    await shop_event(js, "payment_failed", {"amount": 12}, event_id="pf-no-order")
    async with asyncio.timeout(20):
        while not [m for m in await stream_messages(js, DEADLETTER_STREAM) if b"pf-no-order" in m.data]:
            await asyncio.sleep(0.05)
    assert await slow.engine.record(slow.run_id("pf-no-order")) is None


def test_the_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="source"):
        PaymentRecoverySettings(source="shop.*")
    assert PaymentRecoverySettings().wait_s == 3600
    for others in (("shop",), ("gw", "gw")):
        with pytest.raises(ValueError, match="is the source or named twice"):
            PaymentRecoverySettings(fallback_sources=others)
    assert PaymentRecoverySettings(fallback_sources=("gw-1", "gw-2")).fallback_sources == ("gw-1", "gw-2")


async def test_the_escalation_is_tried_again_and_never_for_a_cancelled_run() -> None:
    class Flaky(PaymentRecovery):
        calls = 0

        async def _escalate(self, _trigger: Envelope, _failure: RunFailure) -> None:
            self.calls += 1
            if self.calls == 1:
                raise TimeoutError("nats did not answer")

    saga = Flaky(cast("AgentContext", None), PaymentRecoverySettings())
    trigger = Event(source="nerve://shop", type="payment_failed", data={"order_id": "o-1"})
    failure = RunFailure(run_id="r", key="o-1", error="not paid", cancelled=False, compensated=True)
    await saga.escalate(trigger, failure)
    assert saga.calls == 2
    await saga.escalate(
        trigger, RunFailure(run_id="r", key="o-1", error="", cancelled=True, compensated=True)
    )
    assert saga.calls == 2
