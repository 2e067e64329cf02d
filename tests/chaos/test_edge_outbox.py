"""The edge outbox against real brokers: mosquitto away for 30 s, the agent killed, a full disk.

Readings carry `<device>.<boot id>.<sequence>` ids, so "every reading, in order" is checked as: the
sequence numbers first seen by a subscriber are exactly 1, 2, 3 ... up to the last one taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
from typing import TYPE_CHECKING

import pytest

from nerve.bridge import Bridge
from nerve.edge import CommandJournal, EdgeAgent, Executor, Outbox
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.cli.history import read_stream
from nerve.runtime.config.settings import MqttSettings, Settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Event
from nerve.runtime.testing import wait_for_count
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttWireError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running, TinyTmpfs

    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

pytestmark = [pytest.mark.broker]

DEVICE = "pi-01"
TELEMETRY = f"nerve/{DEVICE}/telemetry/#"
WAIT = 30.0


def edge_settings(tmp_path: Path, mqtt_url: str, nats_url: str = "nats://127.0.0.1:1") -> Settings:
    keys = tmp_path / "keys"
    generate_keypair(keys, "central")
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "mqtt": {"url": mqtt_url},
            "nats": {"url": nats_url},
            "edge": {
                "interval_s": 0.1,
                # Every reading is published: the tests count them.
                "heartbeat_s": 1e-6,
                "mounts": [str(tmp_path)],
                "trusted_keys_dir": str(keys),
                "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            },
        }
    )


def seq_of(event: Event) -> int:
    device, _boot_id, seq = event.id.split(".")
    assert device == DEVICE
    return int(seq)


def first_seen(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for seq in seqs:
        if seq not in seen:
            seen.add(seq)
            out.append(seq)
    return out


@contextlib.contextmanager
def agent_for(
    settings: Settings, outbox: Outbox, tmp_path: Path, *, sensors: bool = True
) -> Iterator[EdgeAgent]:
    with CommandJournal(tmp_path / f"journal-{id(outbox)}.sqlite3") as journal:
        executor = Executor.from_settings(settings, device=DEVICE, journal=journal)
        yield EdgeAgent(
            settings=settings,
            device=DEVICE,
            executor=executor,
            outbox=outbox,
            sensors=None if sensors else [],
        )


async def observe(url: str, received: list[Event], subscribed: asyncio.Event) -> None:
    """A persistent QoS1 subscriber that reconnects forever: nothing published to it is lost."""
    while True:
        try:
            async with MqttClient(MqttSettings(url=url), client_id="observer", persistent=True) as client:
                await client.subscribe(TELEMETRY)
                subscribed.set()
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(decode(message.payload, Event))
                    checkpoint()
        except MqttWireError:
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def observer(url: str) -> AsyncIterator[list[Event]]:
    received: list[Event] = []
    subscribed = asyncio.Event()
    task = asyncio.create_task(observe(url, received, subscribed), name="observer")
    try:
        async with asyncio.timeout(WAIT):
            await subscribed.wait()
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: object, *, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_mosquitto_down_30s_every_reading_arrives_in_order(
    mosquitto: Mosquitto, tmp_path: Path, running: Running
) -> None:
    settings = edge_settings(tmp_path, mosquitto.url)
    with (
        Outbox(tmp_path / "outbox.sqlite3", device=DEVICE) as outbox,
        agent_for(settings, outbox, tmp_path) as agent,
    ):
        async with observer(mosquitto.url) as received, running(agent, wait=WAIT):
            await until(lambda: len(received) >= 20)
            await mosquitto.stop()
            down_at = outbox.sequence
            await asyncio.sleep(30)  # readings go on: into the outbox
            queued = outbox.sequence - down_at
            assert len(outbox) >= queued >= 200
            await mosquitto.start()
            last = outbox.sequence
            await until(lambda: any(seq_of(event) >= last for event in received))
    seqs = first_seen([seq_of(event) for event in received])
    assert seqs[:last] == list(range(1, last + 1))
    assert {event.type for event in received} >= {"nerve.telemetry.disk", "nerve.telemetry.cpu"}


_KILLED_EDGE = """
import asyncio, json, sys
from pathlib import Path
from nerve.edge import CommandJournal, EdgeAgent, Executor
from nerve.runtime.config.settings import Settings

async def main():
    settings = Settings.model_validate(json.loads(sys.argv[1]))
    with CommandJournal(Path(sys.argv[2])) as journal:
        executor = Executor.from_settings(settings, device=sys.argv[3], journal=journal)
        agent = EdgeAgent(settings=settings, device=sys.argv[3], executor=executor)
        await agent.run()

asyncio.run(main())
"""


def restore(path: Path, content: bytes) -> None:
    for wal in path.parent.glob(path.name + "-*"):
        wal.unlink()
    path.write_bytes(content)


def stored_ids(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("SELECT id FROM outbox ORDER BY lane, seq")]
    finally:
        connection.close()


def stored_so_far(path: Path) -> int:
    """How many entries the running agent's outbox holds (0 until it has created its file and table)."""
    if not path.exists():
        return 0
    try:
        return len(stored_ids(path))
    except sqlite3.OperationalError:  # the file is there, its schema not yet
        return 0


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_killed_agent_replays_its_outbox_in_order_and_jetstream_stores_each_once(
    mosquitto: Mosquitto,
    nats_server: NatsServer,
    nc: NatsClient,
    tmp_path: Path,
    running: Running,
) -> None:
    settings = edge_settings(tmp_path, mosquitto.url, nats_server.url)
    path = tmp_path / "outbox.sqlite3"
    await mosquitto.stop()
    # The agent runs with no broker: its readings pile up in the outbox until kill -9.
    process = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-c",
            _KILLED_EDGE,
            settings.model_dump_json(),
            str(tmp_path / "j.sqlite3"),
            DEVICE,
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until(lambda: stored_so_far(path) >= 100)
    finally:
        process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(WAIT):
            await process.wait()
    assert process.returncode == -signal.SIGKILL
    expected = stored_ids(path)  # the last connection to close also folds the WAL into the file
    assert len(expected) >= 100
    backup = path.read_bytes()

    await mosquitto.start()
    js = nc.jetstream()
    bridge = Bridge(settings=settings)
    bridge_task = asyncio.create_task(bridge.run(), name="bridge")
    try:
        async with asyncio.timeout(WAIT):
            await bridge.ready.wait()
        for replay in (1, 2):
            with (
                Outbox(path, device=DEVICE) as outbox,
                agent_for(settings, outbox, tmp_path, sensors=False) as agent,
            ):
                assert [entry.id for entry in outbox.peek(len(expected) + 1)] == expected
                async with running(agent, wait=WAIT):
                    await until(lambda: len(outbox) == 0)
            if replay == 1:
                await wait_for_count(js, "NERVE_TELEMETRY", len(expected), timeout=60)
                # As if the agent had died after every PUBACK, before deleting: all of it goes again.
                restore(path, backup)
        await until(lambda: bridge.stats.duplicates >= len(expected))
    finally:
        bridge_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bridge_task
    stored = [decode(m.data, Event).id for m in await read_stream(js, "NERVE_TELEMETRY", f"nerve.{DEVICE}.>")]
    assert stored == expected


@pytest.fixture
def tiny_disk(tmp_path: Path, tiny_tmpfs: TinyTmpfs) -> Iterator[Path]:
    """A 512 KiB tmpfs (needs root; skipped where mounting is not allowed)."""
    with tiny_tmpfs(tmp_path / "disk", "512k") as disk:
        yield disk


def fill(disk: Path) -> None:
    with (disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)


@pytest.mark.timeout(120)
async def test_a_full_disk_under_the_outbox_keeps_the_agent_publishing(
    mosquitto: Mosquitto, tmp_path: Path, tiny_disk: Path, caplog: pytest.LogCaptureFixture, running: Running
) -> None:
    settings = edge_settings(tmp_path, mosquitto.url)
    with (
        Outbox(tiny_disk / "outbox.sqlite3", device=DEVICE) as outbox,
        agent_for(settings, outbox, tmp_path) as agent,
        caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"),
    ):
        async with observer(mosquitto.url) as received, running(agent, wait=WAIT) as task:
            await until(lambda: len(received) >= 5)
            fill(tiny_disk)
            await until(lambda: outbox.degraded is not None)
            full_at = outbox.sequence
            await until(lambda: sum(seq_of(event) > full_at for event in received) >= 40)
            assert not task.done()
            (tiny_disk / "filler").unlink()
            await until(lambda: outbox.degraded is None)
            back_at = outbox.sequence
            await until(lambda: any(seq_of(event) > back_at for event in received))
    seqs = first_seen([seq_of(event) for event in received])
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing out of order
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "cannot be written" in errors[0]
    assert "publishing directly" in errors[0]
    assert "can be written again" in caplog.text
