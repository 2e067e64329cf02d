"""The uplink's one subscription (`<prefix>/#`) against a real mosquitto: cheap, and still complete.

Retain Handling 2: the retained `status` of every device is not sent to the bridge at each subscribe.
The commands the downlink publishes (on its own connection, so No Local cannot keep them back) come back
up to the uplink, which acknowledges and ignores them. Both show in what the bridge received and stored.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from nerve.bridge import Bridge
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.testing import wait_for_count
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import subscribe_packet

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings

WAIT = 10.0


@pytest.mark.broker
async def test_no_retained_status_and_its_own_commands_come_back_ignored(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    command = Command.create(
        device="pi-01", action="clear_temp", args={}, source="t", ttl=timedelta(minutes=1)
    )
    async with MqttClient(settings.mqtt, client_id="pi-01") as device:
        # Retained before the bridge subscribes: mosquitto would hand it over at every subscribe.
        await device.publish("nerve/pi-01/status", b"online", retain=True)
        await device.subscribe("nerve/pi-01/commands/+")
        bridge = Bridge(settings=settings)
        async with running(bridge, wait=WAIT):
            await publish_envelope(js, "nerve.pi-01.commands.clear_temp", command)
            async with asyncio.timeout(WAIT):
                sent = await anext(device.messages)
            assert decode(sent.payload, Command) == command
            # mosquitto queued the echo of that command before it takes this reading.
            await device.publish("nerve/pi-01/telemetry/disk", b"40")
            await wait_for_count(js, "NERVE_TELEMETRY", 1)
            await asyncio.sleep(0.2)  # room for anything else on its way to the bridge
    assert bridge.stats.commands_sent == 1
    assert bridge.stats.received == 2  # the echo and the reading: not the retained status
    assert bridge.stats.stored == 1
    assert bridge.stats.deadlettered == 0


@pytest.mark.broker
async def test_a_live_status_still_reaches_the_bridge(settings: Settings, running: Running) -> None:
    """Retain Handling 2 holds back only what was retained before the subscribe."""
    bridge = Bridge(settings=settings)
    async with running(bridge, wait=WAIT), MqttClient(settings.mqtt, client_id="pi-02") as device:
        await device.publish("nerve/pi-02/status", b"online", retain=True)
        async with asyncio.timeout(WAIT):
            while bridge.stats.received < 1:
                await asyncio.sleep(0.02)
    assert bridge.stats.received == 1
    assert bridge.stats.stored == bridge.stats.deadlettered == 0  # presence: acknowledged and ignored


def test_subscribe_options_byte() -> None:
    """QoS 1 | No Local (bit 2) | Retain Handling 2 (bits 4-5), after each filter."""
    packet = subscribe_packet(7, ["a/#", "b"], no_local=True, retain_handling=2)
    assert packet.endswith(b"\x00\x03a/#\x25\x00\x01b\x25")
    assert subscribe_packet(7, ["a/#"]).endswith(b"\x00\x03a/#\x01")


@pytest.mark.broker
async def test_no_local_on_a_shared_subscription_is_refused_before_it_is_sent(settings: Settings) -> None:
    async with MqttClient(settings.mqtt, client_id="sharer") as client:
        with pytest.raises(ValueError, match="shared subscription"):
            await client.wire.subscribe(["$share/g/nerve/#"], no_local=True)
        with pytest.raises(ValueError, match="retain_handling"):
            await client.wire.subscribe(["nerve/#"], retain_handling=3)  # type: ignore[arg-type]
        # The connection is still good for a subscription that is allowed.
        await client.wire.subscribe(["$share/g/nerve/#"], retain_handling=2)
