"""What nerve's two lean broker clients share: one asyncio `Protocol`, batches per read, a keep-alive.

`nerve.runtime.wire.mqtt` (MQTT v5) and `nerve.bridge.natswire` (JetStream publishing) each parse what one
socket read brought into a list and hand it to one callback. Any failure ends the connection: `closed`
then holds the reason, every waiter fails with it, and nothing is retried here (the callers start over).
Standard library only: the edge daemon imports this.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

T = TypeVar("T")


class WireError(NerveError):
    """A lean client's connection failed, was refused, or the peer broke the protocol."""


class WireProtocol(asyncio.Protocol, Generic[T]):
    """Transport, read buffer, failure and keep-alive of a lean client; subclasses parse and send.

    Subclasses set `error` (raised and held in `closed`), `peer` ("broker", "server") and `batch_name`
    (what `deliver` gets, for messages), and implement `_parse` and `_take_waiters`.
    """

    error: ClassVar[type[WireError]] = WireError
    peer: ClassVar[str] = "peer"
    batch_name: ClassVar[str] = "data"
    malformed: ClassVar[str] = "malformed data"

    def __init__(self, deliver: Callable[[list[T]], None]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deliver = deliver
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ping_handle: asyncio.TimerHandle | None = None
        self._ping_outstanding = False
        self._ping_interval_s = 0.0
        self._ping = b""
        self._heard = False  # anything received since the last ping went out
        self._paused = False
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (asyncio calls this once connected)."""
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP always gives one
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every waiter and `closed` with the reason."""
        self._fail(self.error(f"connection lost: {exc}" if exc else f"connection closed by the {self.peer}"))

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; hand it over as one batch. Never raises: a failure ends the connection."""
        if self.closed.done():
            return  # aborted: what was still on its way is not read (nor buffered)
        self._heard = True
        try:
            batch = self._parse(data)
        except WireError as exc:
            self._abort(exc)
            return
        except (IndexError, ValueError) as exc:  # a field running past the data, text not UTF-8
            self._abort(self.error(f"{self.malformed} from the {self.peer}: {type(exc).__name__}: {exc}"))
            return
        except Exception as exc:
            # A parser bug, not the peer's fault: say so loudly, but end this connection only (an escaped
            # exception would leave asyncio to log it and the caller to wait for a close with no reason).
            log.exception("%s: parsing what the %s sent failed", type(self).__name__, self.peer)
            self._abort(self.error(f"internal error reading from the {self.peer}: {type(exc).__name__}"))
            return
        if batch:
            try:
                self._deliver(batch)
            except Exception as exc:
                log.exception("%s: handling %s failed", type(self).__name__, self.batch_name)
                self._abort(self.error(f"handling {self.batch_name} failed: {type(exc).__name__}: {exc}"))

    # -- for subclasses

    def _parse(self, data: bytes) -> list[T]:
        """Add `data` to the buffer, consume every whole unit in it, return what to deliver."""
        raise NotImplementedError

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        """Every future still waiting for the peer, forgotten by the subclass as it hands them over."""
        return []

    # -- failure

    def _fail(self, exc: WireError) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        for waiter in self._take_waiters():
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: it may fail before anyone awaits it
        if not self.closed.done():
            self.closed.set_exception(exc)
            self.closed.exception()  # retrieved: whoever waits on it sees it; nobody waiting must not warn

    def _abort(self, exc: WireError) -> None:
        self._fail(exc)
        self._buffer.clear()  # nothing more is parsed: do not hold what a hostile peer sent
        if self._transport is not None:
            self._transport.abort()

    # -- keep-alive

    def _keep_alive(self, interval_s: float, ping: bytes) -> None:
        """Send `ping` every `interval_s`; a connection that brought nothing since the last one ends.

        Any bytes from the peer prove it alive, not only its answer to the ping: under a backlog the
        answer waits behind everything the peer sent first (mosquitto 2.0.11 writes a persistent
        session's whole queue ahead of a PINGRESP; measured: a PINGREQ sent after 11,773 of 100,000
        queued PUBLISHes was answered after 95,095), and ending such a connection only made the broker
        send the backlog again.
        """
        self._ping_interval_s = interval_s
        self._ping = ping
        self._ping_handle = self._loop.call_later(interval_s, self._tick)

    def _tick(self) -> None:
        if self.closed.done():
            return
        # (Paused, we read nothing, the answer included: the peer is not to blame.)
        if self._ping_outstanding and not self._heard and not self._paused:
            self._abort(
                self.error(f"no answer to a ping within {self._ping_interval_s:.0f}s: {self.peer} gone")
            )
            return
        self._heard = False
        self._ping_outstanding = True
        if self._transport is not None:
            self._transport.write(self._ping)
        self._ping_handle = self._loop.call_later(self._ping_interval_s, self._tick)

    def _pong(self) -> None:
        self._ping_outstanding = False
