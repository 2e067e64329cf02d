"""`MqttClient`: nerve's MQTT connection as a simple session for tools (`nerve demo`), benches and tests.

The daemons (the bridge, the edge) drive `MqttWire` themselves, batch by batch; a tool that wants to
subscribe, read messages one at a time and publish uses this instead, on the same wire (same TLS,
credentials, limits and error messages). A QoS1 message is acknowledged when `messages` hands it over:
whoever reads it has it (at least once, as long as the reader does not crash after taking it).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Final, Self

from nerve.runtime.wire.mqtt import Incoming, MqttWireError, open_mqtt

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from nerve.runtime.wire.endpoint import MqttConnectSettings
    from nerve.runtime.wire.mqtt import MqttWire, Will

__all__ = ["MqttClient"]

DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_RECEIVE_MAXIMUM: Final = 100


class MqttClient:
    """One MQTT v5 session: `async with MqttClient(settings.mqtt, client_id=...) as client`.

    `persistent` keeps the broker-side session (clean start off, session expiry from the settings), so
    QoS1 messages wait at the broker while this client is away. Entering raises `MqttWireError` saying why
    the broker cannot be reached or refused us (or `ConfigError` for an unusable certificate or password
    file); `subscribe` and `publish` raise `MqttWireError` too, each bounded by `timeout_s`.
    """

    def __init__(
        self,
        settings: MqttConnectSettings,
        *,
        client_id: str,
        persistent: bool = False,
        will: Will | None = None,
        receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._persistent = persistent
        self._will = will
        self._receive_maximum = receive_maximum
        self._timeout_s = timeout_s
        self._wire: MqttWire | None = None
        self._pending: collections.deque[Incoming] = collections.deque()
        self._arrived = asyncio.Event()

    @property
    def wire(self) -> MqttWire:
        """The connection (raises `MqttWireError` outside `async with`)."""
        if self._wire is None:
            raise MqttWireError("not connected: use `async with MqttClient(...)`")
        return self._wire

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed a persistent session."""
        return self.wire.session_present

    async def __aenter__(self) -> Self:
        self._wire = await open_mqtt(
            self._settings,
            client_id=self._client_id,
            on_messages=self._take,
            clean_start=not self._persistent,
            session_expiry_s=self._settings.session_expiry_s if self._persistent else 0,
            receive_maximum=self._receive_maximum,
            will=self._will,
            timeout_s=self._timeout_s,
        )
        self._wire.closed.add_done_callback(lambda _: self._arrived.set())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None

    def _take(self, batch: list[Incoming]) -> None:
        self._pending.extend(batch)
        self._arrived.set()

    async def subscribe(self, *filters: str) -> None:
        """Subscribe to `filters` at QoS1; raise `MqttWireError` if the broker refuses one."""
        await self.wire.subscribe(filters, timeout_s=self._timeout_s)

    async def unsubscribe(self, *filters: str) -> None:
        """Unsubscribe from `filters`; raise `MqttWireError` if the broker refuses one."""
        await self.wire.unsubscribe(filters, timeout_s=self._timeout_s)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> None:
        """Publish; at QoS1 return once the broker acknowledged it (no PUBACK in time: `MqttWireError`)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self.wire.publish(
                    topic,
                    payload,
                    qos=qos,
                    retain=retain,
                    user_properties=user_properties,
                    content_type=content_type,
                )
        except TimeoutError:
            raise MqttWireError(f"no PUBACK for {topic} within {self._timeout_s:g}s") from None

    @property
    def messages(self) -> Self:
        """The messages received, in order: `async for message in client.messages` (bound it with a timeout).

        The iteration ends when this client is closed, and raises `MqttWireError` when the connection is
        lost (after what had arrived was handed over).
        """
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Incoming:
        while not self._pending:
            wire = self._wire
            if wire is None:
                raise StopAsyncIteration
            if wire.closed.done():
                wire.closed.result()  # raises the reason
                raise MqttWireError("closed")
            self._arrived.clear()
            await self._arrived.wait()
        message = self._pending.popleft()
        if message.packet_id and self._wire is not None:
            self._wire.puback([message.packet_id])
        return message
