"""The site's files (nerve.runtime.trust.site): password format, ACL, modes, the lock, revocation.

The broker's side (a real mosquitto reading these files) is in tests/integration/test_site_broker.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve.runtime.config.settings import Settings, load_settings
from nerve.runtime.errors import ConfigError
from nerve.runtime.subjects import is_token
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.trust.site import (
    BUNDLE_CA,
    BUNDLE_PASSWORD,
    DOWNLINK_PASSWORD,
    Site,
    SiteError,
    acl_text,
    certificate_summary,
    password_hash,
    password_matches,
    site_lock,
    write_atomic,
)

if TYPE_CHECKING:
    from pathlib import Path


# The default downlink's connections beyond its first (bridge.downlink_connections, 4): a login each.
DOWNLINK_LANES = ("nerve-bridge-down-1", "nerve-bridge-down-2", "nerve-bridge-down-3")


def site_settings(tmp_path: Path, **site: object) -> Settings:
    return load_settings(
        overrides={"data_dir": str(tmp_path / "data"), "site": {"hosts": ["mqtt.site.example"], **site}}
    )


@pytest.fixture
def central(tmp_path: Path) -> Path:
    return generate_keypair(tmp_path / "keys", "central")[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- mosquitto's password format ------------------------------------------------------------------------


def test_a_hash_from_mosquitto_passwd_checks_and_ours_has_its_shape(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwd = tmp_path / "passwd"
    # The password goes through a file here too: -b puts it on a command line (fine for a test secret).
    subprocess.run([tool, "-c", "-b", str(passwd), "dev1", "p4ss:word"], check=True, timeout=30)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert password_matches("p4ss:word", theirs)
    assert not password_matches("p4ss:wore", theirs)
    ours = password_hash("p4ss:word")
    assert [len(part) for part in ours.split("$")] == [len(part) for part in theirs.split("$")]
    assert ours.split("$")[1:3] == theirs.split("$")[1:3]  # $7$101$


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=4))
def test_a_hash_checks_its_own_password_only(password: str, more: str) -> None:
    hashed = password_hash(password)
    assert password_matches(password, hashed)
    assert not password_matches(password + more, hashed)


@pytest.mark.parametrize("broken", ["", "$6$101$abc$def", "$7$x$abc$def", "$7$101$***$def", "plain"])
def test_a_broken_hash_matches_nothing(broken: str) -> None:
    assert not password_matches("anything", broken)


# --- the ACL --------------------------------------------------------------------------------------------


def test_the_acl_keeps_devices_to_their_topics_under_the_configured_prefix() -> None:
    acl = acl_text(prefix="acme/site-1", bridge_user="bridge-a", mapped_topics=["sensors/+/disk"])
    lines = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "pattern write acme/site-1/%u/telemetry/#",
        "pattern write acme/site-1/%u/events/#",
        "pattern write acme/site-1/%u/results/#",
        "pattern write acme/site-1/%u/status",
        "pattern read acme/site-1/%u/commands/#",
        "user bridge-a",
        "topic read acme/site-1/#",
        "topic read sensors/+/disk",
        "user bridge-a-down",
        "topic write acme/site-1/+/commands/#",
    ]


def test_the_written_acl_follows_settings(tmp_path: Path, central: Path) -> None:
    settings = load_settings(
        overrides={
            "prefix": "acme",
            "data_dir": str(tmp_path / "data"),
            "site": {"hosts": ["h"], "bridge_user": "br-1"},
            "bridge": {
                "mappings": [{"name": "m", "topic": "sensors/+/disk", "device_level": 2, "metric": "disk"}]
            },
        }
    )
    site = Site(settings)
    site.add("pi-01", central_public_key=central)
    acl = site.paths.acl.read_text()
    assert "pattern read acme/%u/commands/#" in acl
    assert "user br-1\n" in acl
    assert "user br-1-down\ntopic write acme/+/commands/#\n" in acl
    assert "topic read sensors/+/disk" in acl
    assert (site.paths.bundles / "pi-01" / "edge.yaml").read_text().count("prefix: acme") == 1


# --- adding -------------------------------------------------------------------------------------------


def test_add_writes_private_files_and_keeps_the_private_key_out_of_the_registry(
    tmp_path: Path, central: Path
) -> None:
    site = Site(site_settings(tmp_path))
    added = site.add("pi-01", central_public_key=central)
    paths = site.paths
    assert mode(paths.root) == 0o700
    assert mode(added.bundle) == 0o700
    for path in added.bundle.rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    for path in (
        paths.ca_key,
        paths.server_key,
        paths.passwd,
        paths.acl,
        paths.ledger,
        paths.bridge / BUNDLE_PASSWORD,
        paths.bridge / DOWNLINK_PASSWORD,
    ):
        assert mode(path) == 0o600, path
    assert sorted(p.name for p in added.bundle.rglob("*")) == sorted(
        ["edge.yaml", "mqtt-ca.pem", "mqtt-password", "pi-01.key", "trusted", "central.pub"]
    )
    assert [p.name for p in paths.registry.iterdir()] == ["pi-01.pub"]
    assert added.public_key == paths.registry / "pi-01.pub"
    # The password is in the bundle (for the device) and, hashed, in the broker's file: nowhere else.
    password = (added.bundle / BUNDLE_PASSWORD).read_text().strip()
    entries = dict(line.split(":", 1) for line in paths.passwd.read_text().splitlines())
    assert set(entries) == {"pi-01", "nerve-bridge", "nerve-bridge-down", *DOWNLINK_LANES}
    # the downlink's other connections log in with its password (one login per session on the site broker)
    assert {entries[lane] for lane in DOWNLINK_LANES} == {entries["nerve-bridge-down"]}
    assert password_matches(password, entries["pi-01"])
    holding = [p for p in tmp_path.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert holding == [added.bundle / BUNDLE_PASSWORD]
    assert [d.device for d in site.devices()] == ["pi-01"]
    assert site.devices()[0].fingerprint == added.fingerprint
    # Nothing half-written is left behind.
    assert not [p for p in tmp_path.rglob(".*") if p.is_file() or p.is_dir()]


def test_the_broker_certificate_names_the_hosts_and_chains_to_the_site_ca(
    tmp_path: Path, central: Path
) -> None:
    site = Site(site_settings(tmp_path, hosts=["mqtt.site.example", "10.0.0.5"]))
    site.add("pi-01", central_public_key=central)
    expires, names = certificate_summary(site.paths.server_cert.read_bytes())
    assert set(names) == {"mqtt.site.example", "10.0.0.5", "localhost", "127.0.0.1"}
    server = x509.load_pem_x509_certificate(site.paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(site.paths.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.not_valid_after_utc > expires
    assert (site.paths.bundles / "pi-01" / BUNDLE_CA).read_bytes() == site.paths.ca_cert.read_bytes()


@pytest.mark.parametrize("bad", ["a.b", "*", "+", "#", "a/b", "", "x" * 65, "dev 1", "nerve-bridge"])
def test_add_refuses_ids_that_are_not_tokens_or_the_bridges(tmp_path: Path, central: Path, bad: str) -> None:
    site = Site(site_settings(tmp_path))
    with pytest.raises(ConfigError) as info:
        site.add(bad, central_public_key=central)
    assert "\n" not in str(info.value)
    assert not site.paths.root.exists() or not site.devices()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70).filter(lambda text: not is_token(text)))
def test_add_refuses_every_id_that_is_not_a_token_before_writing_anything(
    tmp_path_factory: pytest.TempPathFactory, bad: str
) -> None:
    tmp_path = tmp_path_factory.mktemp("site")
    site = Site(site_settings(tmp_path))
    with pytest.raises(ConfigError, match=r"^ID: device id .* is not valid") as info:
        site.add(bad, central_public_key=tmp_path / "unread.pub")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "data").exists()


def test_add_refuses_an_existing_id_unless_forced(tmp_path: Path, central: Path) -> None:
    site = Site(site_settings(tmp_path))
    first = site.add("pi-01", central_public_key=central)
    old_password = (first.bundle / BUNDLE_PASSWORD).read_text()
    with pytest.raises(SiteError, match="exists already"):
        site.add("pi-01", central_public_key=central)
    again = site.add("pi-01", central_public_key=central, force=True)
    assert again.fingerprint != first.fingerprint
    entry = next(line for line in site.paths.passwd.read_text().splitlines() if line.startswith("pi-01:"))
    assert not password_matches(old_password.strip(), entry.split(":", 1)[1])


def test_add_without_hosts_or_central_key_says_which(tmp_path: Path, central: Path) -> None:
    with pytest.raises(ConfigError, match=r"site\.hosts"):
        Site(site_settings(tmp_path, hosts=[])).add("pi-01", central_public_key=central)
    with pytest.raises(ConfigError, match="central's public key"):
        Site(site_settings(tmp_path)).add("pi-01", central_public_key=tmp_path / "nowhere.pub")
    not_a_key = tmp_path / "bad.pub"
    not_a_key.write_text("hello\n")
    with pytest.raises(ConfigError, match="base64"):
        Site(site_settings(tmp_path)).add("pi-01", central_public_key=not_a_key)


def test_hosts_given_once_are_remembered(tmp_path: Path, central: Path) -> None:
    Site(site_settings(tmp_path, hosts=[]), hosts=["broker.lan"]).add("pi-01", central_public_key=central)
    added = Site(site_settings(tmp_path, hosts=[])).add("pi-02", central_public_key=central)
    assert added.url == "mqtts://broker.lan:8883"


def test_a_broker_user_that_does_not_exist_is_one_line(tmp_path: Path, central: Path) -> None:
    site = Site(site_settings(tmp_path, broker_user="no-such-user-here"))
    with pytest.raises(SiteError, match="no-such-user-here"):
        site.add("pi-01", central_public_key=central)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_broker_files_go_to_the_broker_user(tmp_path: Path, central: Path) -> None:
    site = Site(site_settings(tmp_path, broker_user="nobody"))
    site.add("pi-01", central_public_key=central)
    for path in (site.paths.broker, site.paths.passwd, site.paths.acl, site.paths.server_key):
        assert path.owner() == "nobody", path
    assert site.paths.ca_key.owner() == "root"


# --- revoking -----------------------------------------------------------------------------------------


def test_revoke_removes_the_login_and_retires_the_key(tmp_path: Path, central: Path) -> None:
    site = Site(site_settings(tmp_path))
    site.add("pi-01", central_public_key=central)
    site.add("pi-02", central_public_key=central)
    moved = site.revoke("pi-01")
    assert moved == site.paths.revoked / "pi-01.pub"
    assert moved.exists()
    assert sorted(p.name for p in site.paths.registry.glob("*.pub")) == ["pi-02.pub"]
    users = [line.split(":")[0] for line in site.paths.passwd.read_text().splitlines()]
    assert users == ["nerve-bridge", "nerve-bridge-down", *DOWNLINK_LANES, "pi-02"]
    assert not (site.paths.bundles / "pi-01").exists()
    listed = {d.device: d.revoked for d in site.devices()}
    assert listed["pi-01"] is not None
    assert listed["pi-02"] is None
    with pytest.raises(SiteError, match="revoked already"):
        site.revoke("pi-01")
    with pytest.raises(SiteError, match="no device 'pi-03'"):
        site.revoke("pi-03")
    # A revoked id may come back (a reinstalled device), with a new key; the old one stays retired.
    site.add("pi-01", central_public_key=central)
    site.revoke("pi-01")
    assert len(list(site.paths.revoked.glob("pi-01*.pub"))) == 2


# --- concurrency and atomicity --------------------------------------------------------------------------


def test_the_lock_serialises_runs(tmp_path: Path) -> None:
    lock = tmp_path / "site" / "lock"
    with (
        site_lock(lock),
        pytest.raises(SiteError, match=f"pid {os.getpid()}"),
        site_lock(lock, timeout_s=0.1),
    ):
        pass


def test_concurrent_adds_all_land(tmp_path: Path, central: Path) -> None:
    settings = site_settings(tmp_path)
    Site(settings).setup()
    errors: list[BaseException] = []

    def add(device: str) -> None:
        try:
            Site(settings).add(device, central_public_key=central)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f"pi-{n:02d}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    site = Site(settings)
    assert [d.device for d in site.devices()] == [f"pi-{n:02d}" for n in range(6)]
    users = {line.split(":")[0] for line in site.paths.passwd.read_text().splitlines()}
    assert users == {"nerve-bridge", "nerve-bridge-down", *DOWNLINK_LANES, *(f"pi-{n:02d}" for n in range(6))}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    with pytest.raises(SiteError):
        write_atomic(target, b"new\n", mode=0o600, owner="no-such-user-here")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]


# --- the broker's reload ------------------------------------------------------------------------------


def test_reload_without_a_pid_file_says_what_to_run(tmp_path: Path) -> None:
    outcome = Site(site_settings(tmp_path)).reload_broker()
    assert not outcome.sent
    assert "systemctl reload mosquitto" in outcome.message


def test_reload_never_signals_a_process_that_is_not_mosquitto(tmp_path: Path) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # pytest itself: a SIGHUP would end this run
    outcome = Site(site_settings(tmp_path, broker_pid_file=str(pid_file))).reload_broker()
    assert not outcome.sent
    assert "not mosquitto" in outcome.message
    pid_file.write_text("garbage\n")
    outcome = Site(site_settings(tmp_path, broker_pid_file=str(pid_file))).reload_broker()
    assert not outcome.sent
    assert "systemctl reload mosquitto" in outcome.message


# --- named bridges ----------------------------------------------------------------------------------------


def test_the_acl_gives_each_named_bridge_the_default_bridges_rights() -> None:
    acl = acl_text(
        prefix="nerve",
        bridge_user="nerve-bridge",
        mapped_topics=["zigbee2mqtt/+"],
        named_bridges=["nerve-bridge-a"],
    )
    named = acl[acl.index("user nerve-bridge-a\n") :].splitlines()
    assert named == [
        "user nerve-bridge-a",
        "topic read nerve/#",
        "topic read zigbee2mqtt/+",
        "user nerve-bridge-a-down",
        "topic write nerve/+/commands/#",
    ]
    with pytest.raises(ValueError, match="bridge user"):
        acl_text(prefix="nerve", bridge_user="nerve-bridge", named_bridges=["a/#"])


def test_add_bridge_writes_logins_acl_and_a_working_settings_file(tmp_path: Path) -> None:
    site = Site(site_settings(tmp_path))
    added = site.add_bridge("a")
    second = site.add_bridge("b")
    assert (added.username, added.downlink_username) == ("nerve-bridge-a", "nerve-bridge-a-down")
    settings = load_settings(added.config)
    assert settings.mqtt.username == settings.bridge.client_id == "nerve-bridge-a"
    assert settings.bridge.effective_downlink_client_id == "nerve-bridge-a-down"
    assert settings.mqtt.url == "mqtts://mqtt.site.example:8883"
    group = settings.bridge.shared_group
    assert group is not None
    assert is_token(group)
    assert group.startswith("nerve-")
    assert load_settings(second.config).bridge.shared_group == group  # one group per site
    assert Site(site_settings(tmp_path / "other")).add_bridge("a").config.read_text().count(group) == 0
    passwd = dict(line.split(":", 1) for line in site.paths.passwd.read_text().splitlines())
    assert settings.mqtt.password_file is not None
    assert settings.bridge.downlink_password_file is not None
    assert password_matches(settings.mqtt.password_file.read_text().strip(), passwd["nerve-bridge-a"])
    assert password_matches(
        settings.bridge.downlink_password_file.read_text().strip(), passwd["nerve-bridge-a-down"]
    )
    assert {"nerve-bridge", "nerve-bridge-down", "nerve-bridge-b", "nerve-bridge-b-down"} < set(passwd)
    acl = site.paths.acl.read_text()
    assert "user nerve-bridge-a\n" in acl
    assert "user nerve-bridge-b-down\n" in acl
    assert "user nerve-bridge-b-down-3\ntopic write nerve/+/commands/#\n" in acl
    assert passwd["nerve-bridge-a-down-3"] == passwd["nerve-bridge-a-down"]
    assert mode(added.bundle) == 0o700


def test_add_bridge_refuses_a_name_that_is_a_devices_login(tmp_path: Path, central: Path) -> None:
    site = Site(site_settings(tmp_path))
    with pytest.raises(ConfigError, match="kept for the logins of named bridges"):
        site.add("nerve-bridge-a", central_public_key=central)
    # A device added under such an id before this rule: its id is not given to a bridge.
    site.add("pi-01", central_public_key=central)
    ledger = site.paths.ledger.read_text().replace('"pi-01"', '"nerve-bridge-x-down"')
    site.paths.ledger.write_text(ledger)
    with pytest.raises(SiteError, match="'nerve-bridge-x-down' is a device's id"):
        site.add_bridge("x")
    assert not (site.paths.bridges / "x").exists()


async def test_revoking_a_bridge_that_the_broker_cannot_let_in_says_to_run_it_again(tmp_path: Path) -> None:
    # No broker here: the bridge is cut off in the files, and the run stops, saying what is left to do.
    site = Site(site_settings(tmp_path, port=1))
    site.add_bridge("a")
    with pytest.raises(SiteError, match="run the revoke again once the broker has reloaded"):
        await site.revoke_bridge("a", timeout_s=0.2)
    passwd = site.paths.passwd.read_text()
    assert "nerve-bridge-a-down:" not in passwd  # its downlink login is gone
    assert "nerve-bridge-a-down-1:" not in passwd  # and its other connections' logins
    assert "nerve-bridge-a:" in passwd  # its uplink's stays, with a password only this site has, to leave
    assert "nerve-bridge-a" not in site.paths.acl.read_text()
    assert list((site.paths.bridges / "a").iterdir()) == [site.paths.bridges / "a" / BUNDLE_PASSWORD]
    (info,) = site.bridges()
    assert (info.revoked is not None, info.left) == (True, False)
    with pytest.raises(SiteError, match="is being revoked"):
        site.add_bridge("a")
    kept = (site.paths.bridges / "a" / BUNDLE_PASSWORD).read_text()
    with pytest.raises(SiteError, match="run the revoke again"):
        await site.revoke_bridge("a", timeout_s=0.2)
    assert (site.paths.bridges / "a" / BUNDLE_PASSWORD).read_text() == kept  # no new reload needed
