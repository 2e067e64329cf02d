"""Helpers for tests that run against real brokers: read streams, wait for counts.

Shipped in the product so that tests of agents written by users can use them too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.js import JetStreamContext


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as a stream holds it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


async def stream_messages(js: JetStreamContext, stream: str) -> list[StoredMessage]:
    """Every message in `stream`, in order (for tests and tools: one request per message)."""
    info = await js.stream_info(stream)
    messages: list[StoredMessage] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        raw = await js.get_msg(stream, seq)
        messages.append(
            StoredMessage(
                seq=raw.seq or seq,
                subject=raw.subject or "",
                data=raw.data or b"",
                headers=dict(raw.headers or {}),
            )
        )
    return messages


async def wait_for_count(js: JetStreamContext, stream: str, count: int, *, timeout: float = 10.0) -> int:
    """Wait until `stream` holds at least `count` messages; return how many it holds."""
    async with asyncio.timeout(timeout):
        while True:
            info = await js.stream_info(stream)
            if info.state.messages >= count:
                return info.state.messages
            await asyncio.sleep(0.02)
