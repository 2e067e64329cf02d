"""The shipped systemd units: the edge's is hardened, and writes exactly where its configuration says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nerve.runtime.config.settings import load_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SYSTEMD = CONFIGS / "systemd"


def directives(path: Path) -> dict[str, list[str]]:
    """Each `Key=value` of the unit, by key, in order (systemd allows a key several times)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def edge_unit() -> dict[str, list[str]]:
    return directives(SYSTEMD / "nerve-edge.service")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("User", "nerve"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateTmp", "no"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("KillMode", "control-group"),
        ("StateDirectory", "nerve"),
    ],
)
def test_edge_unit_is_hardened(edge_unit: dict[str, list[str]], key: str, value: str) -> None:
    assert edge_unit.get(key) == [value]


def test_edge_unit_filters_system_calls(edge_unit: dict[str, list[str]]) -> None:
    assert edge_unit["SystemCallFilter"][0] == "@system-service"
    assert all(
        not value.startswith("@") or value == "@system-service" for value in edge_unit["SystemCallFilter"]
    )


def test_edge_unit_writes_exactly_the_configured_directories(edge_unit: dict[str, list[str]]) -> None:
    settings = load_settings(CONFIGS / "edge.yaml")
    writable = [path for value in edge_unit["ReadWritePaths"] for path in value.split()]
    assert sorted(writable) == sorted(str(root) for root in settings.edge.clear_temp_roots)
    # The journal lives in the StateDirectory, writable through StateDirectory=nerve.
    assert settings.edge.journal is not None
    assert settings.edge.journal.parent == Path("/var/lib") / edge_unit["StateDirectory"][0]


def test_the_polkit_rule_allows_the_configured_services_and_the_vacuum_unit() -> None:
    settings = load_settings(CONFIGS / "edge.yaml")
    rule = (SYSTEMD / "nerve-edge.polkit.rules").read_text()
    for unit in settings.edge.actions.services:
        assert f'"{unit}"' in rule
    assert settings.edge.actions.vacuum_unit is not None
    assert f"^{settings.edge.actions.vacuum_unit}@[0-9]" in rule
    assert (SYSTEMD / f"{settings.edge.actions.vacuum_unit}@.service").exists()


def test_vacuum_unit_runs_journalctl_with_its_instance() -> None:
    unit = directives(SYSTEMD / "nerve-journal-vacuum@.service")
    assert unit["ExecStart"] == ["/usr/bin/journalctl --vacuum-size=%i"]
    assert unit["Type"] == ["oneshot"]
    assert unit["ReadWritePaths"] == ["/var/log/journal"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_edge_unit_exposure_is_ok() -> None:
    completed = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(SYSTEMD / "nerve-edge.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = completed.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for nerve-edge.service" in last
    score = float(last.split(":")[1].split()[0])
    assert score <= 2.0, last


def test_the_downlink_unit_runs_the_bridges_config_as_its_downlink_on_a_port_of_its_own(
    tmp_path: Path,
) -> None:
    bridge = directives(SYSTEMD / "nerve-bridge.service")
    downlink = directives(SYSTEMD / "nerve-bridge-downlink.service")
    assert downlink["ExecStart"] == bridge["ExecStart"]  # the same settings file
    env = dict(value.split("=", 1) for value in downlink["Environment"])
    assert env["NERVE_DATA_DIR"] == "/var/lib/nerve"
    # The operator sets `bridge.part: uplink` in the shipped file; the unit's variables win over it.
    config = yaml.safe_load((CONFIGS / "bridge.yaml").read_text())
    config["bridge"]["part"] = "uplink"
    split = tmp_path / "bridge.yaml"
    split.write_text(yaml.safe_dump(config))
    uplink, as_downlink = load_settings(split), load_settings(split, env=env)
    assert uplink.bridge.part == "uplink"
    assert as_downlink.bridge.part == "downlink"
    assert as_downlink.bridge.metrics_port not in {None, uplink.bridge.metrics_port}
    for key in ("User", "ProtectSystem", "NoNewPrivileges", "StateDirectory", "KillSignal", "Restart"):
        assert downlink[key] == bridge[key], key
