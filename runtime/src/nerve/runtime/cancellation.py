"""Cancellation that is not lost on Python 3.11.

On 3.11, `asyncio.wait_for` returns the inner result when the inner future completes in the same loop
step as the cancellation, and the cancellation is gone (fixed in 3.12). nats-py and aiomqtt await every
request and PUBACK through `wait_for`, so a consumer loop cancelled at that moment would go on waiting
for its next message forever, and a shutdown would hang. Loops call `checkpoint()` after each message.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Coroutine


def checkpoint() -> None:
    """Raise `CancelledError` if the current task was asked to stop (even if the request was swallowed)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def until_signalled(job: Coroutine[Any, Any, int]) -> int:
    """Run `job`; SIGINT or SIGTERM cancels it, so everything it started shuts down cleanly.

    Returns what `job` returns, or 0 when a signal stopped it.
    """
    task = asyncio.ensure_future(job)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
