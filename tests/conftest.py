"""Fixtures shared by every test: real brokers on free ports, each with its own data directory.

Tests that use `mosquitto` or `nats_server` carry `@pytest.mark.broker`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats
import pytest

from nerve.runtime.brokers import Mosquitto, NatsServer, free_port
from nerve.runtime.config import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A running mosquitto on a free port, stopped (SIGTERM) at teardown."""
    async with Mosquitto(port=free_port(), data_dir=tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A running nats-server with JetStream on a free port, stopped (SIGTERM) at teardown."""
    async with NatsServer(port=free_port(), data_dir=tmp_path / "nats-server") as broker:
        yield broker


@pytest.fixture
def settings(mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path) -> Settings:
    """Settings pointing at this test's brokers, with data under tmp_path."""
    return load_settings(
        overrides={
            "mqtt": {"url": mosquitto.url},
            "nats": {"url": nats_server.url},
            "data_dir": str(tmp_path / "data"),
        }
    )


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A NATS client on this test's server, closed at teardown."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()
