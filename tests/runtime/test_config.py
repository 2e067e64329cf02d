"""nerve.runtime.config.settings: defaults, layering (file < env < overrides) and clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nerve.runtime.config.settings import (
    DEFAULT_METRICS,
    BridgeSettings,
    MqttSettings,
    NatsSettings,
    Settings,
    host_port,
    load_settings,
)
from nerve.runtime.envelope.codec import Codec
from nerve.runtime.errors import ConfigError, NerveError


def write(tmp_path: Path, text: str, name: str = "nerve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **kwargs)
    assert isinstance(info.value, NerveError)
    return info.value


# --- defaults ------------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.prefix == "nerve"
    assert settings.data_dir == Path(".nerve")
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883"
    assert settings.mqtt.keepalive_s == 30
    assert settings.mqtt.session_expiry_s == 7 * 24 * 3600
    assert settings.nats.url == "nats://127.0.0.1:4222"
    assert settings.nats.connect_timeout_s == 5.0
    assert settings.edge.device is None
    assert settings.edge.mounts == ("/",)
    assert settings.edge.trusted_keys == {}
    assert settings.edge.clock_skew_s == 30.0
    assert settings.bridge.max_payload == 64 * 1024
    assert settings.bridge.metrics == DEFAULT_METRICS
    assert "disk" in settings.bridge.metrics
    assert settings.central.keyid == "central"
    assert settings.central.disk.threshold == 90.0
    assert settings.central.disk.cooldown_s == 300.0


def test_empty_env_and_overrides_are_defaults() -> None:
    assert load_settings(env={}, overrides={}) == Settings()


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == Settings()
    assert load_settings(write(tmp_path, "# only a comment\n")) == Settings()


def test_library_code_does_not_read_the_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERVE_MQTT__URL", "mqtt://from-os-environ:1883")
    assert load_settings().mqtt.url == "mqtt://127.0.0.1:1883"
    assert load_settings(env=os.environ).mqtt.url == "mqtt://from-os-environ:1883"


# --- layering ------------------------------------------------------------------------------------------

FILE = """
prefix: acme/nerve
data_dir: /var/lib/nerve
mqtt:
  url: mqtt://broker.local:1883
  keepalive_s: 60
edge:
  device: pi-01
  mounts: [/, /data]
central:
  disk:
    threshold: 80
    cooldown_s: 10
"""


def test_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE))
    assert settings.prefix == "acme/nerve"
    assert settings.data_dir == Path("/var/lib/nerve")
    assert settings.mqtt.url == "mqtt://broker.local:1883"
    assert settings.mqtt.keepalive_s == 60
    assert settings.edge.device == "pi-01"
    assert settings.edge.mounts == ("/", "/data")
    assert settings.central.disk.threshold == 80.0
    assert settings.central.disk.cooldown_s == 10.0
    # keys the file does not mention keep their defaults, even beside ones it does
    assert settings.mqtt.session_expiry_s == 7 * 24 * 3600
    assert settings.central.disk.older_than_s == 3600.0
    assert settings.nats == NatsSettings()


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {
        "NERVE_MQTT__URL": "mqtt://other:1884",
        "NERVE_CENTRAL__DISK__THRESHOLD": "85",
        "NERVE_EDGE__MOUNTS": "[/, /srv]",
        "HOME": "/root",  # not ours
        "NERVE_CONFIG": "/etc/nerve.yaml",  # the file's own variable, not a setting
    }
    settings = load_settings(write(tmp_path, FILE), env=env)
    assert settings.mqtt.url == "mqtt://other:1884"
    assert settings.mqtt.keepalive_s == 60  # from the file, untouched by the sibling variable
    assert settings.central.disk.threshold == 85.0
    assert settings.central.disk.cooldown_s == 10.0
    assert settings.edge.mounts == ("/", "/srv")
    assert settings.edge.device == "pi-01"


def test_env_names_are_case_insensitive_below_the_prefix() -> None:
    assert load_settings(env={"NERVE_Mqtt__Url": "mqtt://h:1"}).mqtt.url == "mqtt://h:1"


def test_env_value_is_yaml() -> None:
    settings = load_settings(
        env={"NERVE_EDGE__TRUSTED_KEYS": "{central: abc}", "NERVE_MQTT__KEEPALIVE_S": "45"}
    )
    assert settings.edge.trusted_keys == {"central": "abc"}
    assert settings.mqtt.keepalive_s == 45


def test_env_value_that_is_not_yaml_is_a_string() -> None:
    settings = load_settings(env={"NERVE_EDGE__DEVICE": "pi-01", "NERVE_CENTRAL__KEYID": "a: b: c"})
    assert settings.edge.device == "pi-01"
    assert settings.central.keyid == "a: b: c"


def test_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, FILE),
        env={"NERVE_MQTT__URL": "mqtt://env:1883", "NERVE_CENTRAL__DISK__THRESHOLD": "85"},
        overrides={"mqtt": {"url": "mqtt://flag:1883"}},
    )
    assert settings.mqtt.url == "mqtt://flag:1883"
    assert settings.mqtt.keepalive_s == 60
    assert settings.central.disk.threshold == 85.0


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.prefix = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.mqtt.url = "mqtt://x:1"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.central.disk.threshold = 1  # type: ignore[misc]


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  urll: mqtt://x:1883\n")
    error = config_error(path)
    assert error.source == str(path)
    assert error.key == "mqtt.urll"
    assert str(error).startswith(f"{path}: mqtt.urll: unknown key")


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "mqqt:\n  url: mqtt://x:1883\n"))
    assert error.key == "mqqt"


def test_unknown_key_in_env() -> None:
    error = config_error(env={"NERVE_MQTT__URLL": "mqtt://x:1883"})
    assert (error.source, error.key) == ("environment", "mqtt.urll")


def test_unknown_key_in_overrides() -> None:
    error = config_error(overrides={"bridge": {"metric": ["disk"]}})
    assert (error.source, error.key) == ("command line", "bridge.metric")


def test_wrong_type_in_env_names_key_and_environment(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, FILE), env={"NERVE_CENTRAL__DISK__THRESHOLD": "high"})
    assert error.source == "environment"
    assert error.key == "central.disk.threshold"
    assert str(error).startswith("environment: central.disk.threshold: ")
    assert "number" in str(error)


def test_wrong_type_in_file_names_the_file(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "mqtt:\n  keepalive_s: often\n", "bad.yaml"))
    assert error.source == str(tmp_path / "bad.yaml")
    assert error.key == "mqtt.keepalive_s"


def test_value_out_of_range() -> None:
    error = config_error(overrides={"central": {"disk": {"threshold": 101}}})
    assert (error.source, error.key) == ("command line", "central.disk.threshold")
    assert "100" in str(error)


def test_null_in_file_is_blamed_on_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  keepalive_s: null\n")
    error = config_error(path)
    assert (error.source, error.key) == (str(path), "mqtt.keepalive_s")


def test_bad_list_item_is_blamed_on_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "bridge:\n  metrics: [disk, bad$metric]\n")
    error = config_error(path)
    assert (error.source, error.key) == (str(path), "bridge.metrics.1")
    assert "bad$metric" in str(error)
    error = config_error(env={"NERVE_BRIDGE__METRICS": "[disk, cpu, 'x y']"})
    assert (error.source, error.key) == ("environment", "bridge.metrics.2")


def test_several_problems_are_counted() -> None:
    error = config_error(overrides={"mqtt": {"urll": 1, "keepalive_s": 1, "session_expiry_s": -1}})
    assert "(and 2 more problems)" in str(error)
    error = config_error(overrides={"mqtt": {"urll": 1, "keepalive_s": 1}})
    assert "(and 1 more problem)" in str(error)


@pytest.mark.parametrize(
    "url", ["http://x:1883", "x:1883", "mqtt://", "mqtt://x:notaport", "mqtt://x:99999", "nats://x:4222"]
)
def test_bad_mqtt_url(url: str) -> None:
    error = config_error(env={"NERVE_MQTT__URL": url})
    assert (error.source, error.key) == ("environment", "mqtt.url")


@pytest.mark.parametrize("url", ["mqtt://x:1883", "tcp://10.0.0.1:1883", "mqtt://broker"])
def test_good_mqtt_url(url: str) -> None:
    assert load_settings(overrides={"mqtt": {"url": url}}).mqtt.url == url


@pytest.mark.parametrize("url", ["mqtt://x:4222", "nats://a:4222,http://b:4222", "nats://", "nats://a:x"])
def test_bad_nats_url(url: str) -> None:
    error = config_error(overrides={"nats": {"url": url}})
    assert error.key == "nats.url"
    assert "expected nats://host:port" in str(error) or "port" in str(error).lower()


def test_nats_url_list() -> None:
    url = "nats://a:4222, tls://b:4223"
    assert load_settings(overrides={"nats": {"url": url}}).nats.url == url


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    error = config_error(path)
    assert error.source == str(path)
    assert "cannot read settings file" in str(error)
    assert "No such file" in str(error)


def test_file_is_a_directory(tmp_path: Path) -> None:
    error = config_error(tmp_path)
    assert error.source == str(tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt: [unclosed\n")
    error = config_error(path)
    assert error.source == str(path)
    assert "not valid YAML" in str(error)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    error = config_error(path)
    assert error.source == str(path)
    assert "top level must be a mapping" in str(error)


@pytest.mark.parametrize("prefix", ["", "ac.me", "acme/", "acme//nerve", "nerve/+", "nerve/#", "ne rve"])
def test_invalid_prefix(prefix: str) -> None:
    error = config_error(overrides={"prefix": prefix})
    assert error.key == "prefix"
    assert "prefix" in str(error)


@pytest.mark.parametrize("device", ["bad$id", "pi.01", "", "x" * 65, "pï", "+", "pi 01"])
def test_invalid_device_id(device: str) -> None:
    error = config_error(env={"NERVE_EDGE__DEVICE": device})
    assert (error.source, error.key) == ("environment", "edge.device")
    assert "device id" in str(error)


@pytest.mark.parametrize("device", ["#", "+", "bad$id"])
def test_invalid_device_id_in_overrides(device: str) -> None:
    error = config_error(overrides={"edge": {"device": device}})
    assert (error.source, error.key) == ("command line", "edge.device")


@pytest.mark.parametrize("device", ["123", "001", "0x1F", "yes", "off", "true", "2026-01-01", "1e3", "1_000"])
def test_device_ids_that_look_like_yaml_scalars_stay_text(device: str) -> None:
    # YAML would read these as 123, 1, 31, True, False, True, a date, 1000.0, 1000: all valid device ids.
    assert load_settings(env={"NERVE_EDGE__DEVICE": device}).edge.device == device


def test_scalar_env_values_are_read_by_the_key_type() -> None:
    env = {
        "NERVE_CENTRAL__DISK__THRESHOLD": "85.5",
        "NERVE_MQTT__KEEPALIVE_S": "45",
        "NERVE_EDGE__INTERVAL_S": "1e1",
        "NERVE_CENTRAL__KEYID": "2026",
    }
    settings = load_settings(env=env)
    assert settings.central.disk.threshold == 85.5
    assert settings.mqtt.keepalive_s == 45
    assert settings.edge.interval_s == 10.0
    assert settings.central.keyid == "2026"


def test_env_null_unsets(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE), env={"NERVE_EDGE__DEVICE": "null"})
    assert settings.edge.device is None


def test_empty_level_in_variable_name() -> None:
    error = config_error(env={"NERVE_MQTT____URL": "mqtt://x:1"})
    assert error.source == "environment"
    assert error.key == "NERVE_MQTT____URL"


def test_config_error_message_layout() -> None:
    assert str(ConfigError("bad", source="f.yaml", key="a.b")) == "f.yaml: a.b: bad"
    assert str(ConfigError("bad", key="a.b")) == "a.b: bad"
    assert str(ConfigError("bad")) == "bad"


# --- helpers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker:1884", ("broker", 1884)),
        ("mqtt://broker", ("broker", 1883)),
        ("nats://a:4223, nats://b:4224", ("a", 4223)),
    ],
)
def test_host_port(url: str, expected: tuple[str, int]) -> None:
    assert host_port(url, 1883) == expected


def test_sub_models_refuse_unknown_keys() -> None:
    for model in (MqttSettings, NatsSettings, BridgeSettings):
        with pytest.raises(ValidationError, match=re.escape("Extra inputs are not permitted")):
            model.model_validate({"nope": 1})


def test_nats_codec() -> None:
    assert load_settings().nats.codec is Codec.MSGPACK
    assert load_settings(env={"NERVE_NATS__CODEC": "json"}).nats.codec is Codec.JSON
    with pytest.raises(ConfigError, match=r"nats\.codec") as caught:
        load_settings(env={"NERVE_NATS__CODEC": "xml"})
    assert "json" in str(caught.value)
    assert "msgpack" in str(caught.value)


def test_the_engine_settings_are_central_engine(tmp_path: Path) -> None:
    """`central.engine` is the engine's `EngineSettings`, from a file or the environment like any key."""
    from nerve.runtime.engine import EngineSettings  # noqa: PLC0415 - the engine re-exports the one model

    config = tmp_path / "nerve.yaml"
    engine = "lease_s: 5, max_sleep_s: 3600, runs: {max_bytes: 2097152, max_age_s: 86400}"
    config.write_text(f"central:\n  engine: {{{engine}}}\n")
    settings = load_settings(config, env={"NERVE_CENTRAL__ENGINE__MAX_STEPS": "50"})
    assert isinstance(settings.central.engine, EngineSettings)
    assert (settings.central.engine.lease_s, settings.central.engine.max_steps) == (5.0, 50)
    assert settings.central.engine.runs.max_bytes == 2097152
    with pytest.raises(ConfigError, match=r"central\.engine\.leas: unknown key"):
        load_settings(overrides={"central": {"engine": {"leas": 3}}})
    # A sleep longer than the runs are kept is refused: the run would be aged out before it woke.
    with pytest.raises(ConfigError, match="max_sleep_s"):
        load_settings(overrides={"central": {"engine": {"runs": {"max_bytes": 2097152, "max_age_s": 86400}}}})


def test_the_disk_runbook_clears_below_its_threshold() -> None:
    with pytest.raises(ConfigError, match=r"clear_below \(95\) must not be above threshold \(90\)"):
        load_settings(overrides={"central": {"disk": {"clear_below": 95}}})
