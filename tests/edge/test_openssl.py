"""The lean edge process loads OpenSSL only when its settings need it (`nerve.edge.main`).

Plain `mqtt://` and no plugin: neither `ssl` nor `_hashlib` is imported, so libssl and libcrypto are never
mapped (~4.4 MiB of RSS, `make bench-edge`), and the daemon still runs commands (its digests fall back
to Python's own SHA-256). An `mqtts://` broker or a plugin: OpenSSL is there, and TLS works.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from nerve.edge.settings import EdgeProcessSettings, handover_json, needs_openssl
from nerve.runtime.config.settings import MqttSettings, load_settings
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from tests.conftest import SecureMosquitto
    from tests.edge.conftest import StartEdge

    from nerve.runtime.stack.brokers import Mosquitto

WAIT = 30.0
OPENSSL_LIBRARIES = ("libssl", "libcrypto")


@pytest.mark.parametrize(
    ("overrides", "needed"),
    [
        ({}, False),
        ({"mqtt": {"url": "mqtt://broker.example:1883"}}, False),
        ({"mqtt": {"url": "mqtts://broker.example"}}, True),
        ({"edge": {"sensors": {"humidity": {}}}}, True),  # a sensor plugin
        ({"edge": {"actions": {"allow": ["clear_temp", "reboot"]}}}, True),  # an action plugin
        ({"edge": {"actions": {"allow": ["clear_temp", "run", "collect_diagnostics"]}}}, False),
        ({"edge": {"sensors": {"disk": {"interval_s": 30}}}}, False),
    ],
)
def test_openssl_is_needed_for_tls_or_a_plugin(overrides: dict[str, Any], needed: bool) -> None:
    settings = load_settings(overrides=overrides)
    assert needs_openssl(settings) is needed
    assert EdgeProcessSettings.from_json(handover_json(settings)).openssl is needed


async def online_then_maps(process: asyncio.subprocess.Process, observer: MqttClient, device: str) -> str:
    """Wait for the device's retained `online`, then read the (same-PID, exec'd) lean process's maps."""
    await observer.subscribe(f"nerve/{device}/status")
    async with asyncio.timeout(WAIT):
        async for message in observer.messages:
            if message.payload == b"online":
                break
    return lean_maps(process.pid)


def lean_maps(pid: int) -> str:
    """The memory maps of `nerve edge` once it became the lean process (same PID)."""
    assert b"nerve.edge.main" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(f"/proc/{pid}/maps").read_text(errors="replace")


def edge_config(tmp_path: Path, device: str, mqtt: dict[str, str]) -> Path:
    generate_keypair(tmp_path / "keys", "central")
    config = tmp_path / "edge.yaml"
    edge = {"device": device, "mounts": [], "trusted_keys_dir": str(tmp_path / "keys")}
    config.write_text(yaml.safe_dump({"mqtt": mqtt, "data_dir": str(tmp_path / "data"), "edge": edge}))
    return config


async def stopped(process: asyncio.subprocess.Process) -> int:
    process.terminate()
    async with asyncio.timeout(WAIT):
        return await process.wait()


@pytest.mark.broker
async def test_a_plain_mqtt_edge_never_maps_openssl(
    mosquitto: Mosquitto, tmp_path: Path, start_edge: StartEdge
) -> None:
    process = await start_edge(edge_config(tmp_path, "pi-plain", {"url": mosquitto.url}))
    try:
        async with MqttClient(MqttSettings(url=mosquitto.url), client_id="observer") as observer:
            maps = await online_then_maps(process, observer, "pi-plain")
    finally:
        code = await stopped(process)
    assert [library for library in OPENSSL_LIBRARIES if library in maps] == []
    assert code == 0


@pytest.mark.broker
async def test_an_mqtts_edge_loads_openssl_and_goes_online(
    secure_mosquitto: SecureMosquitto, tmp_path: Path, start_edge: StartEdge
) -> None:
    mqtt = {
        "url": secure_mosquitto.url(),
        "ca_file": str(secure_mosquitto.ca_file),
        "username": secure_mosquitto.username,
        "password_file": str(secure_mosquitto.password_file),
    }
    process = await start_edge(edge_config(tmp_path, "pi-tls", mqtt))
    try:
        async with MqttClient(MqttSettings.model_validate(mqtt), client_id="observer") as observer:
            maps = await online_then_maps(process, observer, "pi-tls")
    finally:
        code = await stopped(process)
    assert all(library in maps for library in OPENSSL_LIBRARIES)
    assert code == 0
