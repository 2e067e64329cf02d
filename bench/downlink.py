"""Commands first: a command's way from JetStream to its device, with and without a reading backlog.

Four cases, each on fresh brokers (mosquitto and nats-server on free ports, a temp dir), each with
`nerve bridge` run as a user runs it:

- `new, idle` / `new, backlog`: this tree's bridge (the downlink on its own MQTT connection, pipelined);
- `old, idle` / `old, backlog`: the bridge of git revision `--baseline` (default: the one before the
  downlink had its own connection), its `bridge/src` extracted with `git archive` and put first on
  PYTHONPATH; the rest of nerve is this tree's.

A case: the bridge starts, a warm-up command reaches the device and a warm-up reading is stored (the
uplink holds its subscription). For `backlog`, the bridge is stopped
(SIGTERM), `--readings` raw QoS1 readings are published into its persistent session, and the bridge is
started again; once JetStream holds its first reading (it is draining the backlog), `--commands`
commands are stored in NERVE_COMMANDS, one every `--gap-ms`, each for another device. Each command's
latency runs from just before it is stored (as central sends it) to its arrival at the subscribed
device. Printed: p50 / p99 / max, how many commands never arrived (within 60 s), how many JetStream
redelivered, and how many readings were still not stored when the last command arrived.

    .venv/bin/python bench/downlink.py [--readings 60000] [--commands 20] [--gap-ms 20]   # ~1-2 min

Targets (issue 11): with a backlog, the new path's p99 <= 50 ms and every command arrives while readings
are still pending.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Final

import nats

from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, free_port
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.js import JetStreamContext

ROOT: Final = Path(__file__).resolve().parents[1]
NERVE: Final = str(Path(sys.executable).parent / "nerve")
DEFAULT_BASELINE: Final = "24d6a94"  # the last revision with the downlink on the uplink's connection
TARGET_P99_MS: Final = 50.0
WAIT_S: Final = 60.0
PUBLISH_WINDOW: Final = 20  # mosquitto's Receive Maximum for our publisher
BRIDGE_ID: Final = "bench-bridge"


@dataclass
class Case:
    """What one case measured."""

    name: str
    latencies_ms: list[float]
    missing: int
    redelivered: int
    pending_readings: int | None


def baseline_tree(revision: str, into: Path) -> Path:
    """`bridge/src` of `revision`, extracted under `into`: what goes first on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "bridge/src"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "bridge" / "src"


async def start_bridge(
    mqtt_url: str, nats_url: str, pythonpath: Path | None, data_dir: Path
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}
    env["NERVE_DATA_DIR"] = str(data_dir)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["NERVE_BRIDGE__CLIENT_ID"] = BRIDGE_ID
    return await asyncio.create_subprocess_exec(
        NERVE,
        "bridge",
        "--mqtt-url",
        mqtt_url,
        "--nats-url",
        nats_url,
        "--log-level",
        "error",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
    )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()


def command_for(device: str) -> Command:
    return Command.create(
        device=device, action="clear_temp", args={}, source="bench", ttl=timedelta(minutes=5)
    )


async def publish_readings(mqtt: MqttSettings, count: int) -> None:
    """`count` raw QoS1 readings on 100 devices, `PUBLISH_WINDOW` unacknowledged at a time."""
    async with MqttClient(mqtt, client_id="bench-sensors") as sensors:
        for start in range(0, count, PUBLISH_WINDOW):
            await asyncio.gather(
                *(
                    sensors.publish(f"nerve/sensor-{i % 100}/telemetry/disk", str(i % 100).encode())
                    for i in range(start, min(count, start + PUBLISH_WINDOW))
                )
            )


class Devices:
    """Every command's first arrival at the devices (one client subscribed to every device's commands)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.expected: set[str] = set()
        self.all_in = asyncio.Event()
        self.warm = asyncio.Event()

    async def receive(self, devices: MqttClient) -> None:
        async for message in devices.messages:
            command = decode(message.payload, Command)
            self.arrivals.setdefault(command.id, time.perf_counter())
            if command.subject == "warmup":
                self.warm.set()
            if self.expected and self.expected <= self.arrivals.keys():
                self.all_in.set()


async def telemetry_stored(js: JetStreamContext) -> int:
    return int((await js.stream_info("NERVE_TELEMETRY")).state.messages)


async def until_stored(js: JetStreamContext, count: int) -> None:
    """Until JetStream holds more than `count` readings (polling another process's progress)."""
    async with asyncio.timeout(WAIT_S):
        while await telemetry_stored(js) <= count:  # noqa: ASYNC110 - polling another process's progress
            await asyncio.sleep(0.005)


async def until_uplink_subscribed(js: JetStreamContext, mqtt: MqttSettings) -> int:
    """Until a warm-up reading is stored (the bridge's uplink holds its subscription); how many are stored.

    The downlink connects first (a warm-up command can arrive while the uplink is still connecting): a
    bridge stopped before its uplink ever subscribed leaves no session to queue the backlog in. A warm-up
    reading published before that subscription reaches nobody, so one goes every half second.
    """
    async with MqttClient(mqtt, client_id="bench-warmup") as warmup, asyncio.timeout(WAIT_S):
        while True:
            await warmup.publish("nerve/warmup/telemetry/disk", b"1")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await until_stored(js, 0)
                    return await telemetry_stored(js)


async def send_commands(js: JetStreamContext, args: argparse.Namespace, seen: Devices) -> dict[str, float]:
    """Store `--commands` commands, `--gap-ms` apart; when each was sent (just before it was stored)."""
    commands = [command_for(f"dev-{i:03d}") for i in range(args.commands)]
    seen.expected.update(c.id for c in commands)
    sent: dict[str, float] = {}
    for command in commands:
        sent[command.id] = time.perf_counter()
        await publish_envelope(js, f"nerve.{command.subject}.commands.clear_temp", command)
        await asyncio.sleep(args.gap_ms / 1000)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WAIT_S):
            await seen.all_in.wait()
    return sent


async def run_case(name: str, args: argparse.Namespace, *, backlog: bool, pythonpath: Path | None) -> Case:
    with tempfile.TemporaryDirectory(prefix="nerve-bench-downlink-") as tmp:
        async with (
            Mosquitto(port=free_port(), data_dir=Path(tmp) / "mosquitto") as mosquitto,
            NatsServer(port=free_port(), data_dir=Path(tmp) / "nats") as nats_server,
        ):
            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            await ensure_streams(js, "nerve")
            mqtt = MqttSettings(url=mosquitto.url)
            bridge = await start_bridge(mosquitto.url, nats_server.url, pythonpath, Path(tmp) / "bridge-data")
            seen = Devices()
            pending: int | None = None
            try:
                async with (
                    MqttClient(mqtt, client_id="bench-devices") as devices,
                    asyncio.TaskGroup() as tasks,
                ):
                    await devices.subscribe("nerve/+/commands/+")
                    receiver = tasks.create_task(seen.receive(devices), name="bench-receive")
                    await publish_envelope(js, "nerve.warmup.commands.clear_temp", command_for("warmup"))
                    async with asyncio.timeout(WAIT_S):
                        await seen.warm.wait()
                    warm = await until_uplink_subscribed(js, mqtt)
                    if backlog:
                        await stop(bridge)
                        await publish_readings(mqtt, args.readings)
                        bridge = await start_bridge(
                            mosquitto.url, nats_server.url, pythonpath, Path(tmp) / "bridge-data"
                        )
                        await until_stored(js, warm)  # the first reading of the backlog: draining it
                    sent = await send_commands(js, args, seen)
                    if backlog:
                        pending = max(0, args.readings + warm - await telemetry_stored(js))
                    receiver.cancel()
                consumer = await js.consumer_info("NERVE_COMMANDS", "nerve-bridge-downlink")
            finally:
                await stop(bridge)
                await nc.close()
    latencies = [(seen.arrivals[i] - sent[i]) * 1000 for i in sent if i in seen.arrivals]
    return Case(
        name=name,
        latencies_ms=latencies,
        missing=len(sent) - len(latencies),
        redelivered=consumer.num_redelivered,
        pending_readings=pending,
    )


def at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def show(case: Case, args: argparse.Namespace) -> str:
    ordered = sorted(case.latencies_ms)
    pending = (
        f"   readings still pending at the last command: {case.pending_readings:,} of {args.readings:,}"
        if case.pending_readings is not None
        else ""
    )
    mean = statistics.fmean(ordered) if ordered else float("nan")
    return (
        f"{case.name:<14} n={len(ordered):<3} p50 {at(ordered, 0.5):8.1f} ms"
        f"   p99 {at(ordered, 0.99):8.1f} ms   max {at(ordered, 1.0):8.1f} ms   mean {mean:8.1f} ms"
        f"   missing {case.missing}"
        f"   redelivered {case.redelivered}{pending}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=60_000)
    parser.add_argument("--commands", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old bridge")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="nerve-bench-baseline-") as tmp:
        old = None if args.skip_baseline else baseline_tree(args.baseline, Path(tmp))
        plan: list[tuple[str, bool, Path | None]] = [
            ("new, idle", False, None),
            ("new, backlog", True, None),
        ]
        if old is not None:
            plan += [("old, idle", False, old), ("old, backlog", True, old)]
        for name, backlog, pythonpath in plan:
            case = await run_case(name, args, backlog=backlog, pythonpath=pythonpath)
            print(show(case, args), flush=True)
            cases.append(case)
    new_backlog = cases[1]
    p99 = at(sorted(new_backlog.latencies_ms), 0.99)
    verdicts = [
        (f"new, backlog: p99 {p99:.1f} ms <= {TARGET_P99_MS:g} ms", p99 <= TARGET_P99_MS),
        (
            "new, backlog: every command arrived, none redelivered",
            not new_backlog.missing and not new_backlog.redelivered,
        ),
        (
            "new, backlog: readings still pending when the last command arrived",
            bool(new_backlog.pending_readings),
        ),
    ]
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
