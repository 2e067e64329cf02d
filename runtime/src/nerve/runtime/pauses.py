"""Shorter garbage-collector pauses for the parts that run for long: bridge, central, `nerve simulate`.

CPython's cyclic collector stops the whole process while it scans a generation (every thread: it holds
the GIL), and its oldest generation holds everything that survived: in a part that has started, mostly
what it keeps until it stops (modules, settings, connections; in the simulator, thousands of devices and
their connections). Measured at 10,000 readings/s (`bench/fleet.py`, 60 s, a `gc.callbacks` hook): full
collections of 300-430 ms in `nerve simulate` (26 of them), up to 60 ms in the bridge (18) and 65 ms in
central (3), each a stall that readings and commands queue behind, and a burst after it.

`freeze_survivors` collects once, then moves every object alive into the permanent generation
(`gc.freeze`): later collections scan only what was made since. The cost: a cycle of objects frozen
that later becomes unreachable is never freed by the collector (reference counting still frees
everything else), which is why it runs once, when a part has started, over what it keeps for its life.

`rarer_full_collections` is for `nerve simulate`, whose pauses are in what it measures. Frozen, it
still ran a full collection every 1.5 s at 10,000 devices, 11 ms each (`bench/fleet.py`, 60 s, a
`gc.callbacks` hook, 2026-12-02): its 10,000 connections' keep-alive timers (a handle, a bound method
and a context each, ~30,000 objects renewed every keep-alive) and ~10,000 dicts that had reached the
oldest generation since the last one and that it untracked again, collecting nothing. One full
collection per 100 of the middle generation's (not 10) made it every 14.5 s, still ~11 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["FULL_COLLECTION_EVERY", "freeze_survivors", "frozen_once_ready", "rarer_full_collections"]

log = logging.getLogger(__name__)

#: Middle-generation collections per full one for `rarer_full_collections` (CPython's default is 10).
FULL_COLLECTION_EVERY: Final = 100


def freeze_survivors() -> int:
    """Collect, then freeze every object alive (module docstring); return how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: %d objects alive at start frozen", frozen)
    return frozen


def rarer_full_collections(every: int = FULL_COLLECTION_EVERY) -> None:
    """Run a full collection once per `every` collections of the middle generation (module docstring).

    Reference counting still frees what is not a cycle at once; cycles in the oldest generation live
    up to `every` / 10 times longer than by default.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, every)
    log.debug("garbage collector: a full collection every %d of the middle generation's", every)


@contextlib.asynccontextmanager
async def frozen_once_ready(ready: asyncio.Event) -> AsyncIterator[None]:
    """Within it, `freeze_survivors` runs once `ready` is set; leaving it first freezes nothing.

    A part stopped before it was ready never freezes:

        async with frozen_once_ready(bridge.ready):
            await bridge.run()
    """

    async def wait_then_freeze() -> None:
        await ready.wait()
        freeze_survivors()

    task = asyncio.create_task(wait_then_freeze(), name="freeze-survivors")
    try:
        yield
    finally:
        task.cancel()
