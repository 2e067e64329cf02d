"""Fixtures shared by every test: real brokers on free ports, each with its own data directory.

Tests that use `mosquitto` or `nats_server` carry `@pytest.mark.broker`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from nerve.runtime.brokers import Mosquitto, NatsServer, free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


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
