"""nats-server SIGKILLed and restarted twice while the bridge drains a backlog: every event once, in order."""

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

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EVENTS = 20_000
DEVICES = 10
WAIT = 10.0
# Kill nats-server while received messages wait for their store. 100 in flight was not always reached
# on a loaded machine (a fresh-clone CI run waited 60 s for it): one store in flight is the case to test.
UNSTORED = 1


async def until_busy(bridge: Bridge, stored: int) -> None:
    """Return (on the bridge's own event loop, so exactly then) once `stored` are in and some wait.

    Also once every event is in: a bridge that caught up after the first kill has nothing in flight to
    wait for (a loaded fresh-clone run waited 60 s for it), and the kill then tests a plain restart.
    """
    stats = bridge.stats
    async with asyncio.timeout(60):
        while (stats.stored < stored or stats.received - stats.stored < UNSTORED) and stats.stored < EVENTS:
            await asyncio.sleep(0)


async def test_nats_server_killed_twice_mid_stream(
    settings: Settings, nats_server: NatsServer, nc: NatsClient, running: Running
) -> None:
    events = [
        Event(
            source="chaos",
            type="nerve.telemetry.cpu",
            subject=f"dev-{i % DEVICES}",
            data={"seq": i // DEVICES},
        )
        for i in range(EVENTS)
    ]
    # A first bridge opens its persistent session and goes; the events then wait for it in mosquitto,
    # each acknowledged to the publisher: from then on every one must reach JetStream, once.
    async with running(Bridge(settings=settings), wait=WAIT):
        pass
    async with MqttClient(settings.mqtt, client_id="chaos-publisher") as client:
        for event in events:
            await client.publish(f"nerve/{event.subject}/telemetry/cpu", to_msgpack(event), qos=1)
    bridge = Bridge(settings=settings)
    async with running(bridge, wait=WAIT):
        for fraction in (4, 2):
            await until_busy(bridge, EVENTS // fraction)
            await nats_server.kill()  # SIGKILL, with stores in flight
            await asyncio.sleep(0.5)
            await nats_server.start()
        await wait_for_count(nc.jetstream(), "NERVE_TELEMETRY", EVENTS, timeout=90)
        await asyncio.sleep(1.0)  # anything stored twice would show up now
    assert bridge.stats.reconnects >= 2
    stored = [
        decode(msg.data, Event)
        for msg in await read_stream(nc.jetstream(), "NERVE_TELEMETRY", "nerve.*.telemetry.*")
    ]
    ids = [event.id for event in stored]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events stored twice"
    assert set(ids) == {event.id for event in events}
    for device in range(DEVICES):
        seqs = [e.data["seq"] for e in stored if e.subject == f"dev-{device}"]
        assert seqs == sorted(seqs), f"dev-{device}'s events are out of order"
