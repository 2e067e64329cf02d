"""The payment saga as `nerve up` runs it by default: the shop's events come in with `mosquitto_pub`.

The whole stack on its own brokers (mosquitto, nats-server with an identity per part): the bridge
carries the shop's events into JetStream, central's engine runs the saga as central's NATS identity,
and what it did is read back as the cli identity.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from nerve.agents import builtin_durable_agents
from nerve.agents.payment import AGENT
from nerve.runtime.central.runner import DurableAgentFactory
from nerve.runtime.config.settings import load_settings
from nerve.runtime.engine import wait_for_run
from nerve.runtime.engine.runs import runs_bucket
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, Event, Fact, derived_id
from nerve.runtime.errors import ConfigError
from nerve.runtime.jetstream.client import connect
from nerve.runtime.jetstream.identities import Identity, seed_path
from nerve.runtime.stack.brokers import free_port
from nerve.runtime.stack.local import Stack
from nerve.runtime.testing import stream_messages

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.engine import RunRecord

pytestmark = pytest.mark.broker


class Up:
    """`nerve up` running, the MQTT port the shop publishes to, and a cli connection to read with."""

    def __init__(self, stack: Stack, mqtt_port: int, cli: NatsClient, data_dir: Path) -> None:
        self.stack = stack
        self.mqtt_port = mqtt_port
        self.js = cli.jetstream()
        self.data_dir = data_dir

    async def shop(self, event_type: str, data: dict[str, Any], *, event_id: str) -> None:
        """The shop publishes a structured CloudEvent with `mosquitto_pub` (QoS 1)."""
        mosquitto_pub = shutil.which("mosquitto_pub")
        if mosquitto_pub is None:
            pytest.fail("mosquitto_pub is not installed (make setup installs mosquitto-clients)")
        document = {
            "specversion": "1.0",
            "id": event_id,
            "source": "https://shop.example/payments",
            "type": event_type,
            "datacontenttype": "application/json",
            "data": data,
        }
        process = await asyncio.create_subprocess_exec(
            mosquitto_pub,
            *("-p", str(self.mqtt_port), "-q", "1", "-t", f"nerve/shop/events/{event_type}"),
            *("-m", json.dumps(document)),
        )
        assert await process.wait() == 0

    async def run(self, event_id: str, *, timeout: float = 30) -> RunRecord:
        """The run the `payment_failed` with id `event_id` started, once it ended."""
        kv = await runs_bucket(self.js)
        return await wait_for_run(kv, derived_id(AGENT, "run", event_id), timeout=timeout)

    async def commands(self, order: str) -> list[str]:
        found = [decode(m.data, Command) for m in await stream_messages(self.js, "NERVE_COMMANDS")]
        return [command.action for command in found if command.data.get("order_id") == order]

    async def events(self, order: str) -> list[str]:
        found = [decode(m.data, Event) for m in await stream_messages(self.js, "NERVE_EVENTS")]
        return [
            event.type
            for event in found
            if isinstance(event.data, dict)
            and event.data.get("order_id") == order
            and event.source.startswith("nerve://central/")
        ]

    async def facts(self, order: str, event_id: str) -> list[Fact]:
        """The facts about `order`, or about the run `event_id` started."""
        run_id = derived_id(AGENT, "run", event_id)
        facts = [decode(m.data, Fact) for m in await stream_messages(self.js, "NERVE_FACTS")]
        return [
            fact
            for fact in facts
            if order in {fact.subject, fact.data.get("order_id")} or fact.data.get("run") == run_id
        ]


def up_settings(tmp_path: Path, *, wait_s: float) -> tuple[Settings, int]:
    mqtt_port, nats_port = free_port(), free_port()
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
            "nats": {"url": f"nats://127.0.0.1:{nats_port}"},
            "edge": {"mounts": []},
            "central": {"signing_key": str(tmp_path / "keys" / "central.key"), "payment": {"wait_s": wait_s}},
        }
    )
    return settings, mqtt_port


async def nerve_up(tmp_path: Path, *, wait_s: float) -> AsyncIterator[Up]:
    settings, mqtt_port = up_settings(tmp_path, wait_s=wait_s)
    async with Stack(settings=settings, device="pi-pay") as stack:
        cli = await connect(stack.settings.nats, name="test-cli")
        try:
            yield Up(stack, mqtt_port, cli, tmp_path / "data")
        finally:
            await cli.close()


@pytest.fixture
async def patient(tmp_path: Path) -> AsyncIterator[Up]:
    """`nerve up` with an hour to pay (the default), nothing else configured."""
    async for up in nerve_up(tmp_path, wait_s=3600):
        yield up


@pytest.fixture
async def hasty(tmp_path: Path) -> AsyncIterator[Up]:
    """`nerve up` with a second to pay."""
    async for up in nerve_up(tmp_path, wait_s=1):
        yield up


def new_order() -> str:
    return f"o-{uuid.uuid4().hex[:10]}"


async def test_nerve_up_recovers_an_order_paid_after_the_offer(patient: Up) -> None:
    order = new_order()
    failed = f"pf-{order}"
    await patient.shop("payment_failed", {"order_id": order, "customer_id": "c-1"}, event_id=failed)
    await patient.shop(
        "payment_succeeded", {"order_id": order, "method": "bank_transfer"}, event_id=f"ps-{order}"
    )
    record = await patient.run(failed)
    assert (record.state, record.key) == ("done", order)
    assert record.result["outcome"] == "recovered"
    assert record.result["payment_event"] == f"ps-{order}"
    assert await patient.commands(order) == ["offer_alternative_payment"]
    assert await patient.events(order) == ["recovery_flow_initiated", "recovery_flow_completed"]
    kinds = [fact.kind for fact in await patient.facts(order, failed)]
    assert kinds == ["recovery_flow_initiated", "payment_recovered"]


async def test_nerve_up_compensates_an_unpaid_order_once_however_often_it_failed(hasty: Up) -> None:
    order = new_order()
    failed = f"pf-{order}"
    data = {"order_id": order, "customer_id": "c-2"}
    await hasty.shop("payment_failed", data, event_id=failed)
    await hasty.shop("payment_failed", data, event_id=failed)  # the same event again: JetStream keeps it once
    first = await hasty.run(failed)
    # ... and stored again under another message id (as a redelivery outside the dedup window looks).
    bridge_settings = hasty.stack.settings.model_copy(
        update={
            "nats": hasty.stack.settings.nats.model_copy(
                update={"nkey_file": seed_path(hasty.data_dir / "nats", Identity.BRIDGE)}
            )
        }
    )
    bridge = await connect(bridge_settings.nats, name="test-bridge")
    try:
        document = {
            "specversion": "1.0",
            "id": failed,
            "source": "https://shop.example",
            "type": "payment_failed",
        }
        await bridge.jetstream().publish(
            "nerve.shop.events.payment_failed",
            json.dumps({**document, "data": data}).encode(),
            headers={"Nats-Msg-Id": f"again-{order}", "Content-Type": "application/cloudevents+json"},
        )
        async with asyncio.timeout(30):  # until the engine took it (it starts nothing)
            while True:
                info = await hasty.js.consumer_info("NERVE_EVENTS", f"nerve-engine-{AGENT}")
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.05)
    finally:
        await bridge.close()
    after = await hasty.run(failed)
    stored = [decode(m.data, Event) for m in await stream_messages(hasty.js, "NERVE_EVENTS")]
    assert [event.id for event in stored if event.type == "payment_failed"] == [
        failed,
        failed,
    ]  # twice, not 3
    assert first.state == "compensated"
    assert "not paid within 1s" in first.error
    assert after.updated == first.updated  # nothing happened to the run since
    assert await hasty.commands(order) == [
        "offer_alternative_payment",
        "release_reservation",
        "notify_customer",
    ]
    assert await hasty.events(order) == ["recovery_flow_initiated", "recovery_escalated"]
    kinds = [fact.kind for fact in await hasty.facts(order, failed)]
    assert kinds == ["recovery_flow_initiated", "compensated", "compensated", "escalated", "run_failed"]


def test_central_runs_both_built_in_durable_agents_by_default_and_a_setting_chooses(tmp_path: Path) -> None:
    settings, _ = up_settings(tmp_path, wait_s=60)
    agents = builtin_durable_agents(settings)
    assert [agent.name for agent in agents] == ["disk", "payment_recovery"]
    assert isinstance(agents[1], DurableAgentFactory)  # built once central is connected
    only_disk = settings.model_copy(
        update={"central": settings.central.model_copy(update={"durable_agents": ("disk",)})}
    )
    assert [agent.name for agent in builtin_durable_agents(only_disk)] == ["disk"]
    none = load_settings(overrides={"central": {"durable_agents": []}})
    assert builtin_durable_agents(none) == []
    for names, why in (
        (["disk", "refunds"], "'refunds' is no built-in durable agent"),
        (["disk", "disk"], "named twice"),
    ):
        with pytest.raises(ConfigError, match=why) as refused:
            builtin_durable_agents(load_settings(overrides={"central": {"durable_agents": names}}))
        assert "central.durable_agents" in str(refused.value)
