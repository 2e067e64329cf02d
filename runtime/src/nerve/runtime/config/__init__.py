"""Settings: one frozen tree per process, loaded once by the entry point (`load_settings`), passed down."""

from nerve.runtime.config.settings import (
    DEFAULT_METRICS,
    ENV_PREFIX,
    BridgeSettings,
    CentralSettings,
    DiskRunbookSettings,
    EdgeSettings,
    EngineSettings,
    MqttSettings,
    NatsSettings,
    Settings,
    SiteSettings,
    StreamLimits,
    StreamsSettings,
    TopicMapping,
    host_port,
    load_settings,
)

__all__ = [
    "DEFAULT_METRICS",
    "ENV_PREFIX",
    "BridgeSettings",
    "CentralSettings",
    "DiskRunbookSettings",
    "EdgeSettings",
    "EngineSettings",
    "MqttSettings",
    "NatsSettings",
    "Settings",
    "SiteSettings",
    "StreamLimits",
    "StreamsSettings",
    "TopicMapping",
    "host_port",
    "load_settings",
]
