"""MQTT beyond localhost: TLS, client certificates, credentials, and refusals that say why in one line.

Against a real mosquitto (`secure_mosquitto`: TLS listeners with certificates made by trustme, a password
file made by mosquitto_passwd), and the settings that lead there.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization

from nerve.bridge import Bridge
from nerve.edge.daemon import open_edge
from nerve.edge.settings import EdgeProcessSettings, handover_json
from nerve.runtime.config.settings import MqttSettings, load_settings
from nerve.runtime.errors import ConfigError
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.endpoint import DEFAULT_MQTTS_PORT, default_mqtt_port, mqtt_endpoint
from nerve.runtime.wire.mqtt import MqttRefused, MqttWireError, SessionTakenOver

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running, SecureMosquitto

    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

WAIT = 10.0


def mqtt(url: str, **more: Any) -> MqttSettings:
    return MqttSettings(url=url, **more)


async def round_trip(settings: MqttSettings, client_id: str = "t") -> None:
    """Connect, subscribe, publish to ourselves and get it back: the connection really works."""
    async with MqttClient(settings, client_id=client_id) as client:
        await client.subscribe("t/#")
        await client.publish("t/x", b"hello")
        async with asyncio.timeout(WAIT):
            message = await anext(client.messages)
    assert (message.topic, message.payload) == ("t/x", b"hello")


async def refusal(settings: MqttSettings, client_id: str = "t") -> str:
    """The one-line reason a connection is refused with."""
    with pytest.raises(MqttWireError) as info:
        async with MqttClient(settings, client_id=client_id, timeout_s=WAIT):
            pass
    text = str(info.value)
    assert "\n" not in text
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, MqttWireError)
    return text


# --- settings -----------------------------------------------------------------------------------------


def test_mqtts_defaults_to_port_8883_and_tls() -> None:
    endpoint = mqtt_endpoint(mqtt("mqtts://broker.example"))
    assert (endpoint.host, endpoint.port, endpoint.uses_tls) == ("broker.example", DEFAULT_MQTTS_PORT, True)
    assert endpoint.tls is not None
    assert endpoint.tls.check_hostname
    assert default_mqtt_port("mqtt://x") == 1883
    assert not mqtt_endpoint(mqtt("mqtt://broker.example")).uses_tls


def test_url_credentials_are_percent_decoded_and_never_shown() -> None:
    endpoint = mqtt_endpoint(mqtt("mqtts://pi%2D01:p%40ss%3Aword@broker:8884"))
    assert (endpoint.username, endpoint.password) == ("pi-01", b"p@ss:word")
    assert endpoint.shown == "mqtts://pi%2D01:***@broker:8884"
    assert "p%40ss" not in repr(endpoint)


def test_password_file_loses_one_trailing_newline(tmp_path: Path) -> None:
    for written, password in [
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"s p\tc", b"s p\tc"),
    ]:
        (tmp_path / "pw").write_bytes(written)
        settings = mqtt("mqtt://x", username="u", password_file=tmp_path / "pw")
        assert mqtt_endpoint(settings).password == password


def test_environment_sets_the_tls_and_credential_keys(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.crt", "client.key", "pw"):
        (tmp_path / name).write_text("x\n")
    settings = load_settings(
        env={
            "NERVE_MQTT__URL": "mqtts://broker.example",
            "NERVE_MQTT__CA_FILE": str(tmp_path / "ca.pem"),
            "NERVE_MQTT__CERT_FILE": str(tmp_path / "client.crt"),
            "NERVE_MQTT__KEY_FILE": str(tmp_path / "client.key"),
            "NERVE_MQTT__USERNAME": "pi-01",
            "NERVE_MQTT__PASSWORD_FILE": str(tmp_path / "pw"),
            "NERVE_MQTT__MAX_PACKET_SIZE": "131072",
        }
    )
    assert settings.mqtt.ca_file == tmp_path / "ca.pem"
    assert settings.mqtt.username == "pi-01"
    assert settings.mqtt.max_packet_size == 131072


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "password_file"])
def test_a_missing_file_is_a_config_error_naming_key_and_path(key: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    extra = {"username": "u"} if key == "password_file" else {}
    with pytest.raises(ConfigError) as info:
        load_settings(
            env={"NERVE_MQTT__URL": "mqtts://x", f"NERVE_MQTT__{key.upper()}": str(missing)},
            overrides={"mqtt": extra} if extra else None,
        )
    assert info.value.key == f"mqtt.{key}"
    assert str(missing) in str(info.value)
    assert "No such file" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_directory_is_not_a_password_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"mqtt.password_file: .*cannot read {tmp_path}: Is a directory"):
        load_settings(overrides={"mqtt": {"username": "u", "password_file": str(tmp_path)}})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0)
    with pytest.raises(ConfigError, match=r"mqtt.password_file: .*Permission denied"):
        load_settings(overrides={"mqtt": {"username": "u", "password_file": str(secret)}})


@pytest.mark.parametrize(
    ("mqtt_settings", "reason"),
    [
        ({"url": "mqtt://x", "ca_file": "{ca}"}, "ca_file is set but url is not mqtts://"),
        ({"url": "mqtts://x", "key_file": "{ca}"}, "key_file is set without cert_file"),
        ({"url": "mqtt://u:p@x", "username": "v"}, "credentials are in url and in username"),
        ({"url": "mqtt://x", "password_file": "{ca}"}, "password_file is set without username"),
        ({"max_packet_size": 100}, "greater than or equal to 4096"),
        ({"url": "https://u:hunter2@x"}, "expected mqtt://host:port or mqtts://host:port"),
    ],
)
def test_inconsistent_mqtt_settings_are_refused(
    mqtt_settings: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_text("x")
    values = {
        key: str(value).replace("{ca}", str(tmp_path / "ca.pem")) for key, value in mqtt_settings.items()
    }
    with pytest.raises(ConfigError, match=reason) as info:
        load_settings(overrides={"mqtt": values})
    assert "hunter2" not in str(info.value)


def test_bridge_payloads_must_fit_the_mqtt_packet_limit() -> None:
    with pytest.raises(
        ConfigError, match=r"bridge.max_payload \(300000\) must be below mqtt.max_packet_size"
    ):
        load_settings(overrides={"bridge": {"max_payload": 300_000}})
    load_settings(overrides={"bridge": {"max_payload": 300_000}, "mqtt": {"max_packet_size": 400_000}})


def test_a_bad_certificate_file_is_a_config_error_at_connect(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "client.crt").write_text("not a certificate either\n")
    with pytest.raises(ConfigError) as info:
        mqtt_endpoint(mqtt("mqtts://x", ca_file=tmp_path / "ca.pem"))
    assert info.value.key == "mqtt.ca_file"
    assert str(tmp_path / "ca.pem") in str(info.value)
    with pytest.raises(ConfigError) as info:
        mqtt_endpoint(mqtt("mqtts://x", cert_file=tmp_path / "client.crt"))
    assert info.value.key == "mqtt.cert_file"


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(
    mosquitto_pki: dict[str, Path], tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(mosquitto_pki["client-key"].read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    settings = mqtt("mqtts://x", cert_file=mosquitto_pki["client"], key_file=encrypted)
    with pytest.raises(ConfigError, match="the private key is encrypted: give an unencrypted key file"):
        mqtt_endpoint(settings)
    wrong = mqtt("mqtts://x", cert_file=mosquitto_pki["client"], key_file=mosquitto_pki["server-key"])
    with pytest.raises(ConfigError, match=r"mqtt\.cert_file: .*not a PEM certificate with its private key"):
        mqtt_endpoint(wrong)


def test_a_password_file_gone_since_loading_is_a_config_error_at_connect(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    settings = mqtt("mqtt://x", username="u", password_file=secret)
    secret.unlink()
    with pytest.raises(ConfigError, match=f"mqtt.password_file: cannot read {secret}: No such file"):
        mqtt_endpoint(settings)


def test_the_lean_edge_gets_the_tls_and_credential_settings(tmp_path: Path) -> None:
    for name in ("ca.pem", "pw"):
        (tmp_path / name).write_text("x\n")
    settings = load_settings(
        overrides={
            "mqtt": {
                "url": "mqtts://broker.example",
                "ca_file": str(tmp_path / "ca.pem"),
                "username": "pi-01",
                "password_file": str(tmp_path / "pw"),
                "max_packet_size": 131072,
            }
        }
    )
    lean = EdgeProcessSettings.from_json(handover_json(settings)).mqtt
    assert (lean.ca_file, lean.cert_file, lean.password_file) == (tmp_path / "ca.pem", None, tmp_path / "pw")
    assert (lean.username, lean.max_packet_size) == ("pi-01", 131072)
    assert "x\n" not in handover_json(settings)  # the secret itself never travels


# --- against a real mosquitto -----------------------------------------------------------------------------


def secure(broker: SecureMosquitto, **more: Any) -> MqttSettings:
    """Settings for the TLS + password listener, with the right CA and credentials unless `more` says."""
    values: dict[str, Any] = {
        "url": broker.url(),
        "ca_file": broker.ca_file,
        "username": broker.username,
        "password_file": broker.password_file,
    }
    values.update(more)
    return MqttSettings(**{key: value for key, value in values.items() if value is not None})


@pytest.mark.broker
async def test_tls_with_the_ca_file_and_a_password_file(secure_mosquitto: SecureMosquitto) -> None:
    await round_trip(secure(secure_mosquitto))


@pytest.mark.broker
async def test_url_credentials(secure_mosquitto: SecureMosquitto) -> None:
    userinfo = "nerve:s3cret%3Apass"  # the password has a colon: percent-encoded in a URL
    settings = MqttSettings(url=secure_mosquitto.url(userinfo=userinfo), ca_file=secure_mosquitto.ca_file)
    await round_trip(settings)


@pytest.mark.broker
async def test_a_wrong_password_is_refused_as_such(secure_mosquitto: SecureMosquitto, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    text = await refusal(secure(secure_mosquitto, password_file=wrong))
    # mosquitto 2.0 answers a wrong password with "not authorized"; others say "bad user name or password".
    assert text == (
        f"{secure_mosquitto.url()}: broker refused the connection: not authorized (0x87): "
        "check the user name 'nerve' and its password, and the broker's ACL"
    )
    url = secure_mosquitto.url(userinfo="nerve:hunter2")
    text = await refusal(MqttSettings(url=url, ca_file=secure_mosquitto.ca_file))
    assert "broker refused the connection: not authorized" in text
    assert "hunter2" not in text
    assert "mqtts://nerve:***@127.0.0.1" in text
    with pytest.raises(MqttRefused) as info:
        await MqttClient(secure(secure_mosquitto, password_file=wrong), client_id="t").__aenter__()
    assert info.value.reason_code == 0x87


@pytest.mark.broker
async def test_no_credentials_is_not_authorized(secure_mosquitto: SecureMosquitto) -> None:
    text = await refusal(secure(secure_mosquitto, username=None, password_file=None))
    assert text.endswith(
        "broker refused the connection: not authorized (0x87): it wants a login: set mqtt.username "
        "and mqtt.password_file, or a client certificate"
    )


@pytest.mark.broker
async def test_a_wrong_ca_is_refused_with_one_line(secure_mosquitto: SecureMosquitto) -> None:
    text = await refusal(secure(secure_mosquitto, ca_file=secure_mosquitto.other_ca_file))
    assert text.startswith(f"TLS to {secure_mosquitto.url()}: certificate verify failed: unknown CA")


@pytest.mark.broker
async def test_without_a_ca_file_the_system_store_does_not_know_a_private_ca(
    secure_mosquitto: SecureMosquitto,
) -> None:
    text = await refusal(secure(secure_mosquitto, ca_file=None))
    assert "certificate verify failed: unknown CA" in text


@pytest.mark.broker
async def test_a_host_name_mismatch_is_refused(secure_mosquitto: SecureMosquitto) -> None:
    settings = secure(secure_mosquitto, url=secure_mosquitto.url(secure_mosquitto.wrong_host_port))
    text = await refusal(settings)
    assert (
        "certificate verify failed: host name mismatch: the broker's certificate is not valid for 127.0.0.1"
        in text
    )


@pytest.mark.broker
async def test_an_expired_certificate_is_refused(secure_mosquitto: SecureMosquitto) -> None:
    text = await refusal(secure(secure_mosquitto, url=secure_mosquitto.url(secure_mosquitto.expired_port)))
    assert "certificate verify failed: the broker's certificate has expired" in text


@pytest.mark.broker
async def test_mutual_tls_wants_a_client_certificate_and_takes_ours(
    secure_mosquitto: SecureMosquitto,
) -> None:
    url = secure_mosquitto.url(secure_mosquitto.mtls_port)
    without = secure(secure_mosquitto, url=url, username=None, password_file=None)
    text = await refusal(without)
    # TLS 1.3: the broker's alert may arrive, or only its reset; both say what to set.
    assert (
        "the broker wants a client certificate (set mqtt.cert_file and mqtt.key_file)" in text
        or "does it want a client certificate? set mqtt.cert_file and mqtt.key_file" in text
    ), text
    with_cert = secure(
        secure_mosquitto,
        url=url,
        username=None,
        password_file=None,
        cert_file=secure_mosquitto.cert_file,
        key_file=secure_mosquitto.key_file,
    )
    await round_trip(with_cert)


@pytest.mark.broker
async def test_plain_and_tls_mixed_up_say_so(secure_mosquitto: SecureMosquitto) -> None:
    plain_to_tls = secure(secure_mosquitto, url=secure_mosquitto.url(scheme="mqtt"), ca_file=None)
    text = await refusal(plain_to_tls)
    assert "closed the connection before its CONNACK (a TLS listener? then use mqtts://)" in text
    tls_to_plain = secure(secure_mosquitto, url=secure_mosquitto.url(secure_mosquitto.plain_port))
    text = await refusal(tls_to_plain)
    assert (
        "the broker does not speak TLS on this port" in text or "not a TLS listener? then use mqtt://" in text
    )
    # The plain listener shares the password file: credentials work there too.
    await round_trip(
        secure(
            secure_mosquitto,
            url=secure_mosquitto.url(secure_mosquitto.plain_port, scheme="mqtt"),
            ca_file=None,
        )
    )


@pytest.mark.broker
async def test_nothing_listening_is_connection_refused(secure_mosquitto: SecureMosquitto) -> None:
    port = secure_mosquitto.port
    await secure_mosquitto.broker.stop()
    text = await refusal(secure(secure_mosquitto))
    assert (
        text
        == f"cannot connect to mqtts://127.0.0.1:{port}: connection refused (nothing listens on port {port}?)"
    )


@pytest.mark.broker
async def test_a_session_taken_over_is_reported_with_the_client_id(mosquitto: Mosquitto) -> None:
    """mosquitto 2.0.15+ says DISCONNECT 0x8E (`SessionTakenOver`); before, it closes without a word."""
    settings = MqttSettings(url=mosquitto.url)
    async with (
        MqttClient(settings, client_id="nerve-bridge") as first,
        MqttClient(settings, client_id="nerve-bridge"),
    ):
        with pytest.raises(MqttWireError) as info:
            async with asyncio.timeout(WAIT):
                await first.wire.closed
    if isinstance(info.value, SessionTakenOver):
        assert str(info.value) == "session taken over: another client connected with client id 'nerve-bridge'"
        assert info.value.client_id == "nerve-bridge"
    else:
        assert str(info.value) == (
            "connection closed by the broker without a reason "
            "(another client connected with client id 'nerve-bridge', or our login was revoked?)"
        )


@pytest.mark.broker
async def test_the_lean_edge_process_goes_online_over_tls_with_a_password_file(
    secure_mosquitto: SecureMosquitto, tmp_path: Path, running: Running
) -> None:
    """What `nerve edge` runs: settings handed over as JSON, the password read from its file."""
    generate_keypair(tmp_path / "keys", "central")
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "mqtt": {
                "url": secure_mosquitto.url(),
                "ca_file": str(secure_mosquitto.ca_file),
                "username": secure_mosquitto.username,
                "password_file": str(secure_mosquitto.password_file),
            },
            "edge": {"mounts": [], "trusted_keys_dir": str(tmp_path / "keys")},
        }
    )
    lean = EdgeProcessSettings.from_json(handover_json(settings))
    async with (
        open_edge(lean, device="pi-01") as edge,
        running(edge, wait=WAIT),
        MqttClient(settings.mqtt, client_id="observer") as observer,
    ):
        await observer.subscribe("nerve/pi-01/status")
        async with asyncio.timeout(WAIT):
            status = await anext(observer.messages)
    assert (status.payload, status.retain) == (b"online", True)


@pytest.mark.broker
async def test_the_bridge_carries_readings_from_a_tls_broker_with_a_login(
    secure_mosquitto: SecureMosquitto,
    nats_server: NatsServer,
    nc: NatsClient,
    running: Running,
    tmp_path: Path,
) -> None:
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "nats": {"url": nats_server.url},
            "mqtt": {
                "url": secure_mosquitto.url(userinfo="nerve:s3cret%3Apass"),
                "ca_file": str(secure_mosquitto.ca_file),
            },
        }
    )
    async with (
        running(Bridge(settings=settings), wait=WAIT),
        MqttClient(secure(secure_mosquitto), client_id="device") as device,
    ):
        await device.publish("nerve/pi-01/telemetry/disk", b"95")
        await wait_for_count(nc.jetstream(), "NERVE_TELEMETRY", 1)
    stored = await stream_messages(nc.jetstream(), "NERVE_TELEMETRY")
    assert [m.subject for m in stored] == ["nerve.pi-01.telemetry.disk"]
