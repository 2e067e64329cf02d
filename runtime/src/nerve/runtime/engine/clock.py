"""The engine's clock: what time it is, and waiting for a while. A seam, so a test harness can fake time.

The engine reads the time through a `Clock` for everything it journals or compares with the journal
(leases, timers' due times, step times) and waits through it in its watchdog and lease renewal. The
system clock is the default; `nerve.runtime.harness` passes a fake one that moves only when told to.
Retry backoff and JetStream timeouts wait in real time whatever the clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol


class Clock(Protocol):
    """Wall-clock time (epoch seconds) and a sleep measured by it."""

    def time(self) -> float:
        """Now, in seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...


class SystemClock:
    """The machine's clock: `time.time()` and `asyncio.sleep`."""

    def time(self) -> float:
        """Now, from `time.time()`."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep(seconds)`."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Final = SystemClock()

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]
