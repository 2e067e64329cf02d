"""`nerve demo`: a disk spike travels the whole arc, and every hop is timed.

It starts its own mosquitto and nats-server on free ports with a temporary data dir (so it never
touches a running stack), starts central, bridge and edge, puts old and new files in the edge's scratch
folder, publishes `{"value": 97}` on the disk topic the way `mosquitto_pub` would, and waits for the
reading in NATS, the signed command on the device's MQTT topic, the result (only one the device signed
counts: it must verify against the key registered for it), and the facts. It exits 0
when the whole chain happened and the old files (only they) are gone, else 1 naming the missing step.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, Fact
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream.client import connect
from nerve.runtime.stack.brokers import free_port
from nerve.runtime.stack.local import Stack
from nerve.runtime.subjects import Address, Kind, subject_root
from nerve.runtime.trust.devices import DeviceKeys, registry_dir
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttWireError

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.msg import Msg

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.wire.mqtt import Incoming

SPIKE: Final = b'{"value": 97}'
#: The device's next reading once clear_temp ran: below the clear level, so the runbook resolves.
CLEARED: Final = b'{"value": 40}'
OLD_FILES: Final = 5
OLD_FILE_BYTES: Final = 64 * 1024
OLD_AGE_S: Final = 2 * 24 * 3600
FINAL_FACTS: Final = frozenset({"incident_resolved", "incident_failed"})


@dataclass(frozen=True, slots=True)
class Hop:
    """One step seen on the way, `at` seconds after the spike was published."""

    step: str
    at: float
    detail: str


def _seed_scratch(scratch: Path) -> tuple[list[Path], Path]:
    old = []
    past = time.time() - OLD_AGE_S
    for i in range(OLD_FILES):
        path = scratch / f"old-{i}.tmp"
        path.write_bytes(b"\0" * OLD_FILE_BYTES)
        os.utime(path, (past, past))
        old.append(path)
    fresh = scratch / "fresh.tmp"
    fresh.write_bytes(b"keep me")
    return old, fresh


async def run_demo(*, base: Settings, device: str, timeout: float, data_dir: Path | None = None) -> int:
    """Run the demo; return the exit status. Raises `NerveError` if the stack cannot start."""
    with tempfile.TemporaryDirectory(prefix="nerve-demo-") as tmp:
        root = data_dir or Path(tmp)
        mqtt_port, nats_port = free_port(), free_port()
        settings = base.model_copy(
            update={
                "data_dir": root,
                "mqtt": base.mqtt.model_copy(update={"url": f"mqtt://127.0.0.1:{mqtt_port}"}),
                "nats": base.nats.model_copy(update={"url": f"nats://127.0.0.1:{nats_port}"}),
                # Only the injected spike: the host's real disk must not open an incident of its own.
                "edge": base.edge.model_copy(update={"mounts": ()}),
            }
        )
        print(
            f"starting mosquitto (:{mqtt_port}), nats-server (:{nats_port}), central, bridge, edge {device} …"
        )
        started = time.perf_counter()
        async with Stack(settings=settings, device=device) as stack:
            print(f"stack ready in {time.perf_counter() - started:.2f}s; data in {root}")
            assert stack.info is not None  # noqa: S101 - set by __aenter__
            old, fresh = _seed_scratch(stack.info.scratch)
            print(f"seeded {stack.info.scratch}: {OLD_FILES} files 2 days old, 1 fresh file")
            hops = await _drive(stack.settings, device, timeout)
            return _report(hops, old, fresh)


async def _drive(settings: Settings, device: str, timeout: float) -> list[Hop]:
    prefix = settings.prefix
    hops: list[Hop] = []
    done = asyncio.Event()
    acted = asyncio.Event()  # the device's result is in: the runbook now waits for its next reading
    t0 = 0.0

    def seen(step: str, detail: str) -> None:
        hops.append(Hop(step, time.perf_counter() - t0, detail))

    nc = await connect(settings.nats, name="nerve-demo")  # as the cli identity the stack made

    async def on_reading(msg: Msg) -> None:
        seen("reading in NATS", msg.subject)

    async def on_fact(msg: Msg) -> None:
        fact = decode(msg.data, Fact)
        seen(f"fact {fact.kind}", fact.summary)
        if fact.kind == "command_result":
            acted.set()
        if fact.kind in FINAL_FACTS:
            done.set()

    root = subject_root(prefix)
    await nc.subscribe(f"{root}.{device}.telemetry.disk", cb=on_reading)
    await nc.subscribe(f"{root}.{device}.facts.*", cb=on_fact)
    await nc.flush()
    observer = MqttClient(settings.mqtt, client_id=f"nerve-demo-observer-{os.getpid()}")
    try:
        async with observer, asyncio.TaskGroup() as tasks:
            await observer.subscribe(f"{prefix}/{device}/commands/+", f"{prefix}/{device}/results/+")
            keys = DeviceKeys(registry_dir(settings.central.device_keys_dir, settings.data_dir))
            watch = tasks.create_task(_watch_mqtt(observer, seen, keys), name="nerve-demo-watch-mqtt")
            topic = Address(device, Kind.TELEMETRY, "disk").topic(prefix)
            t0 = time.perf_counter()
            await observer.publish(topic, SPIKE, qos=1)
            seen("spike published", f"{topic} {SPIKE.decode()}")
            try:
                async with asyncio.timeout(timeout):
                    await _first(acted, done)
                    if not done.is_set():  # the edge sends no readings here: its next one, as it would
                        await observer.publish(topic, CLEARED, qos=1)
                        seen("reading after clearing", f"{topic} {CLEARED.decode()}")
                        await done.wait()
            except TimeoutError:
                pass
            watch.cancel()
    finally:
        await nc.close()
    return sorted(hops, key=lambda hop: hop.at)


async def _first(*events: asyncio.Event) -> None:
    """Return once one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _watch_mqtt(client: MqttClient, seen: Callable[[str, str], None], keys: DeviceKeys) -> None:
    # What goes wrong here is a hop in the report (the missing steps then say what did not happen),
    # never an error that ends the demo.
    try:
        async for message in client.messages:
            try:
                _saw(message, seen, keys)
            except DecodeError as exc:
                seen("undecodable message", f"{message.topic}: {exc}")
    except MqttWireError as exc:
        seen("MQTT connection lost", str(exc))


def _saw(message: Incoming, seen: Callable[[str, str], None], keys: DeviceKeys) -> None:
    if "/commands/" in message.topic:
        command = decode(message.payload, Command)
        seen("command on device topic", f"{message.topic} signed by {command.keyid!r}, args {command.data}")
    else:
        result = decode(message.payload, CommandResult)
        refusal = keys.refusal(result)
        if refusal is not None:
            seen("unverified result ignored", f"{result.status} on {message.topic}: {refusal.reason}")
            return
        detail = result.data.get("summary") or json.dumps(result.data)
        seen(
            "result from device",
            f"{result.status}: {detail}" + (f" ({result.reason})" if result.reason else ""),
        )


REQUIRED: Final = (
    "spike published",
    "reading in NATS",
    "command on device topic",
    "result from device",
    "fact incident_opened",
    "fact command_issued",
    "fact command_result",
    "reading after clearing",
    "fact incident_resolved",
)


def _report(hops: list[Hop], old: list[Path], fresh: Path) -> int:
    print()
    for hop in hops:
        print(f"  {hop.at * 1000:9.1f} ms  {hop.step:<26} {hop.detail}")
    print()
    steps = {hop.step for hop in hops}
    missing = [step for step in REQUIRED if step not in steps]
    problems = [f"missing step: {step}" for step in missing]
    if "fact incident_failed" in steps:
        problems.append("the incident failed (see the facts above)")
    left = [path.name for path in old if path.exists()]
    if left:
        problems.append(f"old files not deleted: {', '.join(left)}")
    if not fresh.exists():
        problems.append("the fresh file was deleted, and it should not have been")
    if problems:
        for problem in problems:
            print(f"demo FAILED: {problem}")
        return 1
    print(
        f"demo OK: spike -> command in {_at(hops, 'command on device topic'):.1f} ms, "
        f"incident resolved in {_at(hops, 'fact incident_resolved'):.1f} ms; "
        f"{OLD_FILES} old files deleted, the fresh one kept"
    )
    return 0


def _at(hops: list[Hop], step: str) -> float:
    return next(hop.at for hop in hops if hop.step == step) * 1000
