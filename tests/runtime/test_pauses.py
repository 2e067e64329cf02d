"""Long-running parts freeze what is alive once started (nerve.runtime.pauses): shorter collector pauses."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nerve.runtime.pauses import (
    FULL_COLLECTION_EVERY,
    freeze_survivors,
    frozen_once_ready,
    rarer_full_collections,
)
from nerve.runtime.trust.signing import generate_keypair

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

NERVE = str(Path(sys.executable).parent / "nerve")
FROZEN_LINE = b"objects alive at start frozen"


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (this process runs the rest of the suite)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_what_is_alive_is_frozen_and_garbage_is_collected_first() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    alive = [Cycle() for _ in range(100)]
    Cycle()  # garbage: a cycle nothing refers to
    frozen = freeze_survivors()
    assert frozen == gc.get_freeze_count() > len(alive)
    # The cycle was collected before the freeze, the living ones were not.
    assert sum(isinstance(thing, Cycle) for thing in gc.get_objects()) == 0  # frozen: out of gc's lists
    gc.unfreeze()
    assert sum(isinstance(thing, Cycle) for thing in gc.get_objects()) == len(alive)


@pytest.mark.usefixtures("unfrozen")
async def test_it_freezes_once_the_part_is_ready_and_not_before() -> None:
    ready = asyncio.Event()
    async with frozen_once_ready(ready):
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() == 0
        ready.set()
        async with asyncio.timeout(5):
            while not gc.get_freeze_count():
                await asyncio.sleep(0.01)


@pytest.mark.usefixtures("unfrozen")
async def test_a_part_stopped_before_it_was_ready_freezes_nothing() -> None:
    ready = asyncio.Event()
    async with frozen_once_ready(ready):
        await asyncio.sleep(0.05)
    ready.set()  # too late: the part stopped
    await asyncio.sleep(0.05)
    assert gc.get_freeze_count() == 0


def test_rarer_full_collections_changes_only_the_oldest_generations_threshold() -> None:
    before = gc.get_threshold()  # an in-process `nerve simulate` earlier in the suite may have set it
    try:
        gc.set_threshold(700, 10, 10)  # CPython's defaults
        rarer_full_collections()
        assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
        assert FULL_COLLECTION_EVERY > 10
        gc.set_threshold(500, 5, 10)
        rarer_full_collections(7)
        assert gc.get_threshold() == (500, 5, 7)
    finally:
        gc.set_threshold(*before)


async def _says_frozen(argv: list[str]) -> bool:
    """Run a part until it logs the freeze (True) or 30 s pass (False); stop it with SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        NERVE, *argv, "--log-level", "debug", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            async for line in process.stdout:
                if FROZEN_LINE in line:
                    return True
    except TimeoutError:
        return False
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await process.wait()
    return False


@pytest.mark.broker
async def test_nerve_bridge_and_nerve_central_freeze_once_started(
    mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path
) -> None:
    key, _ = generate_keypair(tmp_path / "keys", "central")
    config = tmp_path / "nerve.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "mqtt": {"url": mosquitto.url},
                "nats": {"url": nats_server.url},
                "central": {"signing_key": str(key), "device_keys_dir": str(tmp_path / "devices")},
            }
        )
    )
    assert await _says_frozen(["bridge", "--config", str(config)])
    assert await _says_frozen(["central", "--config", str(config)])
