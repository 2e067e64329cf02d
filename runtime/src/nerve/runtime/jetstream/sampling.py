"""Refusals sampled into facts: a flood from outside is counted, not recorded one by one.

Anyone who can reach the broker can send forged results or garbage; a fact for each would let them fill
the audit trail (NERVE_FACTS refuses new facts when full). So refusals caused by outside input go through
a `RefusalSampler`: per key (a device, a kind of reason) the first refusal gives a fact at once (count
1); the ones after it within `window_s` are only counted, and when the window ends one fact carries their
count. At most `max_keys` keys are told apart per window; refusals under any other key are counted under
one overflow key per reason (device `*`), so 5,000 bogus device ids give a handful of facts, not 5,000.
Memory is bounded by `max_keys` plus one overflow key per reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_WINDOW_S: Final = 60.0
DEFAULT_MAX_KEYS: Final = 100
OVERFLOW_DEVICE: Final = "*"


@dataclass(frozen=True, slots=True)
class Sample:
    """What one fact says: `count` refusals under (`device`, `reason`) since `since` (monotonic)."""

    device: str
    reason: str
    count: int
    since: float
    last: str  # what the caller said of the last refusal counted (an id, a reason)

    @property
    def overflow(self) -> bool:
        """Whether this counts refusals from many devices beyond `max_keys`."""
        return self.device == OVERFLOW_DEVICE


@dataclass(slots=True)
class _Window:
    started: float
    count: int = 0
    last: str = ""
    devices: set[str] = field(default_factory=set)


class RefusalSampler:
    """Counts refusals per (device, reason) and says when a fact is due; see the module docstring.

    Not thread-safe; one per agent. Each central process counts what it sees itself.
    """

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    @property
    def keys(self) -> int:
        """Keys counted now (overflow keys included)."""
        return len(self._windows)

    def offer(self, device: str, reason: str, last: str) -> Sample | None:
        """Count one refusal; return the sample to keep as a fact now, or None if it waits for `due`."""
        now = self._clock()
        key = (device, reason)
        if key not in self._windows:
            individual = sum(1 for (d, _) in self._windows if d != OVERFLOW_DEVICE)
            if individual >= self._max_keys:
                key = (OVERFLOW_DEVICE, reason)
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(started=now, devices={device})
            return Sample(key[0], reason, 1, now, last)
        window.count += 1
        window.last = last
        if key[0] == OVERFLOW_DEVICE and len(window.devices) < self._max_keys:
            window.devices.add(device)  # bounded: only says "at least this many devices"
        return None

    def due(self, *, everything: bool = False) -> list[Sample]:
        """The samples whose window ended with refusals counted: one fact each. Call it regularly.

        `everything`: every window with refusals counted, ended or not (when stopping: none is lost).
        """
        now = self._clock()
        samples = []
        for key, window in list(self._windows.items()):
            if now - window.started < self._window_s and not everything:
                continue
            if window.count:
                samples.append(Sample(key[0], key[1], window.count, window.started, window.last))
                # A new window starts now: the flood goes on, at most one fact per window.
                self._windows[key] = _Window(started=now, devices=window.devices)
            else:
                del self._windows[key]  # quiet for a whole window: forget it
        return samples
