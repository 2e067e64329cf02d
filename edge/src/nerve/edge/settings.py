"""The settings the edge reads, as read-only views, and plain frozen dataclasses that fill them.

The edge's code is typed against the `*View` protocols. Two things satisfy them: the pydantic
`nerve.runtime.config.Settings` (tests, `nerve up`, which run the edge in-process) and `EdgeProcessSettings`,
plain frozen dataclasses the lean edge process (`nerve.edge.main`) builds from the JSON that `nerve edge`
hands over after validating the settings with pydantic (`handover_json`). Validation is never
duplicated here: that JSON is trusted, it comes from `Settings.model_dump`. This module imports no pydantic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nerve.runtime.wire.endpoint import MqttConnectSettings

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nerve.runtime.config.settings import Settings

__all__ = [
    "ActionsView",
    "EdgeProcessSettings",
    "EdgeView",
    "SettingsView",
    "handover_json",
]


class MqttView(MqttConnectSettings, Protocol):
    """`mqtt.*`: everything a connection reads (`nerve.runtime.wire.endpoint.MqttConnectSettings`)."""


class BridgeView(Protocol):
    """`bridge.max_payload`: the largest command the executor reads."""

    @property
    def max_payload(self) -> int: ...


class SensorView(Protocol):
    """`edge.sensors.<name>`."""

    @property
    def enabled(self) -> bool: ...
    @property
    def interval_s(self) -> float | None: ...
    @property
    def deadband(self) -> float | None: ...
    @property
    def heartbeat_s(self) -> float | None: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


class OutboxView(Protocol):
    """`edge.outbox`."""

    @property
    def path(self) -> Path | None: ...
    @property
    def max_bytes(self) -> int: ...


class ScriptView(Protocol):
    """`edge.actions.scripts.<name>`."""

    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def timeout_s(self) -> float: ...


class ActionsView(Protocol):
    """`edge.actions`."""

    @property
    def allow(self) -> tuple[str, ...]: ...
    @property
    def journalctl(self) -> tuple[str, ...]: ...
    @property
    def systemctl(self) -> tuple[str, ...]: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def vacuum_default_mb(self) -> int: ...
    @property
    def vacuum_min_mb(self) -> int: ...
    @property
    def vacuum_max_mb(self) -> int: ...
    @property
    def vacuum_unit(self) -> str | None: ...
    @property
    def services(self) -> tuple[str, ...]: ...
    @property
    def scripts(self) -> Mapping[str, ScriptView]: ...
    @property
    def max_output_bytes(self) -> int: ...
    @property
    def max_args_bytes(self) -> int: ...
    @property
    def plugins(self) -> Mapping[str, Mapping[str, Any]]: ...


class EdgeView(Protocol):
    """`edge.*`."""

    @property
    def device(self) -> str | None: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def interval_s(self) -> float: ...
    @property
    def heartbeat_s(self) -> float: ...
    @property
    def mounts(self) -> tuple[str, ...]: ...
    @property
    def sensors(self) -> Mapping[str, SensorView]: ...
    @property
    def outbox(self) -> OutboxView: ...
    @property
    def clear_temp_roots(self) -> tuple[Path, ...]: ...
    @property
    def trusted_keys(self) -> Mapping[str, str]: ...
    @property
    def trusted_keys_dir(self) -> Path | None: ...
    @property
    def signing_key(self) -> Path | None: ...
    @property
    def journal(self) -> Path | None: ...
    @property
    def clock_skew_s(self) -> float: ...
    @property
    def max_command_validity_s(self) -> float: ...
    @property
    def actions(self) -> ActionsView: ...


class SettingsView(Protocol):
    """What the edge reads of the settings."""

    @property
    def prefix(self) -> str: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def mqtt(self) -> MqttView: ...
    @property
    def edge(self) -> EdgeView: ...
    @property
    def bridge(self) -> BridgeView: ...


def handover_json(settings: Settings) -> str:
    """What the lean edge process needs of validated `settings`, as JSON (`EdgeProcessSettings.from_json`)."""
    document = settings.model_dump(mode="json", include={"prefix", "data_dir", "mqtt", "edge"})
    document["bridge"] = {"max_payload": settings.bridge.max_payload}
    document["openssl"] = needs_openssl(settings)
    return json.dumps(document)


def needs_openssl(settings: Settings) -> bool:
    """Whether the edge process may need Python's `ssl` (OpenSSL): an `mqtts://` broker, or any plugin.

    Without either, the lean process never loads it (see `nerve.edge.main`): ~4 MiB of RSS saved. A plugin
    (a sensor or an action that is not built in) is third-party code that may want TLS: it gets `ssl`.
    """
    from nerve.edge.sensors import BUILTIN_SENSORS  # noqa: PLC0415 - a light module; edge.__init__ is lazy
    from nerve.runtime.config.settings import BUILTIN_ACTIONS  # noqa: PLC0415 - the pydantic side only

    edge = settings.edge
    plugins = (
        set(edge.sensors) - set(BUILTIN_SENSORS)
        or set(edge.actions.allow) - set(BUILTIN_ACTIONS)
        or edge.actions.plugins
    )
    return settings.mqtt.url.startswith("mqtts:") or bool(plugins)


@dataclass(frozen=True, slots=True)
class _Mqtt:
    """`mqtt.*` (an `MqttView`)."""

    url: str
    keepalive_s: int
    session_expiry_s: int
    max_packet_size: int
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> _Mqtt:
        return cls(
            url=document["url"],
            keepalive_s=document["keepalive_s"],
            session_expiry_s=document["session_expiry_s"],
            max_packet_size=document["max_packet_size"],
            ca_file=_path(document.get("ca_file")),
            cert_file=_path(document.get("cert_file")),
            key_file=_path(document.get("key_file")),
            username=document.get("username"),
            password_file=_path(document.get("password_file")),
        )


@dataclass(frozen=True, slots=True)
class _Bridge:
    """`bridge.max_payload` (a `BridgeView`)."""

    max_payload: int


@dataclass(frozen=True, slots=True)
class _Sensor:
    """`edge.sensors.<name>` (a `SensorView`)."""

    enabled: bool
    interval_s: float | None
    deadband: float | None
    heartbeat_s: float | None
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Outbox:
    """`edge.outbox` (an `OutboxView`)."""

    path: Path | None
    max_bytes: int


@dataclass(frozen=True, slots=True)
class _Script:
    """`edge.actions.scripts.<name>` (a `ScriptView`)."""

    argv: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class _Actions:
    """`edge.actions` (an `ActionsView`)."""

    allow: tuple[str, ...]
    journalctl: tuple[str, ...]
    systemctl: tuple[str, ...]
    timeout_s: float
    vacuum_default_mb: int
    vacuum_min_mb: int
    vacuum_max_mb: int
    vacuum_unit: str | None
    services: tuple[str, ...]
    scripts: Mapping[str, _Script]
    max_output_bytes: int
    max_args_bytes: int
    plugins: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class _Edge:
    """`edge.*` (an `EdgeView`)."""

    device: str | None
    client_id: str | None
    interval_s: float
    heartbeat_s: float
    mounts: tuple[str, ...]
    sensors: Mapping[str, _Sensor]
    outbox: _Outbox
    clear_temp_roots: tuple[Path, ...]
    trusted_keys: Mapping[str, str]
    trusted_keys_dir: Path | None
    signing_key: Path | None
    journal: Path | None
    clock_skew_s: float
    max_command_validity_s: float
    actions: _Actions


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True, slots=True)
class EdgeProcessSettings:
    """The edge's settings as plain frozen dataclasses (a `SettingsView`), built from `handover_json`."""

    prefix: str
    data_dir: Path
    mqtt: _Mqtt
    edge: _Edge
    bridge: _Bridge = field(default_factory=lambda: _Bridge(64 * 1024))
    openssl: bool = True  # False: nothing the process runs needs `ssl` (`needs_openssl`)

    @classmethod
    def from_json(cls, text: str) -> EdgeProcessSettings:
        """Build them from `handover_json`'s output. Trusted input: a missing key raises `KeyError`."""
        document = json.loads(text)
        edge = document["edge"]
        actions = edge["actions"]
        return cls(
            prefix=document["prefix"],
            data_dir=Path(document["data_dir"]),
            mqtt=_Mqtt.from_dict(document["mqtt"]),
            bridge=_Bridge(**document["bridge"]),
            openssl=document["openssl"],
            edge=_Edge(
                device=edge["device"],
                client_id=edge["client_id"],
                interval_s=edge["interval_s"],
                heartbeat_s=edge["heartbeat_s"],
                mounts=tuple(edge["mounts"]),
                sensors={name: _Sensor(**sensor) for name, sensor in edge["sensors"].items()},
                outbox=_Outbox(path=_path(edge["outbox"]["path"]), max_bytes=edge["outbox"]["max_bytes"]),
                clear_temp_roots=tuple(Path(root) for root in edge["clear_temp_roots"]),
                trusted_keys=dict(edge["trusted_keys"]),
                trusted_keys_dir=_path(edge["trusted_keys_dir"]),
                signing_key=_path(edge["signing_key"]),
                journal=_path(edge["journal"]),
                clock_skew_s=edge["clock_skew_s"],
                max_command_validity_s=edge["max_command_validity_s"],
                actions=_Actions(
                    **{
                        **actions,
                        "allow": tuple(actions["allow"]),
                        "journalctl": tuple(actions["journalctl"]),
                        "systemctl": tuple(actions["systemctl"]),
                        "services": tuple(actions["services"]),
                        "scripts": {
                            name: _Script(argv=tuple(script["argv"]), timeout_s=script["timeout_s"])
                            for name, script in actions["scripts"].items()
                        },
                    }
                ),
            ),
        )
