"""The scaffolding both lean clients share: failure, waiters, keep-alive."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from nerve.runtime.wire.protocol import WireError, WireProtocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import FakeTransport


class LineWire(WireProtocol[bytes]):
    """Delivers lines; `PONG` lines answer the keep-alive."""

    peer = "test peer"

    def __init__(self, delivered: list[bytes]) -> None:
        super().__init__(delivered.extend)
        self.waiter: asyncio.Future[None] = self._loop.create_future()

    def _parse(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer[:] = rest
        if b"PONG" in lines:
            self._pong()
        return [line for line in lines if line != b"PONG"]

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        return [self.waiter]


def connected(new_transport: Callable[[], FakeTransport]) -> tuple[LineWire, FakeTransport, list[bytes]]:
    delivered: list[bytes] = []
    wire = LineWire(delivered)
    transport = new_transport()
    wire.connection_made(transport)
    return wire, transport, delivered


async def test_a_lost_connection_fails_waiters_and_closed(new_transport: Callable[[], FakeTransport]) -> None:
    wire, _, delivered = connected(new_transport)
    wire.data_received(b"one\ntw")
    wire.data_received(b"o\n")
    assert delivered == [b"one", b"two"]
    wire.connection_lost(None)
    with pytest.raises(WireError, match="connection closed by the test peer"):
        await wire.waiter
    with pytest.raises(WireError, match="connection closed by the test peer"):
        await wire.closed


async def test_an_unanswered_ping_ends_the_connection_unless_reading_is_paused(
    new_transport: Callable[[], FakeTransport],
) -> None:
    wire, transport, _ = connected(new_transport)
    wire._keep_alive(0.02, b"PING\n")
    await asyncio.sleep(0.03)
    assert transport.written == b"PING\n"
    wire.data_received(b"PONG\n")  # answered: the next tick pings again
    await asyncio.sleep(0.02)
    assert transport.written == b"PING\nPING\n"
    assert not wire.closed.done()
    wire._paused = True
    await asyncio.sleep(0.05)
    assert not wire.closed.done()
    wire._paused = False
    await asyncio.sleep(0.05)
    assert transport.aborted
    with pytest.raises(WireError, match=r"no answer to a ping within 0s: test peer gone"):
        await wire.closed


async def test_a_peer_that_keeps_sending_is_alive_while_its_answer_waits_behind_a_backlog(
    new_transport: Callable[[], FakeTransport],
) -> None:
    """mosquitto writes a session's whole backlog ahead of a PINGRESP: data coming in is the proof of life."""
    wire, transport, delivered = connected(new_transport)
    wire._keep_alive(3600, b"PING\n")  # the ticks are driven by hand below
    wire._tick()
    for n in range(5):  # a tick each time something came but no PONG yet: pinged again, not ended
        wire.data_received(b"reading %d\n" % n)
        wire._tick()
        assert not wire.closed.done()
    assert transport.written == b"PING\n" * 6
    assert len(delivered) == 5
    wire._tick()  # nothing at all since the last ping: gone
    assert transport.aborted
    with pytest.raises(WireError, match=r"no answer to a ping within 3600s: test peer gone"):
        await wire.closed


async def test_an_answered_ping_keeps_a_quiet_connection(new_transport: Callable[[], FakeTransport]) -> None:
    wire, transport, _ = connected(new_transport)
    wire._keep_alive(3600, b"PING\n")
    for _ in range(3):
        wire._tick()
        wire.data_received(b"PONG\n")
    wire._tick()
    assert not wire.closed.done()
    assert transport.written == b"PING\n" * 4
