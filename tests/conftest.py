"""Fixtures shared by every test: real brokers on free ports, each with its own data directory.

Tests that use `mosquitto` or `nats_server` carry `@pytest.mark.broker`. The wire protocols' tests
also share a fake transport and a fake TCP server (`new_transport`, `tcp_server`); the edge's tests
and its chaos tests a running agent (`running`) and a small tmpfs (`tiny_tmpfs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import nats
import pytest

from nerve.runtime.config.settings import Settings, load_settings
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from pathlib import Path

    from nats.aio.client import Client as NatsClient

    class Service(Protocol):
        """What `running` runs: an edge agent, a bridge, a central runner."""

        ready: asyncio.Event

        def run(self) -> Coroutine[Any, Any, None]: ...

    class Running(Protocol):
        def __call__(
            self, service: Service, *, wait: float
        ) -> AbstractAsyncContextManager[asyncio.Task[None]]: ...

    TinyTmpfs: TypeAlias = Callable[[Path, str], AbstractContextManager[Path]]
    Serve: TypeAlias = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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


# --- fakes for the wire protocols' tests -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes, and whether it closed or aborted the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def new_transport() -> Callable[[], FakeTransport]:
    """Makes a fresh `FakeTransport` at each call."""
    return FakeTransport


@contextlib.asynccontextmanager
async def _tcp_server(serve: Serve) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that hands each connection to `serve`; yields its port.

    On the way out the server stops and every connection it took is closed.
    """
    writers: list[asyncio.StreamWriter] = []

    async def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await serve(reader, writer)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


@pytest.fixture
def tcp_server() -> Callable[[Serve], AbstractAsyncContextManager[int]]:
    """Starts a fake server: `async with tcp_server(serve) as port`, `serve(reader, writer)` per client."""
    return _tcp_server


# --- the edge agent and its disk -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _running(service: Service, *, wait: float) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run(), name=type(service).__name__)
    try:
        async with asyncio.timeout(wait):
            await service.ready.wait()
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(wait):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def running() -> Running:
    """`async with running(service, wait=s) as task`: an agent's, bridge's or central runner's `run()` as
    a task, ready (connected and subscribed) within `wait` seconds; cancelled and awaited (again within
    `wait`) after."""
    return _running


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def tiny_tmpfs() -> TinyTmpfs:
    """`with tiny_tmpfs(where, "512k") as disk`: a tmpfs of that size mounted at the new directory
    `where`, unmounted after (needs root; the test is skipped where mounting is not allowed)."""
    return _tiny_tmpfs
