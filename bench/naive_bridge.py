"""A naive MQTT -> JetStream bridge: the baseline `bridge_throughput.py` measures `nerve bridge` against.

What a first attempt looks like, with the same delivery guarantee as nerve's uplink: paho-mqtt's callback
API (a persistent MQTT v5 session, `manual_ack=True`) receives on paho's network thread and hands each
message to an asyncio loop with `call_soon_threadsafe` into an `asyncio.Queue`; one task stores each
message in JetStream, awaiting every publish in turn (the event id, read from the msgpack envelope, goes
in `Nats-Msg-Id`), and only then sends the PUBACK (`client.ack(mid, qos)`). It creates nerve's streams
like the real bridge does. No validation, no dead-lettering, no reconnect handling: a reference, not a
product. SIGTERM or Ctrl-C stops it.

    .venv/bin/python bench/naive_bridge.py --mqtt-port P --nats-port Q
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, Final

import msgpack
import nats
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nerve.bridge import uplink_filters
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import LOCALHOST
from nerve.runtime.subjects import DEFAULT_PREFIX

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

CLIENT_ID: Final = "naive-bridge"
SESSION_EXPIRY_S: Final = 3600
STORE_TIMEOUT_S: Final = 5.0


def _nodelay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's SocketLike
    # Without it, Nagle's algorithm holds each small PUBACK back until the previous segment is
    # acknowledged (30 ms round trips here): the baseline would measure Nagle, not the design.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def run(mqtt_port: int, nats_port: int) -> None:
    """Bridge until cancelled."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
    nc = await nats.connect(f"nats://{LOCALHOST}:{nats_port}", name=CLIENT_ID)
    js = nc.jetstream()
    await ensure_streams(js, DEFAULT_PREFIX)

    def on_connect(
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            print(f"naive bridge: mqtt refused: {reason}", file=sys.stderr)
            return
        client.subscribe([(topic, 1) for topic in uplink_filters(DEFAULT_PREFIX)])

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, message)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=CLIENT_ID,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    client.on_socket_open = _nodelay
    client.on_connect = on_connect
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    client.connect(LOCALHOST, mqtt_port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        while True:
            message = await queue.get()
            payload = bytes(message.payload)
            document = msgpack.unpackb(payload)
            await js.publish(
                message.topic.replace("/", "."),
                payload,
                timeout=STORE_TIMEOUT_S,
                headers={MSG_ID_HEADER: str(document["id"])},
            )
            client.ack(message.mid, message.qos)
    finally:
        client.disconnect()
        client.loop_stop()
        await nc.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqtt-port", type=int, required=True, help="mosquitto on 127.0.0.1")
    parser.add_argument("--nats-port", type=int, required=True, help="nats-server (JetStream) on 127.0.0.1")
    args = parser.parse_args()
    task = asyncio.ensure_future(run(args.mqtt_port, args.nats_port))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
