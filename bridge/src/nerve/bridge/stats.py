"""The bridge's counters: bumped on the hot path, read by the metrics collector when scraped.

The uplink's run in the bridge's event loop, the downlink's (`commands_*`, `downlink_reconnects`) in the
downlink's thread: each counter has one writer, so no increment is lost to the other thread.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BridgeStats:
    """Counters since start; served as Prometheus metrics when `bridge.metrics_port` is set."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    in_flight: int = 0
    spooled: int = 0
    spool_bytes: int = 0
    commands_sent: int = 0
    commands_expired: int = 0
    commands_deadlettered: int = 0
    reconnects: int = 0
    downlink_reconnects: int = 0
