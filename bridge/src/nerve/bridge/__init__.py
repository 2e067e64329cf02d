"""nerve.bridge: MQTT ⇄ NATS JetStream, uplink and downlink."""

from nerve.bridge.bridge import Bridge
from nerve.bridge.stats import BridgeStats
from nerve.bridge.uplink import Forward, Ignore, Reject, Translator, translate, uplink_filters

__all__ = [
    "Bridge",
    "BridgeStats",
    "Forward",
    "Ignore",
    "Reject",
    "Translator",
    "translate",
    "uplink_filters",
]
