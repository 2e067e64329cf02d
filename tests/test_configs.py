"""The example configs we ship load, and a typo in one is an error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nerve.runtime.config.settings import (
    EdgeSettings,
    MqttSettings,
    OutboxSettings,
    SensorSettings,
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
