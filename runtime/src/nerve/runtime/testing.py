"""Helpers for tests that run against real brokers: read streams, wait for counts, provision devices.

Shipped in the product so that tests of agents written by users can use them too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nerve.runtime.cli.history import read_stream
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from pathlib import Path

    from nats.js import JetStreamContext


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as a stream holds it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


async def stream_messages(js: JetStreamContext, stream: str) -> list[StoredMessage]:
    """Every message in `stream`, in order, with its subject and headers."""
    info = await js.stream_info(stream)
    subjects = info.config.subjects or []
    messages: list[StoredMessage] = []
    for subject in subjects:  # nerve's streams have one subject each
        messages.extend(
            StoredMessage(
                seq=msg.metadata.sequence.stream,
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
            )
            for msg in await read_stream(js, stream, subject)
        )
    return sorted(messages, key=lambda message: message.seq)


async def wait_for_count(js: JetStreamContext, stream: str, count: int, *, timeout: float = 10.0) -> int:
    """Wait until `stream` holds at least `count` messages; return how many it holds."""
    async with asyncio.timeout(timeout):
        while True:
            info = await js.stream_info(stream)
            if info.state.messages >= count:
                return info.state.messages
            await asyncio.sleep(0.02)


def provision_device(registry: Path, device: str, *, keys: Path | None = None) -> Signer:
    """Register `device` in the device key registry `registry` and return the signer of its results.

    What `nerve devices add` does for a test: a new key pair in `keys` (default: `<registry>/../device-keys`,
    outside the registry), its public half copied to `<registry>/<device>.pub`. The signer's key id is the
    device id, as the edge signs (`edge.signing_key`).
    """
    private, public = generate_keypair(keys or registry.parent / "device-keys", device, overwrite=True)
    registry.mkdir(parents=True, exist_ok=True)
    (registry / public.name).write_bytes(public.read_bytes())
    return Signer.from_file(private, device)
