"""Cancellation that is not lost on Python 3.11.

On 3.11, `asyncio.wait_for` returns the inner result when the inner future completes in the same loop
step as the cancellation, and the cancellation is gone (fixed in 3.12). nats-py and aiomqtt await every
request and PUBACK through `wait_for`, so a consumer loop cancelled at that moment would go on waiting
for its next message forever, and a shutdown would hang. Loops call `checkpoint()` after each message.
"""

from __future__ import annotations

import asyncio


def checkpoint() -> None:
    """Raise `CancelledError` if the current task was asked to stop (even if the request was swallowed)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
