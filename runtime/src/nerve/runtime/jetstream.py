"""NATS connections: reconnect forever, wrap failures, and publish envelopes with dedup ids."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import nats
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from nerve.runtime.codec import to_msgpack
from nerve.runtime.errors import BrokerUnavailable

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

    from nerve.runtime.config import NatsSettings
    from nerve.runtime.envelope import Envelope

log = logging.getLogger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
PUBLISH_TIMEOUT_S: Final = 5.0


async def connect(settings: NatsSettings, *, name: str) -> NatsClient:
    """Connect to NATS; once connected, the client reconnects forever by itself.

    Raises `BrokerUnavailable` if no server answers within the connect timeout.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats (%s): %s", name, exc)

    async def on_disconnected() -> None:
        log.warning("nats (%s): disconnected, reconnecting", name)

    async def on_reconnected() -> None:
        log.info("nats (%s): reconnected", name)

    servers = [url.strip() for url in settings.url.split(",")]
    try:
        return await nats.connect(
            servers=servers,
            name=name,
            connect_timeout=settings.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except (NoServersError, OSError, TimeoutError, NatsError) as exc:
        raise BrokerUnavailable(settings.url, str(exc) or type(exc).__name__) from exc


async def publish_envelope(
    js: JetStreamContext, subject: str, envelope: Envelope, *, timeout: float = PUBLISH_TIMEOUT_S
) -> PubAck:
    """Store `envelope` on `subject` (msgpack), deduplicated by its id; return JetStream's ack."""
    return await js.publish(
        subject, to_msgpack(envelope), timeout=timeout, headers={MSG_ID_HEADER: envelope.id}
    )
