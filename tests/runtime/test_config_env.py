"""`NERVE_*` variables: every one is a setting or an error naming it; none passes silently."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.config.settings import NOT_SETTINGS, Settings, _env_value, load_settings
from nerve.runtime.errors import ConfigError

SECTIONS = set(Settings.model_fields)


def test_a_variable_that_names_no_setting_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NERVE_MQQT__URL": "mqtt://x:1883"})
    assert (caught.value.source, caught.value.key) == ("environment", "NERVE_MQQT__URL")
    assert "'mqqt' is not a setting" in str(caught.value)


def test_nerve_args_is_the_makefiles_and_says_so() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NERVE_ARGS": "--device x"})
    assert caught.value.key == "NERVE_ARGS"
    assert "make run ARGS=" in str(caught.value)


def test_nerve_config_is_not_a_setting() -> None:
    assert "NERVE_CONFIG" in NOT_SETTINGS
    assert load_settings(env={"NERVE_CONFIG": "/etc/nerve.yaml"}) == Settings()


def test_an_unknown_key_names_the_variable_that_set_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NERVE_MQTT__URLL": "mqtt://x:1883"})
    assert (caught.value.source, caught.value.key) == ("environment", "mqtt.urll")
    assert str(caught.value).startswith("environment: mqtt.urll: unknown key")
    assert "set by NERVE_MQTT__URLL" in str(caught.value)


def test_a_bad_list_item_names_the_variable_of_the_list() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NERVE_BRIDGE__METRICS": "[disk, 'x y']"})
    assert caught.value.key == "bridge.metrics.1"
    assert "set by NERVE_BRIDGE__METRICS" in str(caught.value)


def test_a_bad_flag_does_not_blame_a_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"mqtt": {"keepalive_s": 1}}, env={"NERVE_NATS__URL": "nats://h:1"})
    assert caught.value.source == "command line"
    assert "set by" not in str(caught.value)


@given(
    name=st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True).filter(
        lambda n: n.lower().split("__")[0] not in SECTIONS and f"NERVE_{n}" not in NOT_SETTINGS
    ),
    value=st.text(max_size=20),
)
def test_no_variable_outside_the_settings_passes_silently(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={f"NERVE_{name}": value})
    assert caught.value.source == "environment"
    assert caught.value.key == f"NERVE_{name}"


def yaml_reading(raw: str) -> object:
    """A variable's value by definition: the list or mapping YAML reads, YAML's null, else the text."""
    try:
        value = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        return raw
    return value if value is None or isinstance(value, dict | list) else raw


# Pieces that make YAML read a collection, a null, a tag, a comment or an error, and plain text around them.
YAML_PIECES = st.sampled_from(
    [*"aZ09_/.:+=,@-~ #[]{}!&*?%|>'\"\n\t<`", "null", "Null", "NULL", "...", "---", "- ", ": ", "true", "é"]
)


@given(raw=st.lists(YAML_PIECES, max_size=8).map("".join))
def test_a_value_is_read_as_yaml_reads_it_even_when_yaml_is_not_imported(raw: str) -> None:
    # _env_value skips the parser for plain scalars (PyYAML's import costs every start): same result.
    assert _env_value(raw) == yaml_reading(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("/var/lib/nerve-edge", "/var/lib/nerve-edge"),
        ("001", "001"),
        ("null", None),
        ("~", None),
        ("a:", {"a": None}),
        ("[/, /data]", ["/", "/data"]),
        ("", ""),
    ],
)
def test_plain_values_lists_mappings_and_nulls(raw: str, expected: object) -> None:
    assert _env_value(raw) == expected
