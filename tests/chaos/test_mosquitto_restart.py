"""mosquitto restarted (persistence on) mid-stream: the bridge reconnects and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from nerve.bridge import Bridge
from nerve.runtime.cli.history import read_stream
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.testing import wait_for_count
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttWireError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EVENTS = 3000


async def publish_through_outages(settings: Settings, events: list[Event], acked: list[str]) -> None:
    """Publish every event QoS1, reconnecting and re-sending after an outage (at least once)."""
    i = 0
    while i < len(events):
        try:
            async with MqttClient(settings.mqtt, client_id="restart-publisher", persistent=True) as client:
                while i < len(events):
                    event = events[i]
                    await client.publish(f"nerve/{event.subject}/telemetry/cpu", to_msgpack(event), qos=1)
                    acked.append(event.id)
                    i += 1
        except MqttWireError:
            await asyncio.sleep(0.2)


async def test_mosquitto_restart_mid_stream(
    settings: Settings, nc: NatsClient, mosquitto: Mosquitto, running: Running
) -> None:
    events = [
        Event(
            source="t", type="nerve.telemetry.cpu", subject=f"dev-{i % 5}", data={"value": i % 100, "seq": i}
        )
        for i in range(EVENTS)
    ]
    acked: list[str] = []
    js = nc.jetstream()
    bridge = Bridge(settings=settings)
    async with running(bridge, wait=10):
        publisher = asyncio.create_task(publish_through_outages(settings, events, acked))
        async with asyncio.timeout(30):
            while len(acked) < EVENTS // 3:
                await asyncio.sleep(0.01)
        await mosquitto.stop()  # SIGTERM: mosquitto saves its persistent sessions
        await asyncio.sleep(0.5)
        await mosquitto.start()
        async with asyncio.timeout(60):
            await publisher
        await wait_for_count(js, "NERVE_TELEMETRY", EVENTS, timeout=60)
        await asyncio.sleep(0.5)
    assert bridge.stats.reconnects >= 1
    stored = [
        decode(m.data, Event).id for m in await read_stream(js, "NERVE_TELEMETRY", "nerve.*.telemetry.*")
    ]
    assert len(stored) == len(set(stored)) == EVENTS
    assert set(acked) <= set(stored)
