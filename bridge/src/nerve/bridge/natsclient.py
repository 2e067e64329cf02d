"""nats-py's connections of the bridge (streams; the downlink's consumer), retried whatever a server sends."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nerve.bridge.natswire import shown
from nerve.runtime.backoff import Backoff
from nerve.runtime.errors import ConfigError, shown_url
from nerve.runtime.jetstream.client import connect_forever

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from nerve.runtime.config.settings import NatsSettings

log = logging.getLogger(__name__)


async def connect_nats(settings: NatsSettings, *, name: str) -> NatsClient:
    """Connect with backoff, forever, whatever the server sends; raise `ConfigError` for a bad seed file.

    `connect_forever` waits out an absent server; but nats-py lets a hostile INFO raise what it likes
    (`AttributeError` on `INFO []`, `RecursionError` on deep nesting), which would end the bridge.
    """
    backoff = Backoff()
    while True:
        try:
            return await connect_forever(settings, name=name)
        except ConfigError:
            raise  # a bad seed file: one clear line, and no retry would mend it
        except Exception as exc:  # noqa: BLE001 - anything nats-py raises on a bad server is retried
            delay = backoff.next_delay()
            log.warning(
                "bridge: cannot connect to %s: the server sent what nats-py cannot read (%s: %s); "
                "retrying in %.1fs",
                shown_url(settings.url),
                type(exc).__name__,
                shown(str(exc).encode(), 120),
                delay,
            )
            await asyncio.sleep(delay)
