"""TCP_NODELAY on every broker socket nerve opens (QoS1 round trip: 30 ms with Nagle, 0.55 ms without)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from nerve.runtime.jetstream.client import connect
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings

pytestmark = pytest.mark.broker


async def test_mqtt_socket_has_nodelay(settings: Settings) -> None:
    async with MqttClient(settings.mqtt, client_id="nodelay") as client:
        sock = client.wire._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_nats_socket_has_nodelay(settings: Settings) -> None:
    nc = await connect(settings.nats, name="nodelay")
    try:
        writer = nc._transport._io_writer  # type: ignore[union-attr]
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await nc.close()
