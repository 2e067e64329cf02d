"""Wire clients: the MQTT client every part uses, on one asyncio `Protocol` base.

The bridge's JetStream publisher shares the base. Imports no nats-py and no pydantic: the lean edge uses it.
"""

from nerve.runtime.wire.mqtt import DEFAULT_MQTT_PORT, Incoming, MqttWire, MqttWireError, Will, open_mqtt
from nerve.runtime.wire.protocol import WireError, WireProtocol

__all__ = [
    "DEFAULT_MQTT_PORT",
    "Incoming",
    "MqttWire",
    "MqttWireError",
    "Will",
    "WireError",
    "WireProtocol",
    "open_mqtt",
]
