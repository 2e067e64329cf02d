"""`nerve up` and `nerve demo` keep working with device-signed results (no broker needed here).

The stack makes its device's key (0600) and registers the public half, never over another registration
nor for a revoked device; `nerve demo` counts only a verified result as the device's.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from nerve.runtime.cli.demo import _saw
from nerve.runtime.config.settings import Settings
from nerve.runtime.envelope.codec import to_json
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.stack.local import Stack
from nerve.runtime.testing import provision_device
from nerve.runtime.trust.devices import REVOKED_DIR, DeviceKeys
from nerve.runtime.wire.mqtt import Incoming

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def stack(tmp_path: Path, **paths: Path) -> Stack:
    return Stack(settings=Settings(data_dir=tmp_path / "data"), device="pi-01", **paths)


def test_the_stack_makes_and_registers_the_device_key(tmp_path: Path) -> None:
    local = stack(tmp_path)
    local._ensure_device_key()
    private = tmp_path / "data" / "edge-keys" / "pi-01.key"
    assert private.stat().st_mode & 0o777 == 0o600
    registered = tmp_path / "data" / "devices" / "pi-01.pub"
    assert registered.read_text() == private.with_suffix(".pub").read_text()
    assert local.settings.edge.signing_key == private
    assert local.settings.central.device_keys_dir == tmp_path / "data" / "devices"
    # Not in the folder of the central key, whose every .pub the edge trusts to sign commands.
    assert local.settings.edge.trusted_keys_dir == tmp_path / "data" / "keys"
    before = private.read_bytes()
    stack(tmp_path)._ensure_device_key()  # a restart keeps the key
    assert private.read_bytes() == before


def test_explicit_paths_win(tmp_path: Path) -> None:
    key, registry = tmp_path / "home" / "edge-keys" / "pi-01.key", tmp_path / "home" / "devices"
    local = stack(tmp_path, device_key=key, device_keys_dir=registry)
    local._ensure_device_key()
    assert (registry / "pi-01.pub").read_text() == key.with_suffix(".pub").read_text()
    assert not (tmp_path / "data" / "devices").exists()


def test_another_registration_is_kept_and_a_revoked_device_stays_revoked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "data" / "devices"
    provision_device(registry, "pi-01", keys=tmp_path / "elsewhere")
    theirs = (registry / "pi-01.pub").read_text()
    with caplog.at_level(logging.WARNING):
        stack(tmp_path)._ensure_device_key()
    assert (registry / "pi-01.pub").read_text() == theirs
    assert "registered in" in caplog.text
    assert "with another key" in caplog.text

    (registry / REVOKED_DIR).mkdir()
    (registry / "pi-01.pub").rename(registry / REVOKED_DIR / "pi-01.pub")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stack(tmp_path)._ensure_device_key()
    assert not (registry / "pi-01.pub").exists()
    assert "device pi-01 is revoked" in caplog.text


def test_demo_counts_only_a_verified_result(tmp_path: Path) -> None:
    registry = tmp_path / "devices"
    device = provision_device(registry, "pi-01")
    command = Command.create(
        device="pi-01", action="clear_temp", args={}, source="s", ttl=timedelta(seconds=60)
    )
    result = CommandResult.for_command(command, source="s", status="ok", data={"summary": "deleted 5 files"})
    seen: list[tuple[str, str]] = []
    keys = DeviceKeys(registry)
    for payload in (to_json(result), to_json(device.sign(result))):
        _saw(Incoming("nerve/pi-01/results/clear_temp", payload, 0), lambda *hop: seen.append(hop), keys)
    assert seen[0][0] == "unverified result ignored"
    assert "result from pi-01 is not signed" in seen[0][1]
    assert seen[1] == ("result from device", "ok: deleted 5 files")
