"""Uplink throughput: QoS1 events published to MQTT -> messages stored in JetStream, per second.

One run, side by side, each on fresh brokers (mosquitto, nats-server) on free ports in a temp dir:

  (a) `<venv>/bin/nerve bridge --mqtt-url ... --nats-url ... --log-level warning`, run as a user would;
  (b) `bench/naive_bridge.py`, the baseline: paho-mqtt callbacks + one awaited JetStream publish at a time;
  (c) no bridge: nats-server's own MQTT listener, with nerve's streams capturing the mapped subjects;
  (r) `nerve bridge` again, draining a backlog of raw readings (`12.345`, what `mosquitto_pub -l` sends):
      the bridge subscribes once (creating its persistent session), is stopped, `--count-raw` readings are
      queued in mosquitto for it, and the clock runs from the bridge's restart until all are stored. This is
      the bridge alone, with no publisher competing for the cores; every raw reading is wrapped into an
      Event (fresh id), and the read-back checks each value arrived exactly once.

The events are nerve `Event`s in msgpack (~200 bytes), ids `<run>-<index>`, spread over 10 devices, on
`nerve/bench-dev-NN/telemetry/cpu`, QoS1. For each case the bridge is started, a warm-up event is
published (again, until it shows up in NERVE_EVENTS) so the bridge is known to be subscribed, then the
publisher sends all events and the clock runs from its first publish until NERVE_TELEMETRY holds them all
(`stream_info` polled every 50 ms). After (a) and (b) every stored `Nats-Msg-Id` is read back and checked
against the published ids: each exactly once, nothing dead-lettered.

The publisher must not be what is measured: it runs in its own process, builds every MQTT PUBLISH packet
before the clock starts and writes them down a plain socket with up to 1000 unacknowledged (paho-mqtt
tops out near 13k msgs/s on this machine and would take a core the bridge needs). Its own rate, into a
mosquitto with no subscriber, is printed as the ceiling of the test. `--publisher paho` cross-checks
with paho-mqtt instead. `--profile FILE` samples the nerve bridge with py-spy during (a) or (r) and
prints where its time goes (py-spy takes CPU too: don't quote a profiled run's rates).

    .venv/bin/python bench/bridge_throughput.py [--count 50000] [--count-b N] [--count-raw 60000]
                                                [--only a|b|c|r]

Targets (issue 8), each printed beside (c), nats-server's own MQTT ingest, measured in the same run:
(a) enveloped events >= 45,000 msgs/s; (r) raw readings >= 30,000 msgs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

import nats
import paho.mqtt.client as mqtt
from nats.js.errors import NotFoundError
from paho.mqtt.enums import CallbackAPIVersion

from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM, STREAM_OF_KIND, ensure_streams
from nerve.runtime.stack.brokers import LOCALHOST, Mosquitto, NatsServer, find_nats_server, free_port
from nerve.runtime.subjects import DEFAULT_PREFIX, Kind
from nerve.runtime.wire.mqtt import packet, utf8

if TYPE_CHECKING:
    from nats.js import JetStreamContext

DEFAULT_COUNT: Final = 50_000
DEFAULT_RAW_COUNT: Final = 60_000
DEVICES: Final = 10
TARGET_RATE: Final = 45_000.0  # (a), enveloped events
TARGET_RAW_RATE: Final = 30_000.0  # (r), raw readings from a backlog
TARGET_RATIO: Final = 4.0  # (a) against (b)
POLL_S: Final = 0.05
WINDOW: Final = 1000  # unacknowledged PUBLISHes the publisher allows itself
BATCH: Final = 256  # PUBLISH packets per socket write
READY_TIMEOUT_S: Final = 60.0
STALL_TIMEOUT_S: Final = 30.0  # no new stored message for this long: the case has failed
STOP_TIMEOUT_S: Final = 30.0
READ_BACK_TIMEOUT_S: Final = 120.0
TELEMETRY: Final = STREAM_OF_KIND[Kind.TELEMETRY]
EVENTS: Final = STREAM_OF_KIND[Kind.EVENTS]
WARMUP_DEVICE: Final = "bench-warmup"
SOURCE: Final = "bench://bridge-throughput"
BIN: Final = Path(sys.executable).parent
NAIVE_BRIDGE: Final = Path(__file__).with_name("naive_bridge.py")
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
TOP_FUNCTIONS: Final = 20
LOG_TAIL_LINES: Final = 20

# --- the events -------------------------------------------------------------------------------------


def event_id(run: str, index: int) -> str:
    return f"{run}-{index:08d}"


def topic_of(index: int) -> str:
    return f"{DEFAULT_PREFIX}/bench-dev-{index % DEVICES:02d}/telemetry/cpu"


def event_body(run: str, index: int) -> bytes:
    event = Event(
        id=event_id(run, index),
        source=SOURCE,
        type="nerve.telemetry.cpu",
        subject=f"bench-dev-{index % DEVICES:02d}",
        data={"value": (index * 37) % 1000 / 10, "unit": "percent", "seq": index},
    )
    return to_msgpack(event)


def raw_body(index: int) -> bytes:
    """A raw reading as a person types it, unique per index below 100,000 (cpu is 0-100)."""
    return f"{(index % 100_000) / 1000:.3f}".encode()


def raw_index(value: float) -> int:
    return round(value * 1000)


def warmup_body(attempt: int) -> bytes:
    event = Event(source=SOURCE, type="nerve.event.warmup", subject=WARMUP_DEVICE, data={"attempt": attempt})
    return to_msgpack(event)


# --- MQTT 3.1.1 on the wire, for a publisher that costs next to nothing per message -----------------
# (nats-server's MQTT listener speaks 3.1.1 only, so every case uses it.)

PUBACK: Final = 0x40
PUBACK_SIZE: Final = 4
CONNACK_OK: Final = b"\x20\x02\x00\x00"
DISCONNECT: Final = b"\xe0\x00"
MAX_PACKET_ID: Final = 0xFFFF


# The primitives (remaining length, length-prefixed strings, framing) are the same in 3.1.1 and 5:
# they come from nerve's own client; the packets are 3.1.1's, without v5's properties.


def connect_packet(client_id: str, *, keepalive_s: int = 60) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session."""
    return packet(0x10, utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive_s) + utf8(client_id))


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS1."""
    return packet(0x32, utf8(topic) + struct.pack("!H", packet_id) + payload)


def packet_id_of(index: int) -> int:
    # With fewer than 65535 in flight and PUBACKs in order, an id is free again when it comes round.
    return index % MAX_PACKET_ID + 1


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def raw_connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection((LOCALHOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id))
    connack = _recv_exactly(sock, len(CONNACK_OK))
    if connack != CONNACK_OK:
        raise ConnectionError(f"CONNACK {connack.hex()}")
    return sock


def raw_publish_all(sock: socket.socket, packets: list[bytes], window: int) -> None:
    """Send every packet, keeping at most `window` unacknowledged; return when all are PUBACKed."""
    total, sent, acked = len(packets), 0, 0
    pending = b""
    while acked < total:
        flags = 0
        if sent < total and sent - acked < window:
            batch = min(total - sent, window - (sent - acked), BATCH)
            sock.sendall(b"".join(packets[sent : sent + batch]))
            sent += batch
            flags = socket.MSG_DONTWAIT  # read what has arrived, then go on sending
        try:
            data = sock.recv(65536, flags)
        except BlockingIOError:
            continue
        if not data:
            raise ConnectionError(f"the broker closed the connection after {acked} PUBACKs")
        pending += data
        whole = len(pending) // PUBACK_SIZE * PUBACK_SIZE
        if pending[0:whole:PUBACK_SIZE] != bytes([PUBACK]) * (whole // PUBACK_SIZE):
            raise ConnectionError(f"expected only PUBACKs, got {pending[:16].hex()}")
        acked += whole // PUBACK_SIZE
        pending = pending[whole:]
    sock.sendall(DISCONNECT)


def paho_publish_all(port: int, client_id: str, items: list[tuple[str, bytes]], window: int) -> float:
    """The same with paho-mqtt (network loop on its own thread); return when the first publish began."""
    done = threading.Event()
    acked = 0

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(items):
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(LOCALHOST, port)
    client.loop_start()
    try:
        began = time.monotonic()
        for topic, payload in items:
            client.publish(topic, payload, qos=1)
        if not done.wait(timeout=READ_BACK_TIMEOUT_S):
            raise TimeoutError(f"paho: {acked} of {len(items)} PUBACKs")
    finally:
        client.disconnect()
        client.loop_stop()
    return began


def publish_worker(spec: dict[str, int | str]) -> int:
    """A publisher process: build, connect, say `ready`, wait for `go`, send all, print the timing."""
    port, first, count = int(spec["port"]), int(spec["first"]), int(spec["count"])
    run, kind = str(spec["run"]), str(spec["client"])
    indices = range(first, first + count)
    body = raw_body if spec.get("payload") == "raw" else (lambda i: event_body(run, i))
    items = [(topic_of(i), body(i)) for i in indices]
    client_id = f"bench-pub-{run}-{first}"
    if kind == "raw":
        packets = [
            publish_packet(topic, body, packet_id_of(i))
            for i, (topic, body) in zip(indices, items, strict=True)
        ]
        with raw_connect(port, client_id) as sock:
            print("ready", flush=True)
            sys.stdin.readline()
            cpu = time.process_time()
            began = time.monotonic()
            raw_publish_all(sock, packets, WINDOW)
    else:
        # paho connects when it starts: that is inside the timed part, a millisecond of it.
        print("ready", flush=True)
        sys.stdin.readline()
        cpu = time.process_time()
        began = paho_publish_all(port, client_id, items, WINDOW)
    done = time.monotonic()
    result = {"began": began, "done": done, "count": count, "cpu": time.process_time() - cpu}
    print(json.dumps(result), flush=True)
    return 0


# --- processes --------------------------------------------------------------------------------------


def _pipes(process: asyncio.subprocess.Process) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    if process.stdin is None or process.stdout is None:
        raise RuntimeError("no pipes to the publisher")
    return process.stdin, process.stdout


@dataclass(frozen=True, slots=True)
class Published:
    began: float  # time.monotonic() of the first PUBLISH (CLOCK_MONOTONIC: the same clock in every process)
    done: float  # ... of the last PUBACK
    cpu_s: float

    @property
    def seconds(self) -> float:
        return self.done - self.began


async def _ready(process: asyncio.subprocess.Process) -> None:
    line = await _pipes(process)[1].readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"publisher exited before it was ready ({line!r})")


class Publishers:
    """`--publishers` processes sharing the events; ready (connected, packets built) once started."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self._processes = processes

    @classmethod
    async def start(
        cls, *, port: int, run: str, count: int, args: argparse.Namespace, payload: str = "envelope"
    ) -> Publishers:
        share, extra = divmod(count, args.publishers)
        processes: list[asyncio.subprocess.Process] = []
        first = 0
        for n in range(args.publishers):
            mine = share + (1 if n < extra else 0)
            spec = {
                "port": port,
                "run": run,
                "first": first,
                "count": mine,
                "client": args.publisher,
                "payload": payload,
            }
            first += mine
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--publish-worker",
                    json.dumps(spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        publishers = cls(processes)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                for process in processes:
                    await _ready(process)
        except BaseException:
            publishers.kill()
            raise
        return publishers

    def go(self) -> None:
        for process in self._processes:
            _pipes(process)[0].write(b"go\n")

    async def results(self) -> Published:
        outcomes = []
        async with asyncio.timeout(READ_BACK_TIMEOUT_S):
            for process in self._processes:
                line = await _pipes(process)[1].readline()
                if not line:
                    raise RuntimeError(f"publisher exited with {await process.wait()} before it finished")
                outcomes.append(json.loads(line))
                await process.wait()
        return Published(
            began=min(o["began"] for o in outcomes),
            done=max(o["done"] for o in outcomes),
            cpu_s=sum(o["cpu"] for o in outcomes),
        )

    def kill(self) -> None:
        for process in self._processes:
            if process.returncode is None:
                process.kill()


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process, from /proc (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def clean_env() -> dict[str, str]:
    # A user's NERVE_* settings must not change what the bridge does here.
    return {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}


async def spawn(argv: list[str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            # The bridge's data dir (its id file) beside its log, not the working directory's .nerve.
            env={**clean_env(), "NERVE_DATA_DIR": str(log.parent / "nerve-data")},
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


class NatsWithMqtt(NatsServer):
    """A nats-server with JetStream and an MQTT listener, both on 127.0.0.1, from a config file."""

    def __init__(self, *, port: int, mqtt_port: int, data_dir: Path) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.mqtt_port = mqtt_port

    def _prepare(self) -> list[str]:
        config = self.data_dir / "nats-server.conf"
        config.write_text(
            f"""\
# Written by bench/bridge_throughput.py: case (c), nats-server's own MQTT listener.
server_name: bench_mqtt
listen: {LOCALHOST}:{self.port}
jetstream {{
  store_dir: "{self.store_dir}"
}}
mqtt {{
  listen: {LOCALHOST}:{self.mqtt_port}
}}
"""
        )
        return [str(find_nats_server()), "--config", str(config)]


# --- JetStream side ---------------------------------------------------------------------------------


async def stored(js: JetStreamContext, stream: str) -> int:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return 0
    return info.state.messages or 0


async def publish_one(port: int, topic: str, payload: bytes) -> None:
    """One QoS1 PUBLISH on a connection of its own, returning after the PUBACK."""
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        async with asyncio.timeout(5):
            writer.write(connect_packet(f"bench-warmup-{uuid.uuid4().hex[:8]}"))
            if await reader.readexactly(len(CONNACK_OK)) != CONNACK_OK:
                raise ConnectionError("CONNACK refused")
            writer.write(publish_packet(topic, payload, 1))
            await reader.readexactly(PUBACK_SIZE)
            writer.write(DISCONNECT)
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def until_subscribed(
    js: JetStreamContext, mqtt_port: int, bridge: asyncio.subprocess.Process | None
) -> None:
    """Publish warm-up events until one is in NERVE_EVENTS (earlier ones may predate the subscription)."""
    topic = f"{DEFAULT_PREFIX}/{WARMUP_DEVICE}/events/warmup"
    async with asyncio.timeout(READY_TIMEOUT_S):
        for attempt in range(sys.maxsize):
            if bridge is not None and bridge.returncode is not None:
                raise RuntimeError(f"the bridge exited with {bridge.returncode} before it was ready")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                await publish_one(mqtt_port, topic, warmup_body(attempt))
            for _ in range(10):
                if await stored(js, EVENTS) > 0:
                    return
                await asyncio.sleep(POLL_S)


async def until_stored(
    js: JetStreamContext, count: int, watched: asyncio.subprocess.Process | None
) -> tuple[float, int]:
    """Poll NERVE_TELEMETRY until it holds `count`; return when, and how many (fewer if it stalled)."""
    last, progress_at = -1, time.monotonic()
    while True:
        now = await stored(js, TELEMETRY)
        moment = time.monotonic()
        if now >= count:
            return moment, now
        if now != last:
            last, progress_at = now, moment
        elif moment - progress_at > STALL_TIMEOUT_S or (
            watched is not None and watched.returncode is not None
        ):
            return progress_at, now
        await asyncio.sleep(POLL_S)


async def stored_ids(js: JetStreamContext, total: int) -> list[str]:
    """Every Nats-Msg-Id in NERVE_TELEMETRY, in stream order (ordered consumer, headers only)."""
    sub = await js.subscribe(f"{DEFAULT_PREFIX}.*.telemetry.>", ordered_consumer=True, headers_only=True)
    ids: list[str] = []
    try:
        async with asyncio.timeout(READ_BACK_TIMEOUT_S):
            async for msg in sub.messages:
                ids.append((msg.headers or {}).get(MSG_ID_HEADER, ""))
                if len(ids) >= total:
                    break
    finally:
        await sub.unsubscribe()
    return ids


async def stored_raw_indices(js: JetStreamContext, total: int) -> list[int]:
    """The index of every raw reading in NERVE_TELEMETRY, read back from the stored Events' values."""
    sub = await js.subscribe(f"{DEFAULT_PREFIX}.*.telemetry.>", ordered_consumer=True)
    indices: list[int] = []
    try:
        async with asyncio.timeout(READ_BACK_TIMEOUT_S):
            async for msg in sub.messages:
                indices.append(raw_index(decode(msg.data, Event).data["value"]))
                if len(indices) >= total:
                    break
    finally:
        await sub.unsubscribe()
    return indices


def index_problems(indices: list[int], count: int) -> list[str]:
    seen = collections.Counter(indices)
    problems = []
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    missing = count - len(seen.keys() & set(range(count)))
    if duplicated:
        problems.append(f"{duplicated} readings stored twice (raw payloads are at-least-once)")
    if missing:
        problems.append(f"{missing} readings missing")
    return problems


def id_problems(ids: list[str], run: str, count: int) -> list[str]:
    expected = {event_id(run, i) for i in range(count)}
    seen = collections.Counter(ids)
    problems = []
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    missing = len(expected - seen.keys())
    foreign = len(seen.keys() - expected)
    if duplicated:
        problems.append(f"{duplicated} duplicates")
    if missing:
        problems.append(f"{missing} ids missing")
    if foreign:
        problems.append(f"{foreign} unexpected ids")
    return problems


# --- profiling --------------------------------------------------------------------------------------

_FRAME: Final = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['function']} ({path})"


def _plumbing(frame: str) -> bool:
    # The event loop and the entry point are under every sample: they would fill the "total" list.
    return frame.startswith(("<module> ", "main (")) or "(asyncio/" in frame or "(selectors" in frame


def top_functions(collapsed: Path) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) stacks: total samples, top functions by own and by total time."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            if not _plumbing(frame):
                inclusive[frame] += int(n)
    return total, own.most_common(TOP_FUNCTIONS), inclusive.most_common(TOP_FUNCTIONS)


async def finish_profiler(profiler: asyncio.subprocess.Process | None) -> None:
    """Stop sampling (SIGINT: py-spy then writes its collapsed stacks)."""
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await profiler.wait()


async def kill_profiler(profiler: asyncio.subprocess.Process | None) -> None:
    """On the way out: a profiler still running (the case failed before it was finished) is killed."""
    if profiler is not None and profiler.returncode is None:
        profiler.kill()
        await profiler.wait()


async def start_profiler(pid: int, output: Path) -> asyncio.subprocess.Process:
    py_spy = BIN / "py-spy"
    return await asyncio.create_subprocess_exec(
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "200",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def print_profile(output: Path) -> None:
    total, own, inclusive = top_functions(output)
    print(f"\nwhere nerve bridge spends its time (py-spy, {total} samples of busy threads, {output}):")
    print("  own time (the function itself):")
    for name, n in own:
        print(f"    {n / total:6.1%}  {name}")
    print("  total time (the function and what it calls; the event loop and entry point left out):")
    for name, n in inclusive:
        print(f"    {n / total:6.1%}  {name}")


# --- the cases --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    label: str
    count: int
    stored: int = 0
    seconds: float = 0.0
    publish_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked: str = ""

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.stored >= self.count


LABELS: Final = {
    "publisher": "publisher alone (PUBACKs, no subscriber)",
    "a": "(a) nerve bridge",
    "b": "(b) naive bridge (paho + serial publish)",
    "c": "(c) nats-server MQTT -> stream",
    "r": "(r) nerve bridge, raw readings, backlog",
}


async def publisher_alone(tmp: Path, run: str, args: argparse.Namespace) -> Outcome:
    outcome = Outcome(LABELS["publisher"], args.count)
    async with Mosquitto(port=free_port(), data_dir=tmp / "publisher" / "mosquitto") as mosquitto:
        publishers = await Publishers.start(port=mosquitto.port, run=run, count=args.count, args=args)
        before = cpu_seconds(mosquitto.pid)
        publishers.go()
        published = await publishers.results()
        outcome.cpu = {"mosquitto": cpu_seconds(mosquitto.pid) - before, "publisher": published.cpu_s}
    outcome.stored, outcome.seconds, outcome.publish_s = args.count, published.seconds, published.seconds
    return outcome


async def bridge_case(key: str, tmp: Path, run: str, count: int, args: argparse.Namespace) -> Outcome:
    """(a) or (b): fresh mosquitto and nats-server, the bridge as a process of its own, then measure."""
    outcome = Outcome(LABELS[key], count)
    data = tmp / key
    async with (
        Mosquitto(port=free_port(), data_dir=data / "mosquitto") as mosquitto,
        NatsServer(port=free_port(), data_dir=data / "nats") as nats_server,
    ):
        if key == "a":
            argv = bridge_argv(mosquitto, nats_server)
        else:
            argv = [sys.executable, str(NAIVE_BRIDGE), "--mqtt-port", str(mosquitto.port)]
            argv += ["--nats-port", str(nats_server.port)]
        log = data / "bridge.log"
        bridge = await spawn(argv, log)
        nc = await nats.connect(nats_server.url)
        profiler = None
        try:
            js = nc.jetstream()
            await until_subscribed(js, mosquitto.port, bridge)
            publishers = await Publishers.start(port=mosquitto.port, run=run, count=count, args=args)
            if key == "a" and args.profile is not None:
                profiler = await start_profiler(bridge.pid, args.profile)
            pids = {"bridge": bridge.pid, "mosquitto": mosquitto.pid, "nats-server": nats_server.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            publishers.go()
            stored_at, outcome.stored = await until_stored(js, count, bridge)
            outcome.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            await finish_profiler(profiler)
            published = await publishers.results()
            outcome.cpu["publisher"] = published.cpu_s
            outcome.seconds, outcome.publish_s = stored_at - published.began, published.seconds
            if bridge.returncode is not None:
                outcome.problems.append(f"the bridge exited with {bridge.returncode}:\n{log_tail(log)}")
            await verify(js, outcome, run)
        finally:
            await nc.close()
            await stop(bridge)
            await kill_profiler(profiler)
    if profiler is not None:
        print_profile(args.profile)
    return outcome


def bridge_argv(mosquitto: Mosquitto, nats_server: NatsServer) -> list[str]:
    argv = [str(BIN / "nerve"), "bridge", "--mqtt-url", mosquitto.url, "--nats-url", nats_server.url]
    return [*argv, "--log-level", "warning"]


async def raw_backlog_case(tmp: Path, run: str, args: argparse.Namespace) -> Outcome:
    """(r): the bridge drains `--count-raw` raw readings queued in its persistent session while away."""
    count = args.count_raw
    outcome = Outcome(LABELS["r"], count)
    data = tmp / "r"
    async with (
        Mosquitto(port=free_port(), data_dir=data / "mosquitto") as mosquitto,
        NatsServer(port=free_port(), data_dir=data / "nats") as nats_server,
    ):
        log = data / "bridge.log"
        nc = await nats.connect(nats_server.url)
        bridge = await spawn(bridge_argv(mosquitto, nats_server), log)
        profiler = None
        try:
            js = nc.jetstream()
            await until_subscribed(js, mosquitto.port, bridge)
            await stop(bridge)  # its session (and subscription) stays in mosquitto: the backlog queues there
            publishers = await Publishers.start(
                port=mosquitto.port, run=run, count=count, args=args, payload="raw"
            )
            publishers.go()
            published = await publishers.results()
            outcome.publish_s = published.seconds
            began = time.monotonic()
            bridge = await spawn(bridge_argv(mosquitto, nats_server), log)
            if args.profile is not None:
                profiler = await start_profiler(bridge.pid, args.profile)
            pids = {"bridge": bridge.pid, "mosquitto": mosquitto.pid, "nats-server": nats_server.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            stored_at, outcome.stored = await until_stored(js, count, bridge)
            outcome.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            await finish_profiler(profiler)
            outcome.seconds = stored_at - began
            if bridge.returncode is not None:
                outcome.problems.append(f"the bridge exited with {bridge.returncode}:\n{log_tail(log)}")
            if not outcome.complete:
                outcome.problems.append(f"stalled: stored {outcome.stored} of {count}")
            indices = await stored_raw_indices(js, outcome.stored)
            outcome.problems += index_problems(indices, count)
            deadletters = await stored(js, DEADLETTER_STREAM)
            if deadletters:
                outcome.problems.append(f"{deadletters} dead letters")
            outcome.checked = (
                f"read back {len(indices)} stored values, compared with the {count} published; "
                f"{deadletters} dead letters"
            )
        finally:
            await nc.close()
            await stop(bridge)
            await kill_profiler(profiler)
    if profiler is not None:
        print_profile(args.profile)
    return outcome


async def verify(js: JetStreamContext, outcome: Outcome, run: str) -> None:
    """Read back every stored Nats-Msg-Id: each published id exactly once, and no dead letter."""
    if not outcome.complete:
        outcome.problems.append(f"stalled: stored {outcome.stored} of {outcome.count}")
    ids = await stored_ids(js, outcome.stored)
    outcome.problems += id_problems(ids, run, outcome.count)
    deadletters = await stored(js, DEADLETTER_STREAM)
    if deadletters:
        outcome.problems.append(f"{deadletters} dead letters")
    outcome.checked = (
        f"read back {len(ids)} Nats-Msg-Ids, compared with the {outcome.count} published; "
        f"{deadletters} dead letters"
    )


async def nats_mqtt_case(tmp: Path, run: str, args: argparse.Namespace) -> Outcome:
    """(c): the publisher writes to nats-server's MQTT port; NERVE_TELEMETRY captures nerve.*.telemetry.>."""
    outcome = Outcome(LABELS["c"], args.count)
    server = NatsWithMqtt(port=free_port(), mqtt_port=free_port(), data_dir=tmp / "c" / "nats")
    async with server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js, DEFAULT_PREFIX)  # the same streams, as nerve bridge creates them
            await until_subscribed(js, server.mqtt_port, None)
            publishers = await Publishers.start(port=server.mqtt_port, run=run, count=args.count, args=args)
            before = cpu_seconds(server.pid)
            publishers.go()
            stored_at, outcome.stored = await until_stored(js, args.count, None)
            outcome.cpu = {"nats-server": cpu_seconds(server.pid) - before}
            published = await publishers.results()
            outcome.cpu["publisher"] = published.cpu_s
            outcome.seconds, outcome.publish_s = stored_at - published.began, published.seconds
            if not outcome.complete:
                outcome.problems.append(f"stalled: stored {outcome.stored} of {args.count}")
            outcome.checked = "count only (nats-server sets no Nats-Msg-Id, so nothing is deduplicated)"
        finally:
            await nc.close()
    return outcome


# --- report -----------------------------------------------------------------------------------------


def row(outcome: Outcome) -> str:
    flag = "" if outcome.complete else "  INCOMPLETE"
    return f"{outcome.label:<42} {outcome.stored:>7} {outcome.seconds:>8.2f} {outcome.rate:>10,.0f}{flag}"


def cpu_line(outcome: Outcome) -> str:
    if outcome.seconds <= 0:
        return ""
    parts = [f"{name} {s:.1f}s ({s / outcome.seconds:.0%})" for name, s in outcome.cpu.items()]
    return f"{'':<4}cpu in the window: {', '.join(parts)}; publisher done after {outcome.publish_s:.2f}s"


def verdict(name: str, *, ok: bool, detail: str) -> str:
    return f"target {name}: {'PASS' if ok else 'FAIL'} ({detail})"


def table(outcomes: dict[str, Outcome], args: argparse.Namespace, body_size: int) -> None:
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores; python "
        f"{sys.version.split()[0]}; publisher: {args.publisher} x{args.publishers}, window {WINDOW}"
    )
    print(
        f"events: {body_size}-byte msgpack Events, QoS1, {DEVICES} devices, "
        f"{DEFAULT_PREFIX}/bench-dev-NN/telemetry/cpu"
    )
    if args.profile is not None:
        print("(a) ran under py-spy: its rate is lower than an unprofiled run's")
    print()
    print(f"{'case':<42} {'events':>7} {'seconds':>8} {'msgs/s':>10}")
    for outcome in outcomes.values():
        print(row(outcome))
        print(cpu_line(outcome))
    b = outcomes.get("b")
    if b is not None and b.count != args.count:
        print(f"(b) ran on {b.count} events (--count-b), not {args.count}: rates are per second either way")
    print()
    for key, outcome in outcomes.items():
        if outcome.checked:
            print(f"checks {key}: {outcome.checked}: {'OK' if not outcome.problems else 'PROBLEMS'}")
        for problem in outcome.problems:
            print(f"  problem in {key}: {problem}")


def verdicts(outcomes: dict[str, Outcome]) -> int:
    """Print the ratios and the issue's targets; 0 if every target passed."""
    a, b, c, r = outcomes.get("a"), outcomes.get("b"), outcomes.get("c"), outcomes.get("r")
    if a is not None and b is not None and b.rate:
        print(f"a/b = {a.rate / b.rate:.2f}")
    for key, case in (("a", a), ("r", r)):
        if case is not None and c is not None and c.rate:
            print(f"{key}/c = {case.rate / c.rate:.2f} (nats-server's own MQTT ingest here: {c.rate:,.0f}/s)")
    passed: list[bool] = []
    if r is not None:
        passed.append(r.rate >= TARGET_RAW_RATE and r.complete and not r.problems)
        detail = f"{r.rate:,.0f} msgs/s" + (f"; {'; '.join(r.problems)}" if r.problems else "")
        print(verdict(f"(r) raw readings >= {TARGET_RAW_RATE:,.0f} msgs/s", ok=passed[-1], detail=detail))
    if a is None:
        return 0 if all(passed) else 1
    passed.append(a.rate >= TARGET_RATE and a.complete)
    print(verdict(f"(a) >= {TARGET_RATE:,.0f} msgs/s", ok=passed[-1], detail=f"{a.rate:,.0f} msgs/s"))
    if b is not None and b.rate:
        passed.append(a.rate >= TARGET_RATIO * b.rate)
        print(verdict(f"(a) >= {TARGET_RATIO:g}x (b)", ok=passed[-1], detail=f"{a.rate / b.rate:.2f}x"))
    passed.append(not a.problems)
    print(
        verdict(
            "(a) stores every event exactly once", ok=passed[-1], detail="; ".join(a.problems) or "checked"
        )
    )
    return 0 if all(passed) else 1


async def main(args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:12]
    cases = [args.only] if args.only else ["a", "r", "b", "c"]
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="nerve-bench-") as name:
        tmp = Path(name)
        print(f"publisher alone: {args.count} events ...", flush=True)
        outcomes["publisher"] = await publisher_alone(tmp, run, args)
        for key in cases:
            count = args.count_b if key == "b" and args.count_b else args.count
            count = args.count_raw if key == "r" else count
            print(f"{LABELS[key]}: {count} events ...", flush=True)
            if key == "c":
                outcomes[key] = await nats_mqtt_case(tmp, run, args)
            elif key == "r":
                outcomes[key] = await raw_backlog_case(tmp, run, args)
            else:
                outcomes[key] = await bridge_case(key, tmp, run, count, args)
    table(outcomes, args, len(event_body(run, 0)))
    return verdicts(outcomes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="events per case (default 50000)")
    parser.add_argument("--count-b", type=int, default=0, help="events for (b) only (default: --count)")
    parser.add_argument("--count-raw", type=int, default=DEFAULT_RAW_COUNT, help="raw readings for (r)")
    parser.add_argument("--only", choices=["a", "b", "c", "r"], help="run one case (and the publisher alone)")
    parser.add_argument("--publisher", choices=["raw", "paho"], default="raw", help="default: raw")
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes (default 1)")
    parser.add_argument("--profile", type=Path, help="py-spy (a)'s bridge; write collapsed stacks here")
    parser.add_argument("--publish-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile is not None and not (BIN / "py-spy").exists():
        parser.error(f"--profile needs py-spy in this venv: {BIN / 'pip'} install py-spy")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.publish_worker:
        sys.exit(publish_worker(json.loads(arguments.publish_worker)))
    sys.exit(asyncio.run(main(arguments)))
