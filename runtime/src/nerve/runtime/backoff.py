"""Jittered exponential backoff for reconnect loops that go on forever."""

from __future__ import annotations

import random
from typing import Final

DEFAULT_INITIAL_S: Final = 0.1
DEFAULT_MAXIMUM_S: Final = 10.0


class Backoff:
    """Delays that double from `initial` up to `maximum`, each drawn with full jitter.

    Call `reset()` once a connection has held, so the next outage starts from short delays again.
    """

    def __init__(self, *, initial: float = DEFAULT_INITIAL_S, maximum: float = DEFAULT_MAXIMUM_S) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (full jitter, never under half the nominal delay)."""
        nominal = min(self._maximum, self._initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return random.uniform(nominal / 2, nominal)  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._attempt = 0
