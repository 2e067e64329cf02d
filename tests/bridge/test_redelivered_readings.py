"""Raw readings mosquitto sends again after the uplink's connection dropped are stored once (issue 11).

A real mosquitto and nats-server; the bridge reaches mosquitto through a TCP proxy the test can cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from nerve.bridge import Bridge
from nerve.runtime.config.settings import load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Event
from nerve.runtime.stack.brokers import free_port
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

pytestmark = pytest.mark.broker

WAIT = 30.0  # generous: the box under a full suite can be slow; a wait, not a timing assertion


@contextlib.asynccontextmanager
async def tcp_proxy(port: int) -> AsyncIterator[tuple[int, Callable[[], None]]]:
    """A proxy to 127.0.0.1:`port`: (its port, `cut`, which aborts every connection it carries)."""
    transports: list[asyncio.WriteTransport] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        transports.extend([writer.transport, up_writer.transport])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut() -> None:
        for transport in transports:
            transport.abort()
        transports.clear()

    server = await asyncio.start_server(serve, "127.0.0.1", free_port())
    try:
        yield server.sockets[0].getsockname()[1], cut
    finally:
        cut()
        server.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"never: {what}")


async def test_readings_stored_before_a_lost_connection_are_not_stored_again(
    mosquitto: Mosquitto, nats_server: NatsServer, nc: NatsClient, running: Running, tmp_path: Path
) -> None:
    """Stored, not yet PUBACKed, connection cut: mosquitto sends them again (DUP), JetStream keeps one each.

    nats-server is held (SIGSTOP) while the bridge reads the readings and sends their stores, then the
    bridge's MQTT connection is cut; released, nats-server stores what the old connection sent, and the
    bridge's next session gets the same readings again. Every value is published twice on one topic:
    identical payloads are two readings, and both are kept.
    """
    values = range(20)
    async with tcp_proxy(mosquitto.port) as (proxy_port, cut):
        settings = load_settings(
            overrides={
                "mqtt": {"url": f"mqtt://127.0.0.1:{proxy_port}"},
                "nats": {"url": nats_server.url},
                "data_dir": str(tmp_path / "data"),
            }
        )
        bridge = Bridge(settings=settings)
        async with (
            running(bridge, wait=WAIT),
            MqttClient(settings.mqtt.model_copy(update={"url": mosquitto.url}), client_id="pub") as pub,
        ):
            assert nats_server.pid is not None
            os.kill(nats_server.pid, signal.SIGSTOP)
            try:
                for value in values:
                    for _ in range(2):
                        await pub.publish("nerve/pi-01/telemetry/cpu", b'{"value": %d}' % value, qos=1)
                await until(lambda: bridge.stats.received >= 2 * len(values), "the bridge read them all")
                cut()
                await until(lambda: bridge.stats.reconnects >= 1, "the uplink noticed the cut")
            finally:
                os.kill(nats_server.pid, signal.SIGCONT)
            js = nc.jetstream()
            await wait_for_count(js, "NERVE_TELEMETRY", 2 * len(values), timeout=WAIT)
            # Each reading came twice (the session before the cut, the one after) under one id.
            await until(lambda: bridge.stats.duplicates >= 2 * len(values), "every redelivery deduplicated")
            await until(lambda: bridge.stats.in_flight == 0, "everything acknowledged")
    messages = await stream_messages(js, "NERVE_TELEMETRY")
    stored = Counter(decode(m.data, Event).data["value"] for m in messages)
    assert stored == Counter(dict.fromkeys(values, 2))
    assert len({m.headers["Nats-Msg-Id"] for m in messages if m.headers}) == 2 * len(values)
