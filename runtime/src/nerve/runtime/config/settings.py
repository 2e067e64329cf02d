"""Settings: one frozen model tree, loaded once by the entry point, then passed down.

Sources, later ones winning: defaults, a YAML file, `NERVE_*` environment variables, command-line flags.
An environment variable names a key path with `__` between levels: `NERVE_MQTT__URL`,
`NERVE_EDGE__DEVICE`, `NERVE_CENTRAL__DISK__THRESHOLD`; its value is read as YAML (`90`, `[/, /data]`).
Library code never reads the environment: only `load_settings` does, from the mapping it is given.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from nerve.runtime.envelope.codec import DEFAULT_CODEC, Codec
from nerve.runtime.errors import ConfigError, shown_url
from nerve.runtime.subjects import DEFAULT_PREFIX, check_prefix, check_token
from nerve.runtime.wire.endpoint import DEFAULT_MAX_PACKET_SIZE  # not wire.mqtt: that imports asyncio

if TYPE_CHECKING:
    from collections.abc import Mapping

ENV_PREFIX: Final = "NERVE_"
MQTT_SCHEMES: Final = frozenset({"mqtt", "tcp", "mqtts"})
MIN_MAX_PACKET_SIZE: Final = 4096
MAX_MAX_PACKET_SIZE: Final = 268_435_460  # MQTT's own ceiling: a 4-byte remaining length plus 5 bytes
#: Topics whose route the bridge's uplink remembers (`bridge.route_cache`): 10,000 devices with 3
#: metrics each publish on 30,000; 65,536 of them take about 29 MiB.
DEFAULT_ROUTE_CACHE: Final = 65_536
#: The uplink spool's budget (bridge.spool_bytes): about 3 million readings, 10 minutes of a 5,000/s overload.
DEFAULT_SPOOL_BYTES: Final = 1 << 30
#: The downlink's MQTT connections (`bridge.downlink_connections`). mosquitto 2.0 reads one packet from
#: each ready connection per pass over its sockets; with 12,000 devices overloading a 2-core box a pass
#: took 20-70 ms, so the 8th command of a burst on one connection waited ~240 ms in mosquitto.
DEFAULT_DOWNLINK_CONNECTIONS: Final = 4
MAX_DOWNLINK_CONNECTIONS: Final = 16
DEFAULT_METRICS: Final = ("disk", "cpu", "memory", "load", "temperature")
# What a reading of a built-in metric can be: the bridge dead-letters the rest (bridge.ranges adds more).
DEFAULT_RANGES: Final[dict[str, tuple[float, float]]] = {
    "disk": (0.0, 100.0),  # % used
    "cpu": (0.0, 100.0),  # % busy
    "memory": (0.0, 100.0),  # % used
    "load": (0.0, 10_000.0),  # load average
    "temperature": (-100.0, 250.0),  # degrees Celsius
}
#: The longest validity window (`expires - time`) a device accepts by default (`edge.max_command_validity_s`):
#: whatever sends commands (runbooks, `nerve send`) keeps within it.
DEFAULT_MAX_COMMAND_VALIDITY_S: Final = 300.0
#: The most `edge.max_command_validity_s` may be set to: a command good for days is a standing order.
MAX_MAX_COMMAND_VALIDITY_S: Final = 86400.0


def downlink_lane_names(name: str, connections: int) -> tuple[str, ...]:
    """`name` for the downlink's first connection, `<name>-1` ... for the others (client ids, logins)."""
    return (name, *(f"{name}-{lane}" for lane in range(1, connections)))


def _mqtt_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in MQTT_SCHEMES or not parts.hostname:
        # Never echo the value: it may hold a password.
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {shown_url(value)!r}")
    _ = parts.port  # raises ValueError on a bad port
    return value


def _readable_file(value: Path) -> Path:
    """A file nerve can read now (certificates, keys, a password): found at load time, not at connect."""
    try:
        with value.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
    if not value.is_file():
        raise ValueError(f"{value} is not a file")
    return value


def _nats_url(value: str) -> str:
    for one in value.split(","):
        parts = urlsplit(one.strip())
        if parts.scheme not in {"nats", "tls"} or not parts.hostname:
            raise ValueError(f"expected nats://host:port, got {one!r}")
        _ = parts.port
    return value


# Tokens refused with what they were meant to be (the message names it).
DeviceId = Annotated[str, AfterValidator(partial(check_token, what="device id"))]
Metric = Annotated[str, AfterValidator(partial(check_token, what="metric"))]
Token = Annotated[str, AfterValidator(partial(check_token, what="name"))]
MqttUrl = Annotated[str, AfterValidator(_mqtt_url)]
ReadableFile = Annotated[Path, AfterValidator(_readable_file)]
NatsUrl = Annotated[str, AfterValidator(_nats_url)]


def host_port(url: str, default_port: int) -> tuple[str, int]:
    """The host and port of a broker URL."""
    parts = urlsplit(url.split(",", maxsplit=1)[0].strip())
    return parts.hostname or "127.0.0.1", parts.port or default_port


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttSettings(_Settings):
    """Connection to the MQTT broker (mosquitto), for every part: see docs/mqtt.md.

    `mqtts://` turns TLS on (port 8883 by default): the broker's certificate is checked against
    `ca_file` (else the system store) and its host name verified; `cert_file` + `key_file` give a client
    certificate (mutual TLS). Credentials come either from the URL (`mqtt://user:pass@host`) or from
    `username` + `password_file` (the secret stays out of unit files and the environment), not both.
    Every file must be readable when the settings are loaded.
    """

    url: MqttUrl = "mqtt://127.0.0.1:1883"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    ca_file: ReadableFile | None = Field(default=None, description="PEM CA bundle; unset: system store")
    cert_file: ReadableFile | None = Field(default=None, description="PEM client certificate (mutual TLS)")
    key_file: ReadableFile | None = Field(default=None, description="PEM private key of cert_file")
    username: str | None = Field(default=None, min_length=1, max_length=65535)
    password_file: ReadableFile | None = Field(
        default=None, description="holds the password; one trailing newline is stripped"
    )
    max_packet_size: int = Field(
        default=DEFAULT_MAX_PACKET_SIZE,
        ge=MIN_MAX_PACKET_SIZE,
        le=MAX_MAX_PACKET_SIZE,
        description="bytes; a bigger packet from the broker closes the connection (sent in CONNECT)",
    )

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        parts = urlsplit(self.url)
        tls = parts.scheme == "mqtts"
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(self, key) is not None and not tls:
                raise ValueError(f"{key} is set but url is not mqtts://: TLS would not be used")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file")
        if parts.username is not None and (self.username is not None or self.password_file is not None):
            raise ValueError("credentials are in url and in username/password_file: give them in one place")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set without username")
        return self


class NatsSettings(_Settings):
    """Connection to NATS (JetStream on).

    `nkey_file` names this part's NATS identity: a file holding its nkey seed (mode 0600, docs/nats.md).
    Unset: no authentication (a dev server), except that the cli commands use `<data_dir>/nats/cli.nk`
    when it exists. A part with an identity only checks that its streams exist; one without creates them.
    """

    url: NatsUrl = "nats://127.0.0.1:4222"
    nkey_file: ReadableFile | None = Field(
        default=None, description="this part's nkey seed (SU...), mode 0600; unset: no authentication"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    codec: Codec = Field(
        default=DEFAULT_CODEC,
        description="how envelopes are stored in JetStream: msgpack (compact, faster) or json (readable "
        "by the nats CLI and CloudEvents SDKs); readers take either",
    )


class SensorSettings(_Settings):
    """One sensor of the device daemon, built in (disk, cpu, memory, load, temperature) or a plugin.

    Unset numbers fall back to the edge-wide `interval_s` and `heartbeat_s` and to the sensor's own
    deadband (see `nerve.edge.sensors.DEFAULT_DEADBANDS`; 0 for a plugin: every change is published).
    `options` go to a plugin's factory as they are; built-in sensors take none.
    """

    enabled: bool = True
    interval_s: float | None = Field(default=None, gt=0)
    deadband: float | None = Field(default=None, ge=0, description="in the reading's unit")
    heartbeat_s: float | None = Field(default=None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class OutboxSettings(_Settings):
    """The device's store-and-forward outbox (SQLite): what is written waits there until the broker has it."""

    path: Path | None = Field(default=None, description="unset: <data_dir>/edge-<device>.outbox")
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)


BUILTIN_ACTIONS: Final = ("clear_temp", "vacuum_journal", "restart_service", "run", "collect_diagnostics")
# A systemd unit name: no path, no option (never starts with '-'), a known unit type.
_UNIT_PATTERN: Final = re.compile(
    r"[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]{0,200}\.(service|socket|timer|target|path|mount|slice)"
)


def _unit_name(value: str) -> str:
    if not _UNIT_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a systemd unit name like nginx.service")
    return value


def _argv(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or not all(value) or any("\0" in part for part in value):
        raise ValueError("expected a non-empty list of non-empty strings (a program and its arguments)")
    return value


Argv = Annotated[tuple[str, ...], AfterValidator(_argv)]
UnitName = Annotated[str, AfterValidator(_unit_name)]


class ScriptSettings(_Settings):
    """A script the `run` action may start by name: an argv list, never a shell line."""

    argv: Argv
    timeout_s: float = Field(default=60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _absolute(self) -> Self:
        if not self.argv[0].startswith("/"):
            raise ValueError(f"the program {self.argv[0]!r} must be an absolute path (no PATH lookup)")
        return self


class ActionSettings(_Settings):
    """The actions a device runs on signed commands; `allow` is the allow-list."""

    allow: tuple[Annotated[str, AfterValidator(lambda v: check_token(v, "action name"))], ...] = (
        "clear_temp",
    )
    journalctl: Argv = ("journalctl",)
    systemctl: Argv = ("systemctl",)
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="journalctl and systemctl")
    vacuum_default_mb: int = Field(default=256, ge=1)
    vacuum_min_mb: int = Field(default=64, ge=1, description="no command may vacuum below this")
    vacuum_max_mb: int = Field(default=65536, ge=1)
    vacuum_unit: Annotated[str, AfterValidator(lambda v: check_token(v, "vacuum unit"))] | None = Field(
        default=None,
        description="unset: run journalctl; else `systemctl start <unit>@<N>M.service` (a root oneshot)",
    )
    services: tuple[UnitName, ...] = Field(default=(), description="units restart_service may restart")
    scripts: dict[Annotated[str, AfterValidator(lambda v: check_token(v, "script name"))], ScriptSettings] = (
        Field(default_factory=dict)
    )
    max_output_bytes: int = Field(default=4096, ge=0, le=32768, description="per stream, per command")
    max_args_bytes: int = Field(default=4096, gt=0, le=65536, description="a command's arguments, as JSON")
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="action plugin name -> its options"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(set(self.allow)) != len(self.allow):
            raise ValueError(f"allow lists an action twice: {list(self.allow)}")
        if not self.vacuum_min_mb <= self.vacuum_default_mb <= self.vacuum_max_mb:
            raise ValueError(
                f"expected vacuum_min_mb <= vacuum_default_mb <= vacuum_max_mb, got {self.vacuum_min_mb}, "
                f"{self.vacuum_default_mb}, {self.vacuum_max_mb}"
            )
        for name in self.plugins:
            if name in BUILTIN_ACTIONS:
                raise ValueError(f"plugins: {name!r} is a built-in action, not a plugin")
        return self


class EdgeSettings(_Settings):
    """The device daemon."""

    device: DeviceId | None = None
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="MQTT client id; unset: nerve-edge-<device>"
    )
    interval_s: float = Field(default=10.0, gt=0)
    heartbeat_s: float = Field(default=300.0, gt=0)
    mounts: tuple[str, ...] = ("/",)
    sensors: dict[Token, SensorSettings] = Field(default_factory=dict)
    outbox: OutboxSettings = OutboxSettings()
    clear_temp_roots: tuple[Path, ...] = ()
    trusted_keys: dict[str, str] = Field(
        default_factory=dict, description="key id -> base64 Ed25519 public key"
    )
    trusted_keys_dir: Path | None = None
    signing_key: Path | None = Field(
        default=None, description="the device's own Ed25519 key (`<device>.key`), which signs its results"
    )
    journal: Path | None = None
    clock_skew_s: float = Field(
        default=30.0, ge=0, description="seconds allowed between clocks, checking `time` and `expires`"
    )
    max_command_validity_s: float = Field(
        default=DEFAULT_MAX_COMMAND_VALIDITY_S,
        gt=0,
        le=MAX_MAX_COMMAND_VALIDITY_S,
        description="a command valid for longer (`expires - time`) is refused",
    )
    actions: ActionSettings = ActionSettings()


def topic_filter_levels(topic: str) -> list[str]:
    """The levels of an MQTT subscription filter; raise `ValueError` if it is not a valid one."""
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if not level:
            raise ValueError(f"topic filter {topic!r} has an empty level")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"topic filter {topic!r}: '#' may only be the last level")
        if ("+" in level or "#" in level) and level not in {"+", "#"}:
            raise ValueError(f"topic filter {topic!r}: a wildcard must be a whole level")
    return levels


class TopicMapping(_Settings):
    """A rule that brings a third-party topic into nerve's scheme.

    `sensors/+/disk` with `device_level: 2`, `metric: disk`: the reading of `sensors/pi-07/disk` is stored
    as `nerve.pi-07.telemetry.disk`; its value is the JSON field `value_field`, or the whole payload.
    """

    name: Annotated[str, AfterValidator(lambda v: check_token(v, "mapping name"))]
    topic: str
    device_level: int = Field(ge=1, description="1-based level of `topic` that holds the device id")
    kind: Literal["telemetry", "events"] = "telemetry"
    metric: Metric
    value_field: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        levels = topic_filter_levels(self.topic)
        if self.device_level > len(levels) or levels[self.device_level - 1] != "+":
            raise ValueError(
                f"mapping {self.name!r}: device_level {self.device_level} must point at a '+' level "
                f"of {self.topic!r}"
            )
        return self


#: What one bridge process runs (`bridge.part`).
BridgePart = Literal["both", "uplink", "downlink"]


class BridgeSettings(_Settings):
    """The MQTT ⇄ JetStream bridge."""

    client_id: str = "nerve-bridge"
    max_payload: int = Field(default=64 * 1024, gt=0, le=8 * 1024 * 1024)
    metrics: tuple[Metric, ...] = DEFAULT_METRICS
    downlink_durable: str = "nerve-bridge-downlink"
    max_in_flight: int = Field(
        default=1000,
        ge=1,
        le=65535,
        description="MQTT Receive Maximum: unacknowledged messages mosquitto may send the bridge at once",
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus; unset: off")
    metrics_address: str = "127.0.0.1"
    mappings: tuple[TopicMapping, ...] = ()
    ranges: dict[Metric, tuple[float, float]] = Field(
        default_factory=dict,
        description="[low, high] a reading of a metric must lie in; adds to or overrides DEFAULT_RANGES",
    )
    shared_group: Annotated[str, AfterValidator(lambda v: check_token(v, "shared group"))] | None = Field(
        default=None,
        description="several bridges with this group (and distinct client_id) share the uplink ($share)",
    )
    downlink_client_id: str | None = Field(
        default=None, min_length=1, description="the downlink's own MQTT client id; unset: <client_id>-down"
    )
    downlink_username: str | None = Field(
        default=None,
        min_length=1,
        max_length=65535,
        description="the downlink's own MQTT login (a site broker: `nerve devices site` makes it); "
        "unset: the bridge's (mqtt.username, mqtt.password_file)",
    )
    downlink_password_file: ReadableFile | None = Field(
        default=None, description="holds the downlink's password; one trailing newline is stripped"
    )
    route_cache: int = Field(
        default=DEFAULT_ROUTE_CACHE,
        ge=1,
        le=10_000_000,
        description="topics whose meaning the bridge remembers (about 450 bytes each); every topic the "
        "fleet publishes on (devices x metrics and event names) should fit, else each message parses its "
        "topic again",
    )
    downlink_in_flight: int = Field(
        default=64,
        ge=1,
        le=65535,
        description="commands sent to mosquitto and not yet acknowledged (PUBACK), at most; the broker's "
        "Receive Maximum bounds it too (mosquitto: max_inflight_messages, 20 by default)",
    )
    spool_bytes: int = Field(
        default=DEFAULT_SPOOL_BYTES,
        ge=0,
        le=1 << 40,
        description="readings the uplink keeps on its own disk (<data_dir>/bridge/<client_id>.spool) while "
        "JetStream is behind, instead of leaving them queued in mosquitto, whose autosave then stalls every "
        "command; at this many bytes it takes no more until the spool is empty; 0: no spool",
    )
    part: BridgePart = Field(
        default="both",
        description="what a `nerve bridge` process runs: both, uplink (devices -> JetStream) or downlink "
        "(commands -> devices); two processes, one `uplink` and one `downlink`, keep commands off the CPU "
        "and interpreter the readings take (bridge/README.md); `nerve up` always runs both",
    )
    downlink_connections: int = Field(
        default=DEFAULT_DOWNLINK_CONNECTIONS,
        ge=1,
        le=MAX_DOWNLINK_CONNECTIONS,
        description="MQTT connections the downlink sends commands on, each device's always on the same one "
        "(mosquitto reads one packet per connection per pass over its sockets: under load, commands "
        "queued on one connection wait a pass each); each takes up to downlink_in_flight",
    )

    @property
    def effective_ranges(self) -> dict[str, tuple[float, float]]:
        """The range of each metric that has one: the built-in ones, then `ranges`."""
        return {**DEFAULT_RANGES, **self.ranges}

    @property
    def effective_downlink_client_id(self) -> str:
        """The downlink's MQTT client id: `downlink_client_id`, else `<client_id>-down`."""
        return self.downlink_client_id or f"{self.client_id}-down"

    @property
    def downlink_client_ids(self) -> tuple[str, ...]:
        """The client id of each downlink connection: the downlink's, then `<it>-1`, `<it>-2`, ..."""
        return downlink_lane_names(self.effective_downlink_client_id, self.downlink_connections)

    @property
    def downlink_usernames(self) -> tuple[str, ...] | None:
        """The login of each downlink connection (as `downlink_client_ids`); None: the bridge's own."""
        if self.downlink_username is None:
            return None
        return downlink_lane_names(self.downlink_username, self.downlink_connections)

    @model_validator(mode="after")
    def _check_mappings(self) -> Self:
        if self.downlink_password_file is not None and self.downlink_username is None:
            raise ValueError("downlink_password_file is set without downlink_username")
        if self.client_id in self.downlink_client_ids:
            raise ValueError(
                f"downlink client id {self.client_id!r} (of {', '.join(self.downlink_client_ids)}) is the "
                "uplink's client_id: each connection takes the other's session over"
            )
        for metric, (low, high) in self.ranges.items():
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"range of {metric!r} must be two finite numbers [low, high], low <= high")
        names = [rule.name for rule in self.mappings]
        if len(set(names)) != len(names):
            raise ValueError(f"mapping names must be unique, got {names}")
        for rule in self.mappings:
            if rule.kind == "telemetry" and rule.metric not in self.metrics:
                raise ValueError(
                    f"mapping {rule.name!r}: metric {rule.metric!r} is not in bridge.metrics "
                    f"{list(self.metrics)}"
                )
        return self


class DiskRunbookSettings(_Settings):
    """The disk-full runbook."""

    threshold: float = Field(default=90.0, gt=0, le=100)
    older_than_s: float = Field(default=3600.0, ge=0)
    command_ttl_s: float = Field(default=60.0, gt=0)
    result_timeout_s: float = Field(default=30.0, gt=0)
    cooldown_s: float = Field(default=300.0, ge=0)
    clear_below: float = Field(
        default=80.0,
        gt=0,
        le=100,
        description="a reading under this % after clear_temp resolves the incident",
    )
    verify_s: float = Field(default=60.0, gt=0, description="how long to wait for that reading")

    @model_validator(mode="after")
    def _clears_below_threshold(self) -> Self:
        if self.clear_below > self.threshold:
            raise ValueError(
                f"clear_below ({self.clear_below:g}) must not be above threshold ({self.threshold:g})"
            )
        return self


class PaymentRecoverySettings(_Settings):
    """The payment-recovery saga (`nerve.agents.payment`, docs/engine.md)."""

    source: Token = Field(default="shop", description="the service whose payment events it reacts to")
    wait_s: float = Field(default=3600.0, gt=0, le=30 * 86400.0, description="how long to wait for payment")
    command_ttl_s: float = Field(
        default=300.0, gt=0, le=86400.0, description="how long its commands are valid"
    )
    fallback_sources: tuple[Token, ...] = Field(
        default=(),
        max_length=8,
        description="other services (gateways) asked to offer another way to pay, in order, when the offer "
        "to `source` cannot be made",
    )
    person_route: Token | None = Field(
        default="payments",
        description="who offers by hand when no service could (a token for `nerve approve`); null: nobody",
    )
    person_expires_s: float = Field(
        default=4 * 3600.0, gt=0, le=30 * 86400.0, description="how long a person has to offer by hand"
    )

    @model_validator(mode="after")
    def _other_sources(self) -> Self:
        for index, service in enumerate(self.fallback_sources):
            if service == self.source or service in self.fallback_sources[:index]:
                raise ValueError(f"fallback_sources: {service!r} is the source or named twice")
        return self


class CentralSettings(_Settings):
    """The central agents."""

    keyid: str = "central"
    signing_key: Path | None = None
    device_keys_dir: Path | None = Field(
        default=None, description="registered device public keys `<device>.pub`; unset: <data_dir>/devices"
    )
    disk: DiskRunbookSettings = DiskRunbookSettings()
    payment: PaymentRecoverySettings = PaymentRecoverySettings()
    durable_agents: tuple[Token, ...] = Field(
        default=("disk", "payment_recovery"),
        max_length=64,
        description="the built-in durable agents central runs on its engine, by name; [] runs none",
    )
    # Defined below, beside the stream limits it uses (model_rebuild after it).
    engine: EngineSettings = Field(default_factory=lambda: EngineSettings())  # noqa: PLW0108 - defined below


#: The MQTT user name of the bridge on a site broker (`site.bridge_user`): no device may be called so.
DEFAULT_BRIDGE_USER: Final = "nerve-bridge"


def _host(value: str) -> str:
    # A name or an address that goes into a certificate and a URL: no scheme, port, path or space.
    if not value or len(value) > 253 or not re.fullmatch(r"[A-Za-z0-9._:-]+", value):  # noqa: PLR2004
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


Host = Annotated[str, AfterValidator(_host)]


class SiteSettings(_Settings):
    """The site broker and the devices it knows, kept by `nerve devices` (see docs/devices.md).

    The site CA, the broker's certificate, its password file and ACL live under `<data_dir>/site/`
    (`broker_dir` for the files mosquitto reads); devices' public keys in `central.device_keys_dir`.
    """

    hosts: tuple[Host, ...] = Field(
        default=(), description="the broker's host names / IPs for its certificate; the first is in bundles"
    )
    port: int = Field(default=8883, ge=1, le=65535, description="the site broker's TLS listener")
    broker_dir: Path | None = Field(
        default=None, description="where the files mosquitto reads are written; unset: <data_dir>/site/broker"
    )
    broker_user: str | None = Field(
        default=None,
        min_length=1,
        description="the user mosquitto reads its files as (Debian: mosquitto); they are given to it "
        "(needs root); unset: they stay the caller's",
    )
    broker_pid_file: Path | None = Field(
        default=None, description="mosquitto's pid_file: `nerve devices` sends it SIGHUP to reload"
    )
    bridge_user: Annotated[str, AfterValidator(lambda v: check_token(v, "bridge user"))] = DEFAULT_BRIDGE_USER
    device_dir: Path = Field(
        default=Path("/etc/nerve"), description="where a device bundle's files go on the device"
    )
    ca_days: int = Field(default=3650, ge=1, le=36500, description="validity of a new site CA")
    server_days: int = Field(default=825, ge=1, le=36500, description="validity of a broker certificate")

    @property
    def downlink_user(self) -> str:
        """The MQTT user name of the bridge's downlink on the site broker: `<bridge_user>-down`."""
        return f"{self.bridge_user}-down"


MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
_DAY_S: Final = 24 * 3600.0
# The smallest byte limit a stream may have: one message of NATS's default max_payload (1 MiB).
MIN_STREAM_BYTES: Final = MIB
# The shortest age limit: an hour, above JetStream's 20-minute dedup window (which may not exceed it).
MIN_STREAM_AGE_S: Final = 3600.0
#: How long JetStream remembers a reading's id (`streams.telemetry.duplicate_window_s`). nats-server keeps
#: every id of the window in its heap, and its garbage collector marks them all every few seconds, taking
#: CPU from every part on the box. At 10,000 readings/s (`bench/fleet.py`, nats-server 2.15.1, 2 cores)
#: 2 minutes held 1.2 million ids: nats-server's RSS 1.1 GiB, each mark 200-350 ms, and the slowest
#: spike -> command paths each fell in one; 30 s: RSS 0.7 GiB, marks about 120 ms (docs/streams.md).
#: 30 s covers what sends a stored reading again: mosquitto redelivering once the bridge reconnects
#: (systemd restarts it after 2 s, reconnects back off to 10 s at most), an edge resending what was in
#: flight when its connection dropped (its reconnects too).
TELEMETRY_DUPLICATE_WINDOW_S: Final = 30.0


class StreamLimits(_Settings):
    """The limits of one JetStream stream: bytes on disk and age. See docs/streams.md."""

    max_bytes: int = Field(ge=MIN_STREAM_BYTES, description="bytes the stream may hold on disk")
    max_age_s: float = Field(ge=MIN_STREAM_AGE_S, description="seconds a message is kept at most")


#: How many bytes JetStream counts against `max_bytes` per byte of disk s2-compressed telemetry takes, at
#: least. nats-server counts a stream's bytes before compression (its limits and its reservations against
#: `max_file_store` alike); bench/telemetry_storage.py measured 3.9 for raw readings the bridge wraps and
#: 4.0 for binary-mode readings with ids of their own (2.8 on a small stream). 2.5 leaves room below.
COMPRESSION_CREDIT: Final = 2.5
_WEEK_S: Final = 7 * _DAY_S


class TelemetryLimits(_Settings):
    """The telemetry stream's limits: the disk it may take, and an age. See docs/streams.md, "Telemetry".

    `max_bytes`, what JetStream is told, is `disk_budget` times `COMPRESSION_CREDIT` with s2 compression (it
    counts bytes before compression), `disk_budget` itself without.
    """

    disk_budget: int = Field(
        default=800 * MIB, ge=MIN_STREAM_BYTES, description="bytes of disk the telemetry stream may take"
    )
    max_age_s: float = Field(default=_WEEK_S, ge=MIN_STREAM_AGE_S, description="seconds a reading is kept")
    compression: Literal["s2", "none"] = Field(
        default="s2", description="how JetStream stores readings on disk (s2 needs nats-server 2.10 or later)"
    )
    duplicate_window_s: float = Field(
        default=TELEMETRY_DUPLICATE_WINDOW_S,
        ge=1.0,
        le=MIN_STREAM_AGE_S,
        description="seconds JetStream remembers a reading's id to store it once; nats-server keeps every "
        "id of the window in memory (about 450 bytes of RSS each): readings/s x this",
    )

    @model_validator(mode="before")
    @classmethod
    def _max_bytes_is_now_a_disk_budget(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic's raw input
        if isinstance(data, dict) and "max_bytes" in data:
            raise ValueError(
                "max_bytes is replaced by disk_budget, the bytes of disk telemetry may take "
                '(JetStream\'s max_bytes is derived from it: docs/streams.md, "Telemetry")'
            )
        return data

    @property
    def max_bytes(self) -> int:
        """What JetStream's `max_bytes` is set to (bytes before compression)."""
        return int(self.disk_budget * COMPRESSION_CREDIT) if self.compression == "s2" else self.disk_budget


class StreamsSettings(_Settings):
    """Limits of every stream nerve keeps, sized for a site box with 10 GiB of disk for JetStream.

    What happens at a limit is fixed per stream (docs/streams.md): telemetry, events and dead letters drop
    their oldest messages; commands, results and facts refuse new ones (the publisher is told). The
    defaults add up to 9.95 GiB as JetStream counts them (and reserves them against its max_file_store):
    telemetry 2000 MiB (800 MiB of disk, s2-compressed), events 1 GiB, commands 256 MiB, results 256 MiB,
    facts 6 GiB, dead letters 512 MiB; 8.8 GiB of disk at most.
    """

    telemetry: TelemetryLimits = TelemetryLimits()
    events: StreamLimits = StreamLimits(max_bytes=1 * GIB, max_age_s=30 * _DAY_S)
    commands: StreamLimits = StreamLimits(max_bytes=256 * MIB, max_age_s=7 * _DAY_S)
    results: StreamLimits = StreamLimits(max_bytes=256 * MIB, max_age_s=30 * _DAY_S)
    facts: StreamLimits = StreamLimits(max_bytes=6 * GIB, max_age_s=10 * 365 * _DAY_S)
    deadletter: StreamLimits = StreamLimits(max_bytes=512 * MIB, max_age_s=30 * _DAY_S)
    facts_warn_at: float = Field(
        default=0.8, gt=0, lt=1, description="share of facts.max_bytes at which nerve warns (log + fact)"
    )
    check_interval_s: float = Field(default=60.0, gt=0, description="how often central checks stream usage")
    sample_window_s: float = Field(
        default=60.0, gt=0, description="refusals from outside: at most one fact per key per window"
    )
    sample_max_keys: int = Field(
        default=100, ge=1, le=100_000, description="keys sampled apart per window; the rest share one key"
    )


#: The largest run record a bucket may be told to hold (JetStream's own default max payload is 1 MiB).
MAX_RECORD_BYTES: Final = 8 * MIB


class EngineSettings(_Settings):
    """How the durable agent engine runs (`central.engine`; docs/engine.md, "Limits").

    `lease_s` is how long a run stays claimed by a process that stopped renewing it: after a crash, another
    engine resumes the run that much later at most. It must be longer than the clocks of two engines can
    disagree (the fencing token keeps the journal right even then; only a step's effect could run twice).
    """

    lease_s: float = Field(default=15.0, ge=1.0, le=3600.0, description="seconds a claim on a run lasts")
    max_live_runs: int = Field(default=1000, ge=1, description="runs one process executes at once")
    max_waiting_runs: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="runs one process holds waiting (for an event, a result, a decision) without a slot",
    )
    max_record_bytes: int = Field(
        default=1 * MIB, ge=64 * 1024, le=MAX_RECORD_BYTES, description="largest journal of one run"
    )
    max_steps: int = Field(default=1000, ge=1, description="steps one run may take")
    max_sleep_s: float = Field(default=30 * _DAY_S, gt=0, description="longest sleep or wait timeout")
    limits_max_bytes: int = Field(
        default=64 * MIB,
        ge=1 * MIB,
        description="bytes of nerve_limits and of nerve_lineage",
    )
    loop_window_s: float = Field(
        default=_DAY_S, gt=0, description="how long the loop guard remembers which runs a chain started"
    )
    limit_facts_window_s: float = Field(
        default=60.0, gt=0, description="after a limit's first fact per key, one counted fact per window"
    )
    limit_facts_max_keys: int = Field(default=100, ge=1, description="keys told apart in limit facts")
    fleet_size: int = Field(
        default=0, ge=0, description="devices in the fleet for blast-radius percentages (0: the registry's)"
    )
    runs: StreamLimits = StreamLimits(max_bytes=1 * GIB, max_age_s=90 * _DAY_S)
    timers: StreamLimits = StreamLimits(max_bytes=256 * MIB, max_age_s=90 * _DAY_S)

    @model_validator(mode="after")
    def _sleeps_fit(self) -> Self:
        """A run parked for `max_sleep_s` must outlive it: the journal and the timer are aged out after."""
        longest = min(self.runs.max_age_s, self.timers.max_age_s)
        if self.max_sleep_s >= longest:
            raise ValueError(
                f"max_sleep_s ({self.max_sleep_s:g}) must be shorter than runs.max_age_s and "
                f"timers.max_age_s ({longest:g}): a parked run would be aged out before it wakes"
            )
        return self

    @property
    def renew_s(self) -> float:
        """How often a live run's lease is renewed: three times per lease."""
        return self.lease_s / 3


CentralSettings.model_rebuild()


class Settings(_Settings):
    """Everything, for every part."""

    prefix: Annotated[str, AfterValidator(check_prefix)] = DEFAULT_PREFIX
    data_dir: Path = Path(".nerve")
    mqtt: MqttSettings = MqttSettings()
    nats: NatsSettings = NatsSettings()
    edge: EdgeSettings = EdgeSettings()
    bridge: BridgeSettings = BridgeSettings()
    central: CentralSettings = CentralSettings()
    streams: StreamsSettings = StreamsSettings()
    site: SiteSettings = SiteSettings()

    @model_validator(mode="after")
    def _check_mapping_topics(self) -> Self:
        if self.bridge.max_payload >= self.mqtt.max_packet_size:
            # Else the broker drops what lies between, unseen, instead of the bridge dead-lettering it.
            raise ValueError(
                f"bridge.max_payload ({self.bridge.max_payload}) must be below mqtt.max_packet_size "
                f"({self.mqtt.max_packet_size})"
            )
        if self.bridge.downlink_username is not None and urlsplit(self.mqtt.url).username is not None:
            raise ValueError(
                "bridge.downlink_username is set but mqtt.url carries the bridge's credentials: give them "
                "as mqtt.username and mqtt.password_file instead"
            )
        lane_logins = self.bridge.downlink_usernames or ()
        if self.mqtt.username is not None and self.mqtt.username in lane_logins:
            # A broker that makes the login the client id (the site broker) would give both one session.
            raise ValueError(
                f"mqtt.username {self.mqtt.username!r} is one of the downlink's logins "
                f"({', '.join(lane_logins)}): the uplink and that connection would take each other's "
                "session over"
            )
        first = self.prefix.split("/")[0]
        for rule in self.bridge.mappings:
            if rule.topic.split("/")[0] in {first, "+", "#"}:
                raise ValueError(
                    f"mapping {rule.name!r}: topic {rule.topic!r} overlaps nerve's own topics "
                    f"under {self.prefix!r}/; mappings are for foreign topics"
                )
        return self


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nested(path: list[str], value: object) -> dict[str, Any]:
    tree: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        tree = {key: tree}
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read settings file: {exc.strerror}", source=str(path)) from None
    import yaml  # noqa: PLC0415 - ~10 ms at each start: only when there is a file (see _env_value)

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("the top level must be a mapping of keys", source=str(path))
    return document


# `NERVE_*` variables that are not settings. Every other `NERVE_*` variable must name one: a typo in a
# variable name is an error, never a setting silently left at its default.
NOT_SETTINGS: Final = frozenset({"NERVE_CONFIG"})
# What to say about a variable that looks like ours but is someone else's.
_NOT_OURS: Final = {
    "NERVE_ARGS": "it is the Makefile's (`make run ARGS=...`), not a setting: unset it or pass it to make",
}


def _env_layer(env: Mapping[str, str], origins: dict[tuple[str, ...], str]) -> dict[str, Any]:
    """The settings that `NERVE_*` variables in `env` set; `origins` learns which variable set which key."""
    layer: dict[str, Any] = {}
    sections = Settings.model_fields
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = [level.lower() for level in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError("empty level in variable name", source="environment", key=name)
        if path[0] not in sections:
            known = ", ".join(sections)
            hint = _NOT_OURS.get(name) or f"{path[0]!r} is not a setting (settings: {known}; levels: __)"
            raise ConfigError(hint, source="environment", key=name)
        origins[tuple(path)] = name
        layer = _merge(layer, _nested(path, _env_value(raw)))
    return layer


# A value YAML can only read as one scalar: a letter, digit, `_` or `/` first, then no space and no
# indicator that could start a list, a mapping, a tag, an anchor or a comment; not ending with `:`
# (`a:` is a mapping). Such a value is not parsed: importing PyYAML costs every start ~10 ms.
_PLAIN_SCALAR: Final = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./:+=,@-]*(?<!:)")
# What YAML reads as null among those (`~` and the empty value are not plain scalars here).
_YAML_NULLS: Final = frozenset({"null", "Null", "NULL"})


def _env_value(raw: str) -> object:
    """The value of one `NERVE_*` variable: the list or mapping YAML reads in it, None, or `raw` itself.

    None is YAML's null (`null`, `~`, an empty document). A scalar stays text: pydantic reads "85" or
    "true" by the key's type, and a device id `123`, `001` or `yes` stays the string it is (YAML would
    make it 123, 1, True). Text that YAML cannot read stays text too.
    """
    if not raw or _PLAIN_SCALAR.fullmatch(raw):
        return None if raw in _YAML_NULLS else raw
    import yaml  # noqa: PLC0415 - only for a value that may be more than one scalar (see _PLAIN_SCALAR)

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return value if value is None or isinstance(value, dict | list) else raw


def _variable(loc: tuple[str | int, ...], origins: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set the key at `loc`, or one of its parents (`NERVE_EDGE__MOUNTS` for an item)."""
    path = tuple(str(part) for part in loc)
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return None


def _explain(
    exc: ValidationError,
    layers: list[tuple[str, dict[str, Any]]],
    origins: Mapping[tuple[str, ...], str],
) -> ConfigError:
    error = exc.errors()[0]
    key = ".".join(str(loc) for loc in error["loc"])
    source = "settings"
    missing = object()  # a key set to null in a layer still names that layer
    for name, layer in layers:
        node: Any = layer
        for loc in error["loc"]:
            if isinstance(node, dict):
                node = node.get(str(loc), missing)
            elif isinstance(node, list | tuple) and isinstance(loc, int) and 0 <= loc < len(node):
                node = node[loc]  # an item of a list setting (bridge.metrics.1)
            else:
                node = missing
        if node is not missing:
            source = name
    message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix says nothing to a user
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see configs/ for every key)"
    variable = _variable(tuple(error["loc"]), origins) if source == "environment" else None
    if variable is not None:
        message += f"; set by {variable}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(message, source=source, key=key)


def load_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from a YAML file, `NERVE_*` variables in `env`, then `overrides`.

    `overrides` is a nested mapping (from CLI flags). Raises `ConfigError` naming the source (the file,
    `environment` or `command line`), the key and what was expected; for a variable, its name too. A
    `NERVE_*` variable that names no setting is an error (except `NERVE_CONFIG`, the file's own).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        layers.append((str(path), _read_yaml(path)))
    if env:
        layers.append(("environment", _env_layer(env, origins)))
    if overrides:
        layers.append(("command line", dict(overrides)))
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged = _merge(merged, layer)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise _explain(exc, layers, origins) from None
