"""mosquitto's packet limit is nerve's: the shipped and generated configs, and a real broker enforcing it."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nerve.runtime.config.settings import MqttSettings, load_settings
from nerve.runtime.stack.brokers import LOCALHOST, free_port, mosquitto_config, mosquitto_packet_limit
from nerve.runtime.stack.local import Stack
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import DEFAULT_MAX_PACKET_SIZE

if TYPE_CHECKING:
    from nerve.runtime.stack.brokers import Mosquitto

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WAIT = 10.0


def test_the_configs_set_the_packet_limit_nerve_accepts(tmp_path: Path) -> None:
    assert load_settings().mqtt.max_packet_size == DEFAULT_MAX_PACKET_SIZE
    line = f"max_packet_size {DEFAULT_MAX_PACKET_SIZE - 3}"  # as mosquitto counts (see below)
    assert line in mosquitto_config(port=1883, data_dir=tmp_path).splitlines()
    assert line in (CONFIGS / "mosquitto.conf").read_text().splitlines()
    assert (
        "max_packet_size 131069"
        in mosquitto_config(port=1883, data_dir=tmp_path, max_packet_size=131072).splitlines()
    )


@pytest.mark.parametrize(
    ("ours", "mosquittos"),
    [
        (4096, 4094),
        (16_385, 16_383),
        (16_386, 16_384),
        (262_144, 262_141),
        (2_097_155, 2_097_152),
        (2_097_156, 2_097_152),
        (268_435_460, 268_435_456),
    ],
)
def test_mosquittos_limit_is_ours_less_the_length_bytes(ours: int, mosquittos: int) -> None:
    assert mosquitto_packet_limit(ours) == mosquittos


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str) -> bytes:
    """MQTT v5 CONNECT: clean start, keep-alive 60 s, no properties."""
    return _packet(
        0x10, _string("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00" + _string(client_id)
    )


def publish_packet(topic: str, payload: bytes) -> bytes:
    """MQTT v5 PUBLISH at QoS0, no properties."""
    return _packet(0x30, _string(topic) + b"\x00" + payload)


def publish_of_size(topic: str, size: int) -> bytes:
    """A PUBLISH whose whole packet is `size` bytes."""
    overhead = len(publish_packet(topic, b"x" * size)) - size  # the remaining length's bytes as at `size`
    packet = publish_packet(topic, b"x" * (size - overhead))
    assert len(packet) == size
    return packet


async def raw_session(port: int, client_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    writer.write(connect_packet(client_id))
    async with asyncio.timeout(WAIT):
        connack = await reader.readexactly(2)
        await reader.readexactly(connack[1])
    assert connack[0] == 0x20
    return reader, writer


@pytest.mark.broker
async def test_mosquitto_refuses_a_packet_over_nerves_limit(mosquitto: Mosquitto) -> None:
    limit = DEFAULT_MAX_PACKET_SIZE
    async with MqttClient(MqttSettings(url=mosquitto.url), client_id="nerve-sub") as sub:
        # Announced in CONNACK, as mosquitto counts: nerve's own clients keep 3 bytes under it.
        assert sub.wire._broker_max_packet_size == mosquitto_packet_limit(limit)
        await sub.subscribe("t/#")

        reader, writer = await raw_session(mosquitto.port, "raw-big")
        writer.write(publish_of_size("t/big", limit + 1))
        rest = b"?"
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionResetError):  # mosquitto 2.0.11 resets, without a DISCONNECT
                rest = await reader.read()  # up to EOF: the broker closed the connection
        # A later mosquitto may first say why: DISCONNECT, reason 0x95 (packet too large).
        assert rest in {b"?", b"", b"\xe0\x01\x95"}, rest[:8]
        writer.close()

        reader, writer = await raw_session(mosquitto.port, "raw-fits")
        writer.write(publish_of_size("t/fits", limit))
        async with asyncio.timeout(WAIT):
            message = await anext(sub.messages)
        writer.close()
        # Only the one that fits came through, whole.
        assert message.topic == "t/fits"
        assert publish_packet("t/fits", bytes(message.payload)) == publish_of_size("t/fits", limit)


@pytest.mark.broker
async def test_nerve_up_gives_its_mosquitto_the_packet_limit_of_its_settings(tmp_path: Path) -> None:
    """`nerve up`'s own mosquitto refuses what its clients could not take, as mqtt.max_packet_size says."""
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}", "max_packet_size": 131072},
            "nats": {"url": f"nats://127.0.0.1:{free_port()}"},
            "bridge": {"max_payload": 65536},
            "edge": {"mounts": []},
            "central": {"signing_key": str(tmp_path / "keys" / "central.key")},
        }
    )
    async with Stack(settings=settings, device="pi-limit") as stack:
        assert stack.info is not None
        assert "mosquitto" in stack.info.started_brokers
        config = (tmp_path / "data" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert f"max_packet_size {mosquitto_packet_limit(131072)}" in config
