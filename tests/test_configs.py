"""The example configs we ship load, and a typo in one is an error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nerve.runtime.config.settings import (
    EdgeSettings,
    MqttSettings,
    OutboxSettings,
    SensorSettings,
    SiteSettings,
    load_settings,
)
from nerve.runtime.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECURITY_KEYS = ("url", "ca_file", "cert_file", "key_file", "username", "password_file", "max_packet_size")


@pytest.mark.parametrize("name", ["nerve.yaml", "edge.yaml", "bridge.yaml", "central.yaml"])
def test_example_config_loads(name: str) -> None:
    settings = load_settings(CONFIGS / name)
    assert settings.prefix == "nerve"


def test_typo_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text((CONFIGS / "edge.yaml").read_text().replace("  interval_s:", "  intervall_s:", 1))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)
    assert "edge.intervall_s" in str(caught.value)


def test_systemd_units_run_the_nerve_command() -> None:
    for part in ("edge", "bridge", "central"):
        unit = (CONFIGS / "systemd" / f"nerve-{part}.service").read_text()
        assert f"nerve {part} --config /etc/nerve/{part}.yaml" in unit


@pytest.mark.parametrize("model", [EdgeSettings, SensorSettings, OutboxSettings])
def test_edge_yaml_shows_every_edge_key(model: type[EdgeSettings | SensorSettings | OutboxSettings]) -> None:
    # Shown as a key, set or commented out: configs/edge.yaml is where a user finds what exists.
    text = (CONFIGS / "edge.yaml").read_text()
    missing = [key for key in model.model_fields if f"{key}:" not in text]
    assert not missing, f"configs/edge.yaml does not mention {missing}"


def test_edge_yaml_sensor_settings() -> None:
    edge = load_settings(CONFIGS / "edge.yaml").edge
    assert edge.heartbeat_s == 300
    assert edge.sensors["disk"].interval_s == 60
    assert edge.outbox.max_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize("name", ["nerve.yaml", "edge.yaml", "bridge.yaml"])
def test_mqtt_keys_are_shown(name: str) -> None:
    # nerve.yaml shows every key; the parts' files how to reach a remote broker.
    text = (CONFIGS / name).read_text()
    keys = MqttSettings.model_fields if name == "nerve.yaml" else SECURITY_KEYS
    missing = [key for key in keys if f"{key}:" not in text]
    assert not missing, f"configs/{name} does not mention {missing}"


def _settings_lines(name: str) -> list[str]:
    return [line for line in (CONFIGS / name).read_text().splitlines() if line and not line.startswith("#")]


def test_the_site_broker_config_makes_the_loopback_ones_choices() -> None:
    # Persistence, autosave, nodelay, no silent QoS1 drop, the packet limit: the same lines in both files.
    site = _settings_lines("mosquitto-site.conf")
    shared = [
        line
        for line in _settings_lines("mosquitto.conf")
        if line.split()[0] not in {"listener", "allow_anonymous", "pid_file"}
    ]
    assert [line for line in shared if line not in site] == []


def test_the_site_broker_config_takes_only_logged_in_clients_over_tls() -> None:
    lines = _settings_lines("mosquitto-site.conf")
    keys = [line.split()[0] for line in lines]
    listeners = [i for i, key in enumerate(keys) if key == "listener"]
    assert len(listeners) == 1, "one listener: another would need its own TLS lines"
    first = listeners[0]
    # Global (before the listener: mosquitto 2.0 ties them to the listener they follow otherwise) ...
    for line in ("per_listener_settings false", "allow_anonymous false"):
        assert line in lines[:first]
    for key in ("password_file", "acl_file"):
        assert key in keys[:first]
    # ... and the listener's own: TLS, and the client id tied to the login (after it, see the file).
    assert {"cafile", "certfile", "keyfile", "use_username_as_clientid"} <= set(keys[first:])
    assert "require_certificate" not in keys  # logins, not client certificates: one identity per device


def test_every_line_of_the_site_broker_config_says_why() -> None:
    # Each setting belongs to a block of lines that starts with a comment.
    previous = ""
    for line in (CONFIGS / "mosquitto-site.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            assert previous, f"{line!r} has no comment saying why"
        if not line:
            previous = ""
        elif line.startswith("#") or previous:
            previous = line


def test_nerve_yaml_shows_every_site_key() -> None:
    text = (CONFIGS / "nerve.yaml").read_text()
    missing = [key for key in SiteSettings.model_fields if f"{key}:" not in text]
    assert not missing, f"configs/nerve.yaml does not mention site.{missing}"
