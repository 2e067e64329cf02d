"""Prometheus metrics of the bridge, read from its counters at scrape time.

A collector that reads `BridgeStats` when scraped costs the hot path nothing: the bridge only bumps
plain integers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from nerve.runtime.errors import ConfigError

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from nerve.bridge.stats import BridgeStats


class BridgeCollector(Collector):
    """Exposes one bridge's counters as `nerve_bridge_*` metrics."""

    def __init__(self, stats: BridgeStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        stats = self._stats
        counters = (
            ("received", "MQTT messages received from devices", stats.received),
            ("stored", "messages stored in JetStream (duplicates included)", stats.stored),
            ("duplicates", "messages JetStream recognised as already stored (dedup by id)", stats.duplicates),
            ("deadlettered", "messages sent to NERVE_DEADLETTER with a reason", stats.deadlettered),
            ("commands_sent", "commands delivered to mosquitto (PUBACK received)", stats.commands_sent),
            ("commands_expired", "commands not sent because they had expired", stats.commands_expired),
            (
                "commands_deadlettered",
                "commands sent to NERVE_DEADLETTER (unreadable)",
                stats.commands_deadlettered,
            ),
            ("spooled", "messages written to the uplink's spool while JetStream was behind", stats.spooled),
            ("reconnects", "MQTT reconnections of the uplink", stats.reconnects),
            ("downlink_reconnects", "MQTT reconnections of the downlink", stats.downlink_reconnects),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(f"nerve_bridge_{name}", documentation, value=value)
        yield GaugeMetricFamily(
            "nerve_bridge_in_flight", "messages received and not yet acknowledged", value=stats.in_flight
        )
        yield GaugeMetricFamily(
            "nerve_bridge_spool_bytes",
            "bytes in the uplink's spool (readings not yet stored, until it is empty again)",
            value=stats.spool_bytes,
        )


class MetricsServer:
    """An HTTP endpoint serving `/metrics` for one bridge, in a thread; `close()` stops it."""

    def __init__(self, stats: BridgeStats, *, address: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(BridgeCollector(stats))
        server: WSGIServer
        thread: threading.Thread
        try:
            server, thread = start_http_server(port, addr=address, registry=registry)
        except OSError as exc:  # in use (say, by the other half of a split bridge), or not this host's
            msg = f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}"
            raise ConfigError(msg, key="bridge.metrics_port") from None
        self._server = server
        self._thread = thread
        self.port = server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
