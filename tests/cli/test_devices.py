"""`nerve devices` as a person runs it: what it prints (never a secret), one line for what it refuses."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nerve.runtime.cli.main import main
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.trust.site import BUNDLE_PASSWORD, DOWNLINK_PASSWORD

NERVE = str(Path(sys.executable).parent / "nerve")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The flags of a site in tmp_path (central's key where `nerve up` would have made it)."""
    for name in list(os.environ):
        if name.startswith("NERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    generate_keypair(tmp_path / "config" / "nerve" / "keys", "central")
    monkeypatch.chdir(tmp_path)
    return ["--data-dir", str(tmp_path / "data"), "--host", "mqtt.site.example"]


def secrets_under(root: Path) -> list[str]:
    """Every password and private key nerve devices wrote: none may ever be printed."""
    found = [p.read_text().strip() for name in (BUNDLE_PASSWORD, DOWNLINK_PASSWORD) for p in root.rglob(name)]
    found += [p.read_text().strip() for p in root.rglob("*.key")]
    return [s for s in found if s]


def test_add_prints_what_to_copy_where_and_no_secret(
    tmp_path: Path, site: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices", "add", "pi-01", *site]) == 0
    out, err = capsys.readouterr()
    assert "scp -rp data/site/bundles/pi-01 root@pi-01:/etc/nerve" in out
    assert "nerve edge --config /etc/nerve/edge.yaml" in out
    assert "rm -r data/site/bundles/pi-01" in out
    assert "mqtts://mqtt.site.example:8883" in out
    assert "SHA256:" in out
    assert "systemctl reload mosquitto" in out  # no pid file set: it says how to reload
    secrets = secrets_under(tmp_path)
    assert len(secrets) >= 5  # the device's password and key, the bridge's two passwords, the CA's key
    assert not [s for s in secrets if s in out or s in err]
    bundle = tmp_path / "data" / "site" / "bundles" / "pi-01"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["add", "a.b"], "ID: device id 'a.b' is not valid"),
        (["add", "pi/01"], "ID: device id 'pi/01' is not valid"),
        (["add", "nerve-bridge"], "is one of the bridge's logins"),
        (["add", "nerve-bridge-down"], "is one of the bridge's logins"),
        (["revoke", "ghost"], "no device 'ghost' on this site"),
        (["revoke", "*"], "ID: device id '*' is not valid"),
        (["add", "pi-01", "--central-key", "/nonexistent/central.pub"], "cannot read central's public key"),
    ],
)
def test_refusals_are_one_line(
    site: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert main(["devices", *argv, *site]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("nerve devices: error: ")
    assert says in err


def test_a_duplicate_is_refused_then_replaced_with_force(
    site: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices", "add", "pi-01", *site]) == 0
    capsys.readouterr()
    assert main(["devices", "add", "pi-01", *site]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert "device 'pi-01' exists already" in err
    assert "--force" in err
    assert main(["devices", "add", "pi-01", "--force", *site]) == 0


def test_list_and_revoke(site: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "list", *site]) == 0
    assert "no devices on this site yet" in capsys.readouterr().out
    for device in ("pi-01", "pi-02"):
        assert main(["devices", "add", device, *site]) == 0
    assert main(["devices", "revoke", "pi-01", *site]) == 0
    out = capsys.readouterr().out
    assert "revoked pi-01" in out
    assert "data/devices/revoked/pi-01.pub" in out
    assert main(["devices", "list", "--json", *site]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["device"], d["revoked"] is not None) for d in listed] == [("pi-01", True), ("pi-02", False)]
    assert all(d["fingerprint"].startswith("SHA256:") and d["added"] for d in listed)
    assert main(["devices", "list", *site]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "ADDED", "STATUS", "KEY"]
    assert "revoked" in table[1]
    assert "active" in table[2]


def test_site_prints_the_bridges_settings_without_its_password(
    tmp_path: Path, site: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices", "site", *site]) == 0
    out, _ = capsys.readouterr()
    settings = yaml.safe_load(out[out.index("mqtt:") :])["mqtt"]
    assert settings["username"] == "nerve-bridge"
    assert settings["url"] == "mqtts://mqtt.site.example:8883"
    password_file = Path(settings["password_file"])
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().strip() not in out
    assert Path(settings["ca_file"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    downlink = yaml.safe_load(out[out.index("mqtt:") :])["bridge"]
    assert downlink["downlink_username"] == "nerve-bridge-down"
    downlink_password = Path(downlink["downlink_password_file"])
    assert stat.S_IMODE(downlink_password.stat().st_mode) == 0o600
    assert downlink_password.read_text().strip() not in out
    assert downlink_password.read_text() != password_file.read_text()
    # Again: nothing new is made, the same settings are printed.
    assert main(["devices", "bridge", *site]) == 0
    again, _ = capsys.readouterr()
    assert "made " not in again
    assert again == out[out.index("the site broker's files") :]


def test_the_command_itself_prints_no_secret(tmp_path: Path) -> None:
    # The installed `nerve`, as a person runs it: stdout and stderr of a real process.
    generate_keypair(tmp_path / "keys", "central")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}
    done = subprocess.run(
        [NERVE, "devices", "add", "pi-01", "--data-dir", str(tmp_path / "data"), "--host", "10.1.2.3",
         "--central-key", str(tmp_path / "keys" / "central.key")],
        capture_output=True, text=True, check=False, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mqtts://10.1.2.3:8883" in done.stdout
    assert not [s for s in secrets_under(tmp_path) if s in done.stdout or s in done.stderr]


# --- named bridges: several in a $share group, each with its own logins ---------------------------------


def test_bridge_add_prints_how_to_run_it_and_no_secret(
    tmp_path: Path, site: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices", "bridge", "add", "b1", *site]) == 0
    out, err = capsys.readouterr()
    assert "added bridge b1" in out
    assert "'nerve-bridge-b1' (uplink) and 'nerve-bridge-b1-down' (downlink)" in out
    assert "nerve bridge --config data/site/bridges/b1/bridge.yaml" in out
    assert "systemctl reload mosquitto" in out  # no pid file set: it says how to reload
    bundle = tmp_path / "data" / "site" / "bridges" / "b1"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in bundle.iterdir()} == {
        "bridge.yaml": 0o600,
        "mqtt-ca.pem": 0o600,
        BUNDLE_PASSWORD: 0o600,
        DOWNLINK_PASSWORD: 0o600,
    }
    secrets = secrets_under(tmp_path)
    assert len(secrets) >= 5  # b1's two passwords, the default bridge's two, the CA's key
    assert not [s for s in secrets if s in out or s in err]
    group = yaml.safe_load((bundle / "bridge.yaml").read_text())["bridge"]["shared_group"]
    assert group not in out  # the group's name stays in the bundles


def test_bridge_add_with_a_dir_says_where_to_copy_it(
    tmp_path: Path, site: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The shared options given before the action are kept (argparse would reset them to their defaults).
    assert main(["devices", "bridge", *site, "add", "b2", "--dir", "/etc/nerve-bridge"]) == 0
    out = capsys.readouterr().out
    assert "scp -rp data/site/bridges/b2 root@BRIDGE-HOST:/etc/nerve-bridge" in out
    assert "nerve bridge --config /etc/nerve-bridge/bridge.yaml" in out
    assert "mqtts://mqtt.site.example:8883" in out  # --host, given before `add`
    config = yaml.safe_load((tmp_path / "data" / "site" / "bridges" / "b2" / "bridge.yaml").read_text())
    assert Path(config["mqtt"]["password_file"]) == Path("/etc/nerve-bridge") / BUNDLE_PASSWORD
    assert Path(config["bridge"]["downlink_password_file"]) == Path("/etc/nerve-bridge") / DOWNLINK_PASSWORD


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bridge", "add", "a.b"], "NAME: bridge name 'a.b' is not valid"),
        (["bridge", "add", "down"], "names ending in -down or -down-<number>"),
        (["bridge", "add", "b1-down"], "names ending in -down or -down-<number>"),
        (["bridge", "add", "b1-down-2"], "names ending in -down or -down-<number>"),
        (["bridge", "revoke", "ghost"], "no bridge 'ghost' on this site"),
        (["add", "nerve-bridge-b1"], "kept for the logins of named bridges"),
    ],
)
def test_bridge_refusals_are_one_line(
    site: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert main(["devices", *argv, *site]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert says in err


def test_bridge_list_and_a_duplicate(site: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "bridge", "list", *site]) == 0
    assert "no named bridges on this site yet" in capsys.readouterr().out
    for name in ("b1", "b2"):
        assert main(["devices", "bridge", "add", name, *site]) == 0
    assert main(["devices", "bridge", "add", "b1", *site]) == 2
    assert "bridge 'b1' exists already" in capsys.readouterr().err
    assert main(["devices", "bridge", "add", "b1", "--force", *site]) == 0
    capsys.readouterr()
    assert main(["devices", "bridge", "list", "--json", *site]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(b["name"], b["username"], b["revoked"]) for b in listed] == [
        ("b1", "nerve-bridge-b1", None),
        ("b2", "nerve-bridge-b2", None),
    ]
    assert main(["devices", "bridge", "list", *site]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "LOGIN", "ADDED", "STATUS"]
    assert [line.split()[-1] for line in table[1:]] == ["active", "active"]
