"""Fixtures of the edge tests: a signing key pair, a clear_temp root, an open journal and outbox, `put`,
and `start_edge` (a real `nerve edge` process, as a user starts it)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from nerve.edge.journal import CommandJournal
from nerve.edge.outbox import Outbox
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    class Put(Protocol):
        def __call__(self, path: Path, *, age: float, size: int = 10) -> Path: ...

    StartEdge = Callable[[Path], Awaitable[asyncio.subprocess.Process]]

NERVE = str(Path(sys.executable).parent / "nerve")


async def _start_edge(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        NERVE,
        "edge",
        "--config",
        str(config),
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={key: value for key, value in os.environ.items() if not key.startswith("NERVE_")},
    )


@pytest.fixture
def start_edge() -> StartEdge:
    """`await start_edge(config)`: `nerve edge --config config` as a process, with no NERVE_* variable."""
    return _start_edge


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_keypair(directory, "central")
    return directory


@pytest.fixture
def signer(keys: Path) -> Signer:
    return Signer.from_file(keys / "central.key")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[CommandJournal]:
    with CommandJournal(tmp_path / "journal.sqlite3") as opened:
        yield opened


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """The outbox of device pi-01 (the device of the agent tests)."""
    with Outbox(tmp_path / "outbox.sqlite3", device="pi-01") as opened:
        yield opened


def _put(path: Path, *, age: float, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


@pytest.fixture
def put() -> Put:
    """`put(path, age=s)`: a file of `size` bytes (10) at `path` (parents made), last changed `age` s ago."""
    return _put
