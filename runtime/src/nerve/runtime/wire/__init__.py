"""Wire clients: the MQTT client every part uses, on one asyncio `Protocol` base.

The bridge's JetStream publisher shares the base. Imports no nats-py and no pydantic: the lean edge uses it.
The names are imported on first use (PEP 562): `nerve.runtime.wire.endpoint` must stay importable without
asyncio, so that the lean edge can decide whether to load OpenSSL before asyncio would (`nerve.edge.main`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nerve.runtime import lazy as _lazy

if TYPE_CHECKING:
    from nerve.runtime.wire.client import MqttClient
    from nerve.runtime.wire.endpoint import (
        DEFAULT_MAX_PACKET_SIZE,
        DEFAULT_MQTT_PORT,
        DEFAULT_MQTTS_PORT,
        MqttConnectSettings,
        MqttEndpoint,
        mqtt_endpoint,
    )
    from nerve.runtime.wire.mqtt import (
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

_MODULE_OF: dict[str, str] = {
    "DEFAULT_MAX_PACKET_SIZE": "nerve.runtime.wire.endpoint",
    "DEFAULT_MQTTS_PORT": "nerve.runtime.wire.endpoint",
    "DEFAULT_MQTT_PORT": "nerve.runtime.wire.endpoint",
    "Incoming": "nerve.runtime.wire.mqtt",
    "MqttClient": "nerve.runtime.wire.client",
    "MqttConnectSettings": "nerve.runtime.wire.endpoint",
    "MqttEndpoint": "nerve.runtime.wire.endpoint",
    "MqttRefused": "nerve.runtime.wire.mqtt",
    "MqttWire": "nerve.runtime.wire.mqtt",
    "MqttWireError": "nerve.runtime.wire.mqtt",
    "PacketTooLarge": "nerve.runtime.wire.mqtt",
    "SessionTakenOver": "nerve.runtime.wire.mqtt",
    "Will": "nerve.runtime.wire.mqtt",
    "WireError": "nerve.runtime.wire.protocol",
    "WireProtocol": "nerve.runtime.wire.protocol",
    "mqtt_endpoint": "nerve.runtime.wire.endpoint",
    "open_mqtt": "nerve.runtime.wire.mqtt",
}

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


__getattr__ = _lazy.lazy_getattr(__name__, _MODULE_OF)
