"""Fixtures of the engine's tests: JetStream with nerve's streams, and a way to publish an event."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from nerve.runtime.engine import EngineSettings
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.subjects import Address, Kind

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

PREFIX = "nerve"
#: Short leases, so that a test of a crash does not wait 15 s for the run to be resumed.
FAST = EngineSettings(lease_s=1.0)


@pytest.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    """JetStream on the test's server, with nerve's streams."""
    context = nc.jetstream()
    await ensure_streams(context, PREFIX)
    return context


async def publish_event(
    js: JetStreamContext, event_type: str, data: dict[str, Any], *, event_id: str, source: str = "shop"
) -> Event:
    """Store an event `nerve.<source>.events.<event_type>` with id `event_id`."""
    event = Event(id=event_id, source=f"nerve://{source}", type=event_type, subject=source, data=data)
    subject = Address(device=source, kind=Kind.EVENTS, name=event_type).subject(PREFIX)
    await publish_envelope(js, subject, event)
    return event
