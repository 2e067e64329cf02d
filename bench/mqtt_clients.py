"""MQTT clients side by side: how fast each receives and acknowledges QoS1 messages from mosquitto.

This is the part of the bridge's job the MQTT client does (no JetStream). For every case, on a fresh
mosquitto (nerve's config, a free port on 127.0.0.1, a temp dir):

  1. the subscriber, a process of its own, connects with a persistent session (MQTT v5, clean start
     false, session expiry 1 h), subscribes to `nerve/+/telemetry/#` at QoS1, and disconnects;
  2. bridge_throughput.py's raw publisher puts N 199-byte QoS1 events into that queued session;
  3. the subscriber reconnects, and the clock runs from its connect until it has received all N and
     acknowledged each (from its message handler: manual ack where the client has it, to model
     ack-after-store). Its CPU seconds in that window come from `time.process_time()` (all threads);
     mosquitto's are counted from the reconnect until it is idle again (it may still be reading
     PUBACKs when the subscriber is done);
  4. then the session is taken over once more: anything mosquitto redelivers was not acknowledged.

Cases: paho-mqtt (own network thread, `manual_ack_set` + `ack`), aiomqtt (paho under asyncio, with
paho's manual acknowledgement, as nerve's bridge once used it), gmqtt (asyncio; PUBACK when its async
`on_message` returns) and nerve's own `nerve.runtime.wire.mqtt` (PUBACKs per batch in `on_messages`).
Each asks mosquitto for a Receive Maximum (how many unacknowledged messages it may send): 65535, the
most MQTT v5 allows, except mqttwire at 1000, as the bridge runs it; `--receive-maximum` sets one for
all. Without the property mosquitto would use its `max_inflight_messages`, 20. (mosquitto 2.0.11 holds
to the window only for the first burst of a resumed session: measured here, every PUBACK after it
lets up to a whole window more through, so the window hardly changes these figures.)

    .venv/bin/python bench/mqtt_clients.py [--count 50000] [--only paho|aiomqtt|gmqtt|mqttwire]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
import gmqtt  # type: ignore[import-untyped]
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.stack.brokers import LOCALHOST, Mosquitto, free_port
from nerve.runtime.wire.mqtt import Incoming, MqttWire, open_mqtt

if TYPE_CHECKING:
    from bench import bridge_throughput as bt  # how mypy, run from the repo root, sees it
else:
    import bridge_throughput as bt  # next to this script, which is how python runs it

DEFAULT_COUNT: Final = 50_000
TOPIC_FILTER: Final = "nerve/+/telemetry/#"
SESSION_EXPIRY_S: Final = 3600
KEEPALIVE_S: Final = 60
MAX_RECEIVE_MAXIMUM: Final = 65535
BRIDGE_RECEIVE_MAXIMUM: Final = 1000  # the bridge's default max_in_flight
CONNECT_TIMEOUT_S: Final = 10.0
RECEIVE_TIMEOUT_S: Final = 60.0  # a case that has not received everything by then is reported as such
WORKER_TIMEOUT_S: Final = RECEIVE_TIMEOUT_S + 30.0
SETTLE_S: Final = 0.1  # after the clock stops: let the last PUBACKs leave before DISCONNECT
QUIET_S: Final = 0.5  # the redelivery check ends after this long without a message
IDLE_POLL_S: Final = 0.2  # mosquitto is idle when its CPU time (10 ms ticks) stands still this long
IDLE_TIMEOUT_S: Final = 30.0
PUBLISHER: Final = argparse.Namespace(publisher="raw", publishers=1)  # what bt.Publishers reads
# Nagle's algorithm holds small QoS1 packets back (a round trip through mosquitto: 30 ms with it, 0.55
# without); nerve's client gets TCP_NODELAY from asyncio, aiomqtt needs it asked for.
NODELAY: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

CASES: Final = {
    "paho": "paho-mqtt (network thread)",
    "aiomqtt": "aiomqtt (asyncio)",
    "gmqtt": "gmqtt (asyncio)",
    "mqttwire": "nerve mqttwire (asyncio)",
}
DISTRIBUTIONS: Final = {
    "paho": "paho-mqtt",
    "aiomqtt": "aiomqtt",
    "gmqtt": "gmqtt",
    "mqttwire": "nerve-bridge",
}


@dataclass(frozen=True, slots=True)
class Spec:
    """What a subscriber worker does: which client, where, how many, which window."""

    client: str
    port: int
    count: int
    client_id: str
    receive_maximum: int


@dataclass(frozen=True, slots=True)
class Received:
    """A subscriber worker's result (its clock and its CPU)."""

    received: int
    seconds: float
    cpu_s: float


class Tally:
    """Counts what the handler acknowledged; notes the moment the last of `count` was."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.received = 0
        self.began = time.monotonic()
        self.cpu = time.process_time()
        self.done_at = 0.0

    def start(self) -> None:
        self.began, self.cpu = time.monotonic(), time.process_time()

    def add(self, n: int) -> bool:
        """Count `n` acknowledged messages; True when that made it all of them (once)."""
        self.received += n
        if self.received >= self.count and not self.done_at:
            self.done_at = time.monotonic()
            return True
        return False

    def result(self) -> Received:
        cpu = time.process_time() - self.cpu
        end = self.done_at or time.monotonic()
        return Received(received=self.received, seconds=end - self.began, cpu_s=cpu)


# --- paho-mqtt: callbacks on paho's own network thread ----------------------------------------------


def _nodelay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's SocketLike
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _paho_client(spec: Spec) -> tuple[mqtt.Client, Properties]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=spec.client_id, protocol=mqtt.MQTTv5)
    client.manual_ack_set(on=True)
    client.on_socket_open = _nodelay
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    properties.ReceiveMaximum = spec.receive_maximum
    return client, properties


def _wait(event: threading.Event, timeout_s: float, what: str) -> None:
    if not event.wait(timeout_s):
        raise TimeoutError(f"paho: no {what} within {timeout_s:.0f}s")


def paho_subscribe(spec: Spec) -> None:
    client, properties = _paho_client(spec)
    connected, subscribed = threading.Event(), threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(LOCALHOST, spec.port, KEEPALIVE_S, clean_start=False, properties=properties)
    client.loop_start()
    try:
        _wait(connected, CONNECT_TIMEOUT_S, "CONNACK")
        client.subscribe(TOPIC_FILTER, qos=1)
        _wait(subscribed, CONNECT_TIMEOUT_S, "SUBACK")
    finally:
        client.disconnect()
        client.loop_stop()


def paho_receive(spec: Spec) -> Received:
    client, properties = _paho_client(spec)
    tally = Tally(spec.count)
    done = threading.Event()

    def on_message(client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        client.ack(message.mid, message.qos)
        if tally.add(1):
            done.set()

    client.on_message = on_message
    tally.start()
    client.connect(LOCALHOST, spec.port, KEEPALIVE_S, clean_start=False, properties=properties)
    client.loop_start()
    try:
        done.wait(RECEIVE_TIMEOUT_S)
        result = tally.result()
        time.sleep(SETTLE_S)
    finally:
        client.disconnect()
        client.loop_stop()
    return result


# --- aiomqtt: paho driven by the event loop ---------------------------------------------------------


def _aiomqtt_client(spec: Spec) -> aiomqtt.Client:
    # As nerve's bridge used it before its own client: a persistent session, manual acknowledgement,
    # TCP_NODELAY, plus the Receive Maximum.
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    properties.ReceiveMaximum = spec.receive_maximum
    client = aiomqtt.Client(
        LOCALHOST,
        spec.port,
        identifier=spec.client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        keepalive=KEEPALIVE_S,
        timeout=CONNECT_TIMEOUT_S,
        socket_options=NODELAY,
    )
    client._client.manual_ack_set(on=True)  # noqa: SLF001 - aiomqtt has no public switch for it
    return client


async def aiomqtt_subscribe(spec: Spec) -> None:
    async with _aiomqtt_client(spec) as client:
        await client.subscribe(TOPIC_FILTER, qos=1)


async def aiomqtt_receive(spec: Spec) -> Received:
    client = _aiomqtt_client(spec)
    tally = Tally(spec.count)
    tally.start()
    async with client:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECEIVE_TIMEOUT_S):
                async for message in client.messages:
                    client._client.ack(message.mid, message.qos)  # noqa: SLF001 - manual ack, as above
                    if tally.add(1):
                        break
        result = tally.result()
        await asyncio.sleep(SETTLE_S)
    return result


# --- gmqtt: asyncio; with optimistic_acknowledgement off, PUBACK when on_message returns -------------


def _gmqtt_client(spec: Spec) -> Any:  # noqa: ANN401 - gmqtt has no types
    return gmqtt.Client(
        spec.client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=SESSION_EXPIRY_S,
        receive_maximum=spec.receive_maximum,
    )


async def gmqtt_subscribe(spec: Spec) -> None:
    client = _gmqtt_client(spec)
    subscribed = asyncio.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    await client.connect(LOCALHOST, spec.port, keepalive=KEEPALIVE_S, version=gmqtt.constants.MQTTv50)
    try:
        client.subscribe(TOPIC_FILTER, qos=1)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await subscribed.wait()
    finally:
        await client.disconnect()


async def gmqtt_receive(spec: Spec) -> Received:
    client = _gmqtt_client(spec)
    tally = Tally(spec.count)
    done = asyncio.Event()

    # gmqtt sends the PUBACK from the done-callback of this coroutine's task; it never acknowledges
    # for a plain function when optimistic acknowledgement is off.
    async def on_message(*_args: object) -> int:
        if tally.add(1):
            done.set()
        return 0  # PUBACK reason: success

    client.on_message = on_message
    tally.start()
    await client.connect(LOCALHOST, spec.port, keepalive=KEEPALIVE_S, version=gmqtt.constants.MQTTv50)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECEIVE_TIMEOUT_S):
                await done.wait()
        result = tally.result()
        await asyncio.sleep(SETTLE_S)
    finally:
        await client.disconnect()
    return result


# --- nerve's mqttwire: one Protocol, a batch per socket read, PUBACKs per batch ---------------------


class WireAcker:
    """`on_messages` for open_mqtt: PUBACK every batch (held until open_mqtt has returned the wire)."""

    def __init__(self, tally: Tally | None) -> None:
        self.tally = tally
        self.done = asyncio.Event()
        self.wire: MqttWire | None = None
        self.early: list[int] = []  # PUBLISHes that came with the CONNACK, before we had the wire
        self.seen = 0

    def on_messages(self, batch: list[Incoming]) -> None:
        ids = [m.packet_id for m in batch]
        if self.wire is None:
            self.early += ids
        else:
            self.wire.puback(ids)
        self.seen += len(ids)
        if self.tally is not None and self.tally.add(len(ids)):
            self.done.set()

    def attach(self, wire: MqttWire) -> None:
        self.wire = wire
        wire.puback(self.early)
        self.early = []


async def open_wire(spec: Spec, acker: WireAcker, *, session_expiry_s: int = SESSION_EXPIRY_S) -> MqttWire:
    wire = await open_mqtt(
        MqttSettings(url=f"mqtt://{LOCALHOST}:{spec.port}", keepalive_s=KEEPALIVE_S),
        client_id=spec.client_id,
        on_messages=acker.on_messages,
        clean_start=False,
        session_expiry_s=session_expiry_s,
        receive_maximum=spec.receive_maximum,
        timeout_s=CONNECT_TIMEOUT_S,
    )
    acker.attach(wire)
    return wire


async def mqttwire_subscribe(spec: Spec) -> None:
    wire = await open_wire(spec, WireAcker(None))
    try:
        await wire.subscribe([TOPIC_FILTER])
    finally:
        wire.close()


async def mqttwire_receive(spec: Spec) -> Received:
    tally = Tally(spec.count)
    acker = WireAcker(tally)
    tally.start()
    wire = await open_wire(spec, acker)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECEIVE_TIMEOUT_S):
                await acker.done.wait()
        result = tally.result()
        await asyncio.sleep(SETTLE_S)
    finally:
        wire.close()
    return result


# --- the subscriber worker process ------------------------------------------------------------------


def subscriber_worker(spec: Spec) -> int:
    """Subscribe (persistent session) and disconnect, say `subscribed`, wait for `go`, receive, report."""
    if spec.client == "paho":
        paho_subscribe(spec)
    else:
        subscribe = {"aiomqtt": aiomqtt_subscribe, "gmqtt": gmqtt_subscribe, "mqttwire": mqttwire_subscribe}
        asyncio.run(subscribe[spec.client](spec))
    print("subscribed", flush=True)
    sys.stdin.readline()
    if spec.client == "paho":
        result = paho_receive(spec)
    else:
        receive = {"aiomqtt": aiomqtt_receive, "gmqtt": gmqtt_receive, "mqttwire": mqttwire_receive}
        result = asyncio.run(receive[spec.client](spec))
    print(json.dumps(asdict(result)), flush=True)
    return 0


# --- the cases --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    key: str
    window: int
    count: int
    received: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    mosquitto_cpu_s: float = 0.0
    publish_s: float = 0.0
    redelivered: int = 0

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.received == self.count and not self.redelivered


async def _line(stream: asyncio.StreamReader, what: str) -> bytes:
    async with asyncio.timeout(WORKER_TIMEOUT_S):
        line = await stream.readline()
    if not line:
        raise RuntimeError(f"the subscriber worker exited before it {what}")
    return line


async def until_idle(pid: int | None) -> float:
    """Wait until mosquitto has worked off what it was sent (its CPU time stands still); return that."""
    used = bt.cpu_seconds(pid)
    async with asyncio.timeout(IDLE_TIMEOUT_S):
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            now = bt.cpu_seconds(pid)
            if now == used:
                return now
            used = now


async def redelivered(spec: Spec) -> int:
    """Take the session over once more: whatever mosquitto still sends was never acknowledged."""
    acker = WireAcker(None)
    wire = await open_wire(spec, acker, session_expiry_s=0)  # (the session ends with this connection)
    try:
        last = -1
        while acker.seen != last:
            last = acker.seen
            await asyncio.sleep(QUIET_S)
    finally:
        wire.close()
    return acker.seen


async def run_case(key: str, tmp: Path, run: str, args: argparse.Namespace) -> Outcome:
    window = args.receive_maximum or (BRIDGE_RECEIVE_MAXIMUM if key == "mqttwire" else MAX_RECEIVE_MAXIMUM)
    outcome = Outcome(key, window, args.count)
    async with Mosquitto(port=free_port(), data_dir=tmp / key / "mosquitto") as mosquitto:
        spec = Spec(key, mosquitto.port, args.count, f"bench-sub-{key}-{run}", window)
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--subscriber-worker",
            json.dumps(asdict(spec)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        stdin, stdout = worker.stdin, worker.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("no pipes to the subscriber worker")
        try:
            await _line(stdout, "subscribed")
            publishers = await bt.Publishers.start(
                port=mosquitto.port, run=run, count=args.count, args=PUBLISHER
            )
            publishers.go()
            outcome.publish_s = (await publishers.results()).seconds
            before = bt.cpu_seconds(mosquitto.pid)
            stdin.write(b"go\n")
            result = Received(**json.loads(await _line(stdout, "reported")))
            await worker.wait()
            outcome.mosquitto_cpu_s = await until_idle(mosquitto.pid) - before
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        outcome.received, outcome.seconds, outcome.cpu_s = result.received, result.seconds, result.cpu_s
        outcome.redelivered = await redelivered(spec)
    return outcome


# --- report -----------------------------------------------------------------------------------------


def label(key: str) -> str:
    return f"{CASES[key]} {version(DISTRIBUTIONS[key])}"


def table(outcomes: list[Outcome], body_size: int) -> None:
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {len(outcomes)} cases; python {sys.version.split()[0]}; "
        f"{body_size}-byte QoS1 messages queued in a persistent session, then received + PUBACKed"
    )
    print()
    header = f"{'client':<36} {'window':>6} {'received':>9} {'seconds':>8} {'msgs/s':>9} {'sub cpu':>12}"
    print(f"{header} {'mosquitto cpu':>14} {'redelivered':>12}")
    for o in outcomes:
        share = o.cpu_s / o.seconds if o.seconds > 0 else 0.0
        flag = "" if o.ok else "  PROBLEM"
        print(
            f"{label(o.key):<36} {o.window:>6} {o.received:>9} {o.seconds:>8.2f} {o.rate:>9,.0f} "
            f"{o.cpu_s:>6.2f}s ({share:>3.0%}) {o.mosquitto_cpu_s:>13.2f}s {o.redelivered:>12}{flag}"
        )
    queued = ", ".join(f"{o.publish_s:.2f}" for o in outcomes)
    print(f"(publisher: {outcomes[0].count} queued in {queued} s; the clock starts at the reconnect)")
    ranking = sorted(outcomes, key=lambda o: o.rate, reverse=True)
    print("ranking: " + " > ".join(f"{o.key} {o.rate:,.0f}/s" for o in ranking))


async def main(args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:12]
    keys = [args.only] if args.only else list(CASES)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="nerve-bench-") as name:
        for key in keys:
            print(f"{label(key)}: {args.count} messages ...", flush=True)
            outcomes.append(await run_case(key, Path(name), run, args))
    table(outcomes, len(bt.event_body(run, 0)))
    return 0 if all(o.ok for o in outcomes) else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="messages per case (default 50000)")
    parser.add_argument("--only", choices=list(CASES), help="run one client")
    parser.add_argument(
        "--receive-maximum",
        type=int,
        default=0,
        help="one Receive Maximum for every client (default: 65535, mqttwire 1000)",
    )
    parser.add_argument("--subscriber-worker", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.subscriber_worker:
        sys.exit(subscriber_worker(Spec(**json.loads(arguments.subscriber_worker))))
    sys.exit(asyncio.run(main(arguments)))
