"""Wire clients: the MQTT client every part uses, on one asyncio `Protocol` base.

The bridge's JetStream publisher shares the base. Imports no nats-py and no pydantic: the lean edge uses it.
"""

from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.endpoint import (
    DEFAULT_MQTT_PORT,
    DEFAULT_MQTTS_PORT,
    MqttConnectSettings,
    MqttEndpoint,
    mqtt_endpoint,
)
from nerve.runtime.wire.mqtt import (
    DEFAULT_MAX_PACKET_SIZE,
    Incoming,
    MqttRefused,
    MqttWire,
    MqttWireError,
    PacketTooLarge,
    SessionTakenOver,
    Will,
    open_mqtt,
)
from nerve.runtime.wire.protocol import WireError, WireProtocol

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "Incoming",
    "MqttClient",
    "MqttConnectSettings",
    "MqttEndpoint",
    "MqttRefused",
    "MqttWire",
    "MqttWireError",
    "PacketTooLarge",
    "SessionTakenOver",
    "Will",
    "WireError",
    "WireProtocol",
    "mqtt_endpoint",
    "open_mqtt",
]
