"""The site broker's identities: a site CA, the broker's certificate, one login per device, and its ACL.

What `nerve devices` keeps (docs/devices.md). Under `<data_dir>/site/` (mode 0700):

```
site.json            the devices: id, when added, when revoked, key fingerprint
lock                 held while a `nerve devices` run changes anything
ca.key ca.crt        the site CA (the key never leaves this directory)
bridge/              the bridge's logins: mqtt-password (uplink), mqtt-password-down (downlink), mqtt-ca.pem
bridges/<name>/      a named bridge (`nerve devices bridge add`): its two passwords, the CA, bridge.yaml
bundles/<id>/        what to copy to a device (0700, files 0600): delete it once copied
broker/              what mosquitto reads (`site.broker_dir`): server.key server.crt ca.crt passwd acl
```

and each active device's public key as `<central.device_keys_dir>/<id>.pub` (a revoked one moves to
`revoked/` below it). Every file is written whole to a temporary name and renamed into place, so a
reader (mosquitto, central) sees the old file or the new one, never half of one.

The password file is mosquitto 2.0's own format, `user:$7$<iterations>$<salt>$<hash>` (PBKDF2-SHA512,
checked against `mosquitto_passwd` and a real broker in the tests): passwords are made here, hashed here,
and only ever written to 0600 files, never passed on a command line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import yaml

from nerve.runtime.config.settings import MAX_DOWNLINK_CONNECTIONS, downlink_lane_names
from nerve.runtime.errors import ConfigError, NerveError
from nerve.runtime.subjects import check_token
from nerve.runtime.trust.devices import registry_dir
from nerve.runtime.trust.signing import PRIVATE_SUFFIX, PUBLIC_SUFFIX, Verifier, generate_keypair

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from nerve.runtime.config.settings import Settings

__all__ = [
    "BRIDGE_CONFIG",
    "DOWNLINK_PASSWORD",
    "BridgeRecord",
    "DeviceRecord",
    "Site",
    "SiteError",
    "SitePaths",
    "acl_text",
    "device_keys_dir",
    "fingerprint",
    "password_hash",
    "password_matches",
]

#: mosquitto_passwd's iteration count in 2.0. Low for a human password, but every password here is
#: 32 random bytes: no guessing gets near it, and a higher count would only slow every CONNECT.
PBKDF2_ITERATIONS: Final = 101
SALT_BYTES: Final = 12  # as mosquitto_passwd
PASSWORD_BYTES: Final = 32
LOCK_TIMEOUT_S: Final = 30.0
_LOCK_POLL_S: Final = 0.05
PRIVATE_MODE: Final = 0o600
PRIVATE_DIR_MODE: Final = 0o700
PUBLIC_MODE: Final = 0o644
#: What a device bundle calls its files (on the device, under `site.device_dir`).
BUNDLE_CA: Final = "mqtt-ca.pem"
BUNDLE_PASSWORD: Final = "mqtt-password"  # noqa: S105 - a file name
#: Where the password of the bridge's downlink login (`site.downlink_user`) is, beside the bridge's.
DOWNLINK_PASSWORD: Final = "mqtt-password-down"  # noqa: S105 - a file name
BUNDLE_TRUSTED: Final = "trusted"
BUNDLE_CONFIG: Final = "edge.yaml"
#: A named bridge's settings file, in its bundle.
BRIDGE_CONFIG: Final = "bridge.yaml"
#: Random bytes in the name of the site's `$share` group. mosquitto's file ACL cannot keep a login out of a
#: shared subscription, and gives the group's messages to a member whose reads it then denies (measured,
#: 2.0.11): a device that joined the group would swallow a share of the uplink. It cannot guess this name.
SHARED_GROUP_BYTES: Final = 16
#: How long `nerve devices bridge revoke` waits for the reloaded broker to let it in (to leave the group).
LEAVE_TIMEOUT_S: Final = 10.0
_LEAVE_RETRY_S: Final = 0.1
_UTC_STAMP: Final = "%Y%m%dT%H%M%SZ"


class SiteError(NerveError):
    """`nerve devices` cannot do what was asked: the message says why (an unknown id, a busy lock, ...)."""


def device_keys_dir(settings: Settings) -> Path:
    """The device public keys central reads: `central.device_keys_dir`, else `<data_dir>/devices`."""
    return registry_dir(settings.central.device_keys_dir, settings.data_dir)


@dataclass(frozen=True, slots=True)
class SitePaths:
    """Where every file of the site lives (see the module's docstring)."""

    root: Path
    broker: Path
    registry: Path

    @classmethod
    def of(cls, settings: Settings) -> SitePaths:
        """The paths for `settings` (nothing is created)."""
        root = settings.data_dir / "site"
        return cls(
            root=root, broker=settings.site.broker_dir or root / "broker", registry=device_keys_dir(settings)
        )

    @property
    def ledger(self) -> Path:
        """`site.json`: the devices and their history."""
        return self.root / "site.json"

    @property
    def lock(self) -> Path:
        """The lock file that serialises `nerve devices` runs."""
        return self.root / "lock"

    @property
    def ca_key(self) -> Path:
        """The site CA's private key (0600)."""
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        """The site CA's certificate (PEM)."""
        return self.root / "ca.crt"

    @property
    def server_key(self) -> Path:
        """The broker's private key (0600; mosquitto's `keyfile`)."""
        return self.broker / "server.key"

    @property
    def server_cert(self) -> Path:
        """The broker's certificate (mosquitto's `certfile`)."""
        return self.broker / "server.crt"

    @property
    def broker_ca(self) -> Path:
        """The site CA's certificate, for mosquitto (`cafile`)."""
        return self.broker / "ca.crt"

    @property
    def passwd(self) -> Path:
        """The `password_file` of mosquitto: one line per active device, and the bridge."""
        return self.broker / "passwd"

    @property
    def acl(self) -> Path:
        """The `acl_file` of mosquitto."""
        return self.broker / "acl"

    @property
    def bridge(self) -> Path:
        """The bridge's logins: `mqtt-password`, `mqtt-password-down` (its downlink) and `mqtt-ca.pem`."""
        return self.root / "bridge"

    @property
    def bridges(self) -> Path:
        """The named bridges' bundles (`bridges/<name>/`)."""
        return self.root / "bridges"

    @property
    def bundles(self) -> Path:
        """Device bundles waiting to be copied."""
        return self.root / "bundles"

    @property
    def revoked(self) -> Path:
        """Where a revoked device's public key goes (central does not read it)."""
        return self.registry / "revoked"


# --- files --------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int, owner: str | None = None) -> None:
    """Write `data` to `path` with `mode` (and `owner`, a user name): a temporary file, then a rename.

    Raises `SiteError` naming the file if it cannot be written or given to `owner`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if owner is not None:
                _give(handle.fileno(), owner, path)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temporary).unlink()
        raise


def _give(fd: int, owner: str, path: Path) -> None:
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise SiteError(f"site.broker_user {owner!r} is not a user on this machine") from None
    try:
        os.fchown(fd, entry.pw_uid, entry.pw_gid)
    except PermissionError:
        raise SiteError(
            f"cannot give {path} to {owner!r} (site.broker_user): only root can; run as root or unset it"
        ) from None


def _private_dir(path: Path, *, owner: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    if owner is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _give(fd, owner, path)
        finally:
            os.close(fd)


@contextlib.contextmanager
def site_lock(path: Path, *, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the site's lock file; raise `SiteError` if another run holds it for longer than `timeout_s`."""
    _private_dir(path.parent)
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE), "r+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise SiteError(
                        f"{path} is held by another `nerve devices` run (pid {holder}) "
                        f"for over {timeout_s:g}s"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- passwords and the ACL ----------------------------------------------------------------------------


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """`$7$<iterations>$<salt>$<hash>`: mosquitto 2.0's PBKDF2-SHA512 password hash (base64 salt and hash)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_matches(password: str, hashed: str) -> bool:
    """Whether `password` is the one `hashed` (a `$7$` hash) was made from."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt, validate=True), int(iterations)
        )
    except ValueError:
        return False
    return secrets.compare_digest(got, expected)


def _read_passwd(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SiteError(f"cannot read the password file {path}: {exc.strerror}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not hashed.startswith("$7$"):
            raise SiteError(
                f"{path}:{number}: not a `user:$7$...` line (the file is nerve's: do not edit it)"
            )
        entries[user] = hashed
    return entries


def _passwd_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


def acl_text(
    *,
    prefix: str,
    bridge_user: str,
    downlink_user: str | None = None,
    mapped_topics: Sequence[str] = (),
    named_bridges: Sequence[str] = (),
    downlink_connections: int = 1,
) -> str:
    """The ACL for mosquitto: each device (user name = device id) to its own topics; the bridge to the uplink.

    A device writes only `<prefix>/<id>/{telemetry,events,results}/...` and `<prefix>/<id>/status`, and reads
    only `<prefix>/<id>/commands/...`. The bridge's uplink login reads everything under the prefix (it
    dead-letters what is mistyped, and ignores commands and presence) and each mapping's foreign topic, and
    writes nothing; its downlink login (`downlink_user`, default `<bridge_user>-down`) writes commands and
    reads nothing, and so do the logins of its other connections (`downlink_connections`: `<it>-1`, ...).
    Each of `named_bridges` (uplink logins, `nerve devices bridge add`) gets the same entries, for itself
    and `<it>-down` (and its `-down-1`, ...).
    """
    check_token(bridge_user, "bridge user")
    downlink_user = downlink_user or f"{bridge_user}-down"
    lines = [
        "# Written by `nerve devices` (nerve.runtime.trust.site), rewritten on every change: do not edit.",
        "# A device logs in with its id as its user name (%u): it publishes only on its own uplink topics",
        "# and reads only its own commands. What it may not publish, mosquitto drops (QoS1: PUBACK 0x87).",
        f"pattern write {prefix}/%u/telemetry/#",
        f"pattern write {prefix}/%u/events/#",
        f"pattern write {prefix}/%u/results/#",
        f"pattern write {prefix}/%u/status",
        f"pattern read {prefix}/%u/commands/#",
        "",
        "# The bridge's uplink: reads the whole uplink (and each bridge.mappings topic), writes nothing.",
        f"user {bridge_user}",
        f"topic read {prefix}/#",
        *(f"topic read {topic}" for topic in mapped_topics),
        "",
        "# The bridge's downlink (connections of its own): writes every device's commands, reads nothing.",
        *_downlink_acl(prefix, downlink_user, downlink_connections),
    ]
    for user in named_bridges:
        check_token(user, "bridge user")
        lines += [
            "",
            "# A bridge of a $share group (`nerve devices bridge add`): the same rights, its own logins.",
            f"user {user}",
            f"topic read {prefix}/#",
            *(f"topic read {topic}" for topic in mapped_topics),
            *_downlink_acl(prefix, f"{user}-down", downlink_connections),
        ]
    return "\n".join(lines) + "\n"


def _downlink_acl(prefix: str, downlink_user: str, connections: int) -> list[str]:
    """Each downlink login (`downlink_lane_names`) may write every device's commands."""
    lines: list[str] = []
    for user in downlink_lane_names(downlink_user, connections):
        lines += [f"user {user}", f"topic write {prefix}/+/commands/#"]
    return lines


def downlink_lane_logins(downlink_user: str) -> tuple[str, ...]:
    """The logins a bridge's downlink connections beyond the first may have: `<downlink_user>-1` ...

    As many as `bridge.downlink_connections` may be (`MAX_DOWNLINK_CONNECTIONS`): a device or bridge
    cannot take any of them.
    """
    return downlink_lane_names(downlink_user, MAX_DOWNLINK_CONNECTIONS)[1:]


# --- certificates -------------------------------------------------------------------------------------


def fingerprint(public_key: str) -> str:
    """`SHA256:<base64>` of a base64 Ed25519 public key's 32 bytes (as ssh shows keys)."""
    raw = base64.b64decode(public_key.strip(), validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _new_ca(days: int) -> tuple[bytes, bytes]:
    """A new site CA: (private key PEM, certificate PEM). ECDSA P-256, valid `days`."""
    from cryptography import x509  # noqa: PLC0415 - only `nerve devices` needs cryptography (the `site` extra)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nerve site CA {secrets.token_hex(4)}")])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # a device whose clock is a little behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, certificate.public_bytes(serialization.Encoding.PEM)


def _new_server_cert(
    ca_key_pem: bytes, ca_cert_pem: bytes, hosts: Sequence[str], days: int
) -> tuple[bytes, bytes]:
    """The broker's key and certificate for `hosts` (names and IPs), signed by the site CA."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SiteError("the site CA key is not an EC key (was it made by nerve devices?)")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, certificate.public_bytes(serialization.Encoding.PEM)


def certificate_summary(pem: bytes) -> tuple[dt.datetime, tuple[str, ...]]:
    """A certificate's expiry and its subject alternative names (empty for a CA)."""
    from cryptography import x509  # noqa: PLC0415

    certificate = x509.load_pem_x509_certificate(pem)
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return certificate.not_valid_after_utc, ()
    names = [str(n) for n in alternative.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in alternative.get_values_for_type(x509.IPAddress)]
    return certificate.not_valid_after_utc, tuple(names)


# --- the ledger ---------------------------------------------------------------------------------------


class DeviceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One device the site knows: when it was added (and revoked), and its key's fingerprint."""

    added: str
    fingerprint: str
    revoked: str | None = None


class BridgeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One named bridge the site knows: its `$share` group, when it was added (and revoked).

    `left` is whether its session has left the group (a revocation's second step): until then its login
    stays, with a password nobody but `nerve devices` has, and no ACL line.
    """

    group: str
    added: str
    revoked: str | None = None
    left: bool = False


class _Ledger(msgspec.Struct, kw_only=True):
    hosts: list[str] = msgspec.field(default_factory=list)
    shared_group: str | None = None  # made by the first `nerve devices bridge add`
    devices: dict[str, DeviceRecord] = msgspec.field(default_factory=dict)
    bridges: dict[str, BridgeRecord] = msgspec.field(default_factory=dict)


def _read_ledger(path: Path) -> _Ledger:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Ledger()
    except OSError as exc:
        raise SiteError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=_Ledger)
    except msgspec.DecodeError as exc:
        raise SiteError(f"{path} is not a site ledger: {exc}") from None


def _write_ledger(path: Path, ledger: _Ledger) -> None:
    write_atomic(path, msgspec.json.format(msgspec.json.encode(ledger)) + b"\n", mode=PRIVATE_MODE)


# --- the site -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reload:
    """What was done to make the running broker read its files again: `sent`, else the command to run."""

    sent: bool
    message: str


@dataclass(frozen=True, slots=True)
class SetUp:
    """What `Site.setup` made: each item one line for a person (nothing secret)."""

    made: tuple[str, ...]
    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Added:
    """A provisioned device: its bundle (copy it, then delete it) and its key's fingerprint."""

    device: str
    bundle: Path
    fingerprint: str
    public_key: Path
    url: str
    setup: SetUp


@dataclass(frozen=True, slots=True)
class AddedBridge:
    """A named bridge made: its bundle (its settings file and passwords) and its two logins."""

    name: str
    bundle: Path
    config: Path
    username: str
    downlink_username: str
    url: str
    setup: SetUp


@dataclass(frozen=True, slots=True)
class RevokedBridge:
    """A named bridge revoked: its logins are gone and its session left its `$share` group."""

    name: str
    username: str
    downlink_username: str
    session_found: bool
    reloads: tuple[Reload, ...]


@dataclass(frozen=True, slots=True)
class BridgeInfo:
    """One line of `nerve devices bridge list`."""

    name: str
    username: str
    downlink_username: str
    added: str
    revoked: str | None
    left: bool


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One line of `nerve devices list`."""

    device: str
    added: str
    revoked: str | None
    fingerprint: str


class Site:
    """The site broker's identities, kept under the data dir. Every change holds the site's lock.

    Raises `SiteError` (state: unknown or existing ids, a busy lock, unreadable files) and `ConfigError`
    (a bad id, missing hosts, a missing central key), each one line.
    """

    def __init__(self, settings: Settings, *, hosts: Sequence[str] = ()) -> None:
        self._settings = settings
        self._paths = SitePaths.of(settings)
        self._hosts = tuple(hosts) or settings.site.hosts

    @property
    def paths(self) -> SitePaths:
        """Where the files are."""
        return self._paths

    def _url(self, hosts: Sequence[str]) -> str:
        return f"mqtts://{_url_host(hosts[0])}:{self._settings.site.port}"

    def _check_device(self, device: str, *, adding: bool = False) -> None:
        try:
            check_token(device, "device id")
        except ValueError as exc:
            raise ConfigError(f"{exc} (no wildcards, no dots, no slashes)", key="ID") from None
        bridge_user = self._settings.site.bridge_user
        downlink_user = self._settings.site.downlink_user
        if device in {bridge_user, downlink_user, *downlink_lane_logins(downlink_user)}:
            raise ConfigError(
                f"{device!r} is one of the bridge's logins (site.bridge_user, and its downlink's "
                "<bridge_user>-down, -down-1, ...): a device cannot have it",
                key="ID",
            )
        if adding and device.startswith(f"{bridge_user}-"):
            raise ConfigError(
                f"{device!r} begins with {bridge_user}-, kept for the logins of named bridges "
                f"(`nerve devices bridge add NAME` makes {bridge_user}-NAME): a device cannot have it",
                key="ID",
            )

    # -- set-up --

    def setup(self, *, renew: bool = False, new_bridge_password: bool = False) -> SetUp:
        """Create what is missing (CA, broker certificate, the bridge's two logins, ACL); hold the lock."""
        with site_lock(self._paths.lock):
            return self._setup(renew=renew, new_bridge_password=new_bridge_password)

    def _setup(self, *, renew: bool = False, new_bridge_password: bool = False) -> SetUp:
        paths, site = self._paths, self._settings.site
        _private_dir(paths.root)
        _private_dir(paths.broker, owner=site.broker_user)
        ledger = _read_ledger(paths.ledger)
        hosts = self._hosts or tuple(ledger.hosts)
        if not hosts:
            raise ConfigError(
                "the broker's host names are not known: pass --host NAME (repeatable) or set site.hosts",
                key="site.hosts",
            )
        made: list[str] = []
        if not paths.ca_key.exists():
            key, cert = _new_ca(site.ca_days)
            write_atomic(paths.ca_key, key, mode=PRIVATE_MODE)
            write_atomic(paths.ca_cert, cert, mode=PUBLIC_MODE)
            made.append(f"site CA {paths.ca_cert} (valid {site.ca_days} days; its key {paths.ca_key}, 0600)")
        ca_cert = paths.ca_cert.read_bytes()
        if renew or not paths.server_cert.exists() or tuple(ledger.hosts) != hosts:
            names = tuple(dict.fromkeys((*hosts, *_LOCAL)))
            key, cert = _new_server_cert(paths.ca_key.read_bytes(), ca_cert, names, site.server_days)
            write_atomic(paths.server_key, key, mode=PRIVATE_MODE, owner=site.broker_user)
            write_atomic(paths.server_cert, cert, mode=PUBLIC_MODE, owner=site.broker_user)
            expires, _ = certificate_summary(cert)
            made.append(
                f"broker certificate {paths.server_cert} for {', '.join(hosts)} (and localhost), "
                f"until {expires.date()} (mosquitto takes it on its next reload)"
            )
        write_atomic(paths.broker_ca, ca_cert, mode=PUBLIC_MODE, owner=site.broker_user)
        passwd = _read_passwd(paths.passwd)
        logins = (
            ("the bridge's login", site.bridge_user, BUNDLE_PASSWORD),
            ("the bridge's downlink login", site.downlink_user, DOWNLINK_PASSWORD),
        )
        for what, user, file_name in logins:
            if new_bridge_password or user not in passwd:
                password = secrets.token_urlsafe(PASSWORD_BYTES)
                _private_dir(paths.bridge)
                write_atomic(paths.bridge / file_name, password.encode() + b"\n", mode=PRIVATE_MODE)
                passwd[user] = password_hash(password)
                made.append(f"{what} {user!r} (password in {paths.bridge / file_name})")
        write_atomic(paths.bridge / BUNDLE_CA, ca_cert, mode=PRIVATE_MODE)
        self._write_broker_files(passwd, ledger)
        if tuple(ledger.hosts) != hosts:
            ledger.hosts = list(hosts)
            _write_ledger(paths.ledger, ledger)
        return SetUp(made=tuple(made), hosts=hosts)

    def _write_broker_files(self, passwd: Mapping[str, str], ledger: _Ledger) -> None:
        """The password file and the ACL: the ACL names the named bridges that are not revoked.

        Each downlink login in `passwd` gets the logins of its other connections (`-1`, ... as many as
        `bridge.downlink_connections` needs), with its password: the site broker makes the login the
        client id, so each connection needs a login of its own. Those of a login that is gone go too.
        """
        site = self._settings.site
        connections = self._settings.bridge.downlink_connections
        mapped = [rule.topic for rule in self._settings.bridge.mappings]
        downlinks = [site.downlink_user, *(self.bridge_logins(name)[1] for name in ledger.bridges)]
        passwd = dict(passwd)
        for downlink in downlinks:
            for lane in downlink_lane_logins(downlink):
                passwd.pop(lane, None)
            if downlink in passwd:
                for lane in downlink_lane_names(downlink, connections)[1:]:
                    passwd[lane] = passwd[downlink]
        acl = acl_text(
            prefix=self._settings.prefix,
            bridge_user=site.bridge_user,
            downlink_user=site.downlink_user,
            mapped_topics=mapped,
            named_bridges=[
                self.bridge_logins(name)[0]
                for name, record in sorted(ledger.bridges.items())
                if record.revoked is None
            ],
            downlink_connections=connections,
        )
        write_atomic(self._paths.acl, acl.encode(), mode=PRIVATE_MODE, owner=site.broker_user)
        write_atomic(
            self._paths.passwd, _passwd_text(passwd).encode(), mode=PRIVATE_MODE, owner=site.broker_user
        )

    def bridge_settings(self, hosts: Sequence[str]) -> dict[str, object]:
        """The `mqtt` settings of the bridge on this site (paths on this machine; no secret)."""
        return {
            "url": self._url(hosts),
            "ca_file": str((self._paths.bridge / BUNDLE_CA).absolute()),
            "username": self._settings.site.bridge_user,
            "password_file": str((self._paths.bridge / BUNDLE_PASSWORD).absolute()),
        }

    def downlink_settings(self) -> dict[str, object]:
        """The `bridge` settings of the bridge's downlink login on this site (no secret)."""
        return {
            "downlink_username": self._settings.site.downlink_user,
            "downlink_password_file": str((self._paths.bridge / DOWNLINK_PASSWORD).absolute()),
        }

    # -- devices --

    def add(self, device: str, *, central_public_key: Path, force: bool = False) -> Added:
        """Provision `device`: a login, a key pair, its public key in the registry, a bundle to copy.

        Raises `ConfigError` (bad id, the bridge's id, unreadable central key) or `SiteError` (already
        active, without `force`).
        """
        self._check_device(device, adding=True)
        central = _read_public_key(central_public_key)
        with site_lock(self._paths.lock):
            ledger = _read_ledger(self._paths.ledger)
            known = ledger.devices.get(device)
            if known is not None and known.revoked is None and not force:
                raise SiteError(
                    f"device {device!r} exists already (added {known.added}); pass --force to replace its "
                    "credentials and key (the old ones stop working)"
                )
            setup = self._setup()
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            bundle, public = self._bundle(device, password, central_public_key.stem, central, setup.hosts)
            registered = self._paths.registry / f"{device}{PUBLIC_SUFFIX}"
            write_atomic(registered, public.encode(), mode=PUBLIC_MODE)
            passwd = _read_passwd(self._paths.passwd)
            passwd[device] = password_hash(password)
            ledger = _read_ledger(self._paths.ledger)
            self._write_broker_files(passwd, ledger)
            ledger.devices[device] = DeviceRecord(added=_now().isoformat(), fingerprint=fingerprint(public))
            _write_ledger(self._paths.ledger, ledger)
            return Added(
                device=device,
                bundle=bundle,
                fingerprint=fingerprint(public),
                public_key=registered,
                url=self._url(setup.hosts),
                setup=setup,
            )

    def _bundle(
        self, device: str, password: str, central_keyid: str, central: str, hosts: Sequence[str]
    ) -> tuple[Path, str]:
        """Write the device's bundle (built aside, then renamed into place); return it and the public key."""
        site = self._settings.site
        _private_dir(self._paths.bundles)
        building = Path(tempfile.mkdtemp(dir=self._paths.bundles, prefix=f".{device}."))
        try:
            private, public_file = generate_keypair(building, device)
            public = public_file.read_text(encoding="ascii").strip()
            public_file.unlink()  # the device needs only its private key; central has the public one
            write_atomic(building / BUNDLE_PASSWORD, password.encode() + b"\n", mode=PRIVATE_MODE)
            write_atomic(building / BUNDLE_CA, self._paths.ca_cert.read_bytes(), mode=PRIVATE_MODE)
            trusted = building / BUNDLE_TRUSTED
            _private_dir(trusted)
            write_atomic(
                trusted / f"{central_keyid}{PUBLIC_SUFFIX}", central.encode() + b"\n", mode=PRIVATE_MODE
            )
            config = edge_config(
                device=device,
                prefix=self._settings.prefix,
                url=self._url(hosts),
                device_dir=site.device_dir,
                signing_key=private.name,
            )
            write_atomic(building / BUNDLE_CONFIG, config.encode(), mode=PRIVATE_MODE)
            final = self._paths.bundles / device
            if final.exists():
                shutil.rmtree(final)
            building.replace(final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return final, public

    def revoke(self, device: str) -> Path:
        """Revoke `device`: its login goes, its public key moves to `revoked/`, a leftover bundle is deleted.

        Returns where the public key went. Raises `SiteError` if the site does not know it as active.
        """
        self._check_device(device)
        with site_lock(self._paths.lock):
            ledger = _read_ledger(self._paths.ledger)
            known = ledger.devices.get(device)
            if known is None:
                raise SiteError(f"no device {device!r} on this site (`nerve devices list` shows them)")
            if known.revoked is not None:
                raise SiteError(f"device {device!r} was revoked already, at {known.revoked}")
            passwd = _read_passwd(self._paths.passwd)
            passwd.pop(device, None)
            self._write_broker_files(passwd, ledger)
            moved = self._retire_key(device)
            shutil.rmtree(self._paths.bundles / device, ignore_errors=True)
            ledger.devices[device] = msgspec.structs.replace(known, revoked=_now().isoformat())
            _write_ledger(self._paths.ledger, ledger)
            return moved

    def _retire_key(self, device: str) -> Path:
        registered = self._paths.registry / f"{device}{PUBLIC_SUFFIX}"
        self._paths.revoked.mkdir(parents=True, exist_ok=True)
        target = self._paths.revoked / f"{device}{PUBLIC_SUFFIX}"
        if target.exists():  # revoked before, re-added since: keep both keys, the older under its date
            stamp = dt.datetime.fromtimestamp(target.stat().st_mtime, dt.UTC).strftime(_UTC_STAMP)
            target.replace(self._paths.revoked / f"{device}.{stamp}{PUBLIC_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            registered.replace(target)
        return target

    def devices(self) -> list[DeviceInfo]:
        """Every device the site knows, active and revoked, by id."""
        ledger = _read_ledger(self._paths.ledger)
        return [
            DeviceInfo(
                device=device, added=record.added, revoked=record.revoked, fingerprint=record.fingerprint
            )
            for device, record in sorted(ledger.devices.items())
        ]

    # -- named bridges (several in a $share group) --

    def bridge_logins(self, name: str) -> tuple[str, str]:
        """The logins of bridge `name`: `<site.bridge_user>-<name>` (uplink) and `<that>-down` (downlink)."""
        uplink = f"{self._settings.site.bridge_user}-{name}"
        return uplink, f"{uplink}-down"

    def _check_bridge(self, name: str) -> None:
        try:
            check_token(name, "bridge name")
        except ValueError as exc:
            raise ConfigError(f"{exc} (no wildcards, no dots, no slashes)", key="NAME") from None
        if re.fullmatch(r"(.*-)?down(-[0-9]+)?", name):
            raise ConfigError(
                f"bridge name {name!r}: `down`, and names ending in -down or -down-<number>, are refused (a "
                "bridge's downlink logins are <its login>-down, -down-1, ..., and would be another bridge's)",
                key="NAME",
            )

    def add_bridge(self, name: str, *, directory: Path | None = None, force: bool = False) -> AddedBridge:
        """Make bridge `name` of the site's `$share` group: two logins, ACL entries, and a bundle.

        The group's name is made at the first bridge, with `SHARED_GROUP_BYTES` random bytes in it (only
        the bundles have it). `directory` is where the bundle's files will be on the bridge's host
        (default: where the bundle is written). Raises `ConfigError` (a bad name) or `SiteError` (an active
        bridge of that name, without `force`; a name whose login is a device's id; a revocation not
        finished).
        """
        self._check_bridge(name)
        uplink, downlink = self.bridge_logins(name)
        with site_lock(self._paths.lock):
            ledger = _read_ledger(self._paths.ledger)
            known = ledger.bridges.get(name)
            if known is not None and known.revoked is None and not force:
                raise SiteError(
                    f"bridge {name!r} exists already (added {known.added}); pass --force to give it new "
                    "passwords (its running connections end at the reload)"
                )
            if known is not None and known.revoked is not None and not known.left:
                raise SiteError(
                    f"bridge {name!r} is being revoked and its session has not left its group yet: "
                    f"finish with `nerve devices bridge revoke {name}` first"
                )
            for login in (uplink, downlink, *downlink_lane_logins(downlink)):
                if login in ledger.devices:
                    raise SiteError(f"{login!r} is a device's id on this site: name the bridge otherwise")
            setup = self._setup()
            ledger = _read_ledger(self._paths.ledger)
            if ledger.shared_group is None:
                ledger.shared_group = f"nerve-{secrets.token_urlsafe(SHARED_GROUP_BYTES)}"
            group = ledger.shared_group
            passwords = (secrets.token_urlsafe(PASSWORD_BYTES), secrets.token_urlsafe(PASSWORD_BYTES))
            bundle = self._bridge_bundle(name, group, passwords, directory, setup.hosts)
            passwd = _read_passwd(self._paths.passwd)
            passwd[uplink] = password_hash(passwords[0])
            passwd[downlink] = password_hash(passwords[1])
            ledger.bridges[name] = BridgeRecord(group=group, added=_now().isoformat())
            self._write_broker_files(passwd, ledger)
            _write_ledger(self._paths.ledger, ledger)
            return AddedBridge(
                name=name,
                bundle=bundle,
                config=bundle / BRIDGE_CONFIG,
                username=uplink,
                downlink_username=downlink,
                url=self._url(setup.hosts),
                setup=setup,
            )

    def _bridge_bundle(
        self,
        name: str,
        group: str,
        passwords: tuple[str, str],
        directory: Path | None,
        hosts: Sequence[str],
    ) -> Path:
        """Write bridge `name`'s bundle (built aside, then renamed into place); return where it is."""
        _private_dir(self._paths.bridges)
        final = self._paths.bridges / name
        building = Path(tempfile.mkdtemp(dir=self._paths.bridges, prefix=f".{name}."))
        try:
            write_atomic(building / BUNDLE_PASSWORD, passwords[0].encode() + b"\n", mode=PRIVATE_MODE)
            write_atomic(building / DOWNLINK_PASSWORD, passwords[1].encode() + b"\n", mode=PRIVATE_MODE)
            write_atomic(building / BUNDLE_CA, self._paths.ca_cert.read_bytes(), mode=PRIVATE_MODE)
            uplink, downlink = self.bridge_logins(name)
            config = bridge_config(
                name=name,
                group=group,
                url=self._url(hosts),
                directory=directory or final.absolute(),
                username=uplink,
                downlink_username=downlink,
            )
            write_atomic(building / BRIDGE_CONFIG, config.encode(), mode=PRIVATE_MODE)
            if final.exists():
                shutil.rmtree(final)
            building.replace(final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return final

    async def revoke_bridge(self, name: str, *, timeout_s: float = LEAVE_TIMEOUT_S) -> RevokedBridge:
        """Revoke bridge `name` and take its session out of its `$share` group; reloads the broker twice.

        mosquitto keeps giving a share of the uplink to a persistent session of the group while its client
        is away (measured, 2.0.11): a revoked bridge's session would swallow its share. So: (1) its
        downlink login and its ACL lines go, and its uplink login gets a password only this site has
        (reload: the bridge is cut off); (2) this process logs in as it, resuming its session, and
        unsubscribes its group's filters: nothing more is routed to it, what was queued for it stays in
        that session until it expires (`mqtt.session_expiry_s`) or the same name is added again; (3) the
        login goes (reload). Raises `SiteError` if it cannot (an unknown name; the broker not reloaded or
        unreachable: run it again, it goes on where it stopped) or `ConfigError` (a bad name).
        """
        try:
            check_token(name, "bridge name")
        except ValueError as exc:
            raise ConfigError(str(exc), key="NAME") from None
        uplink, downlink = self.bridge_logins(name)
        password_file = self._paths.bridges / name / BUNDLE_PASSWORD
        with site_lock(self._paths.lock):
            ledger = _read_ledger(self._paths.ledger)
            known = ledger.bridges.get(name)
            if known is None:
                raise SiteError(f"no bridge {name!r} on this site (`nerve devices bridge list` shows them)")
            if known.left:
                raise SiteError(f"bridge {name!r} was revoked already, at {known.revoked}")
            passwd = _read_passwd(self._paths.passwd)
            if known.revoked is None or not password_file.exists():
                shutil.rmtree(self._paths.bridges / name, ignore_errors=True)
                _private_dir(self._paths.bridges / name)
                password = secrets.token_urlsafe(PASSWORD_BYTES)
                write_atomic(password_file, password.encode() + b"\n", mode=PRIVATE_MODE)
                passwd[uplink] = password_hash(password)
            passwd.pop(downlink, None)
            known = msgspec.structs.replace(known, revoked=known.revoked or _now().isoformat())
            ledger.bridges[name] = known
            self._write_broker_files(passwd, ledger)
            _write_ledger(self._paths.ledger, ledger)
        cut = self.reload_broker()
        session_found = await self._leave_group(uplink, known.group, password_file, cut, timeout_s=timeout_s)
        with site_lock(self._paths.lock):
            ledger = _read_ledger(self._paths.ledger)
            passwd = _read_passwd(self._paths.passwd)
            passwd.pop(uplink, None)
            ledger.bridges[name] = msgspec.structs.replace(known, left=True)
            self._write_broker_files(passwd, ledger)
            _write_ledger(self._paths.ledger, ledger)
            shutil.rmtree(self._paths.bridges / name, ignore_errors=True)
        return RevokedBridge(
            name=name,
            username=uplink,
            downlink_username=downlink,
            session_found=session_found,
            reloads=(cut, self.reload_broker()),
        )

    async def _leave_group(
        self, username: str, group: str, password_file: Path, reload: Reload, *, timeout_s: float
    ) -> bool:
        """Log in as `username` (its session resumed), unsubscribe its uplink filters; True if it had one."""
        # Only a bridge's revocation connects: the other `nerve devices` runs need not import the client.
        from nerve.runtime.config.settings import MqttSettings  # noqa: PLC0415
        from nerve.runtime.wire.client import MqttClient  # noqa: PLC0415
        from nerve.runtime.wire.mqtt import MqttWireError  # noqa: PLC0415

        settings = MqttSettings(
            url=f"mqtts://127.0.0.1:{self._settings.site.port}",
            ca_file=self._paths.ca_cert,
            username=username,
            password_file=password_file,
            session_expiry_s=self._settings.mqtt.session_expiry_s,
        )
        topics = [f"{self._settings.prefix}/#", *(rule.topic for rule in self._settings.bridge.mappings)]
        filters = [*(f"$share/{group}/{topic}" for topic in topics), *topics]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # Receive Maximum 1: what mosquitto queued for the session stays there, unacknowledged.
                async with MqttClient(
                    settings, client_id=username, persistent=True, receive_maximum=1
                ) as client:
                    found = client.session_present
                    await client.unsubscribe(*filters)
                    return found
            except MqttWireError as exc:
                if time.monotonic() >= deadline:
                    hint = "" if reload.sent else f" ({reload.message})"
                    raise SiteError(
                        f"cannot log in to the broker at {settings.url} as {username} to take its session "
                        f"out of the site's $share group: {exc}{hint}; the bridge is cut off, but its "
                        "session still takes a share of the uplink: run the revoke again once the broker "
                        "has reloaded"
                    ) from None
                await asyncio.sleep(_LEAVE_RETRY_S)

    def bridges(self) -> list[BridgeInfo]:
        """Every named bridge the site knows, active and revoked, by name."""
        ledger = _read_ledger(self._paths.ledger)
        return [
            BridgeInfo(
                name=name,
                username=self.bridge_logins(name)[0],
                downlink_username=self.bridge_logins(name)[1],
                added=record.added,
                revoked=record.revoked,
                left=record.left,
            )
            for name, record in sorted(ledger.bridges.items())
        ]

    # -- the running broker --

    def reload_broker(self) -> Reload:
        """SIGHUP to mosquitto (`site.broker_pid_file`), so it reads the password file and ACL again.

        mosquitto 2.0 then checks every connected client against them, and disconnects one whose login is
        gone (tested). Never raises: when it cannot signal, the message is the command to run.
        """
        pid_file = self._settings.site.broker_pid_file
        by_hand = "reload mosquitto: `sudo systemctl reload mosquitto` (or `kill -HUP <its pid>`)"
        if pid_file is None:
            return Reload(sent=False, message=f"site.broker_pid_file is not set; {by_hand}")
        command = f"kill -HUP $(cat {pid_file})"
        try:
            pid = int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a pid"
            return Reload(sent=False, message=f"cannot read a pid from {pid_file} ({why}); {by_hand}")
        try:
            name = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
        except OSError:
            name = "mosquitto"  # no /proc: trust the pid file
        if name != "mosquitto":
            return Reload(
                sent=False,
                message=f"pid {pid} from {pid_file} is {name!r}, not mosquitto (stale?); {by_hand}",
            )
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return Reload(
                sent=False, message=f"no process {pid} (from {pid_file}): is mosquitto running? {by_hand}"
            )
        except PermissionError:
            return Reload(
                sent=False, message=f"not allowed to signal mosquitto (pid {pid}): run `sudo {command}`"
            )
        return Reload(sent=True, message=f"mosquitto (pid {pid}) reloads its password file and ACL (SIGHUP)")


# The broker's certificate is valid for these too: the bridge on the broker's own host can use them.
_LOCAL: Final = ("localhost", "127.0.0.1")


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host  # noqa: PLR2004
    except ValueError:
        return host


def _read_public_key(path: Path) -> str:
    """The base64 public key in `path` (a `.pub`, or a `.key` whose `.pub` is beside it), checked."""
    public = path.with_suffix(PUBLIC_SUFFIX) if path.suffix == PRIVATE_SUFFIX else path
    try:
        text = public.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a key file"
        raise ConfigError(
            f"cannot read central's public key: {why} (pass --central-key, or run `nerve keys generate`)",
            source=str(public),
        ) from None
    Verifier.from_config({public.stem: text})  # raises ConfigError naming it if it is no key
    return text


def bridge_config(
    *, name: str, group: str, url: str, directory: Path, username: str, downlink_username: str
) -> str:
    """The `bridge.yaml` of a named bridge's bundle: its MQTT side; every path under `directory`."""
    settings = {
        "mqtt": {
            "url": url,
            "ca_file": str(directory / BUNDLE_CA),
            "username": username,
            "password_file": str(directory / BUNDLE_PASSWORD),
        },
        "bridge": {
            "client_id": username,  # what the broker calls it anyway (use_username_as_clientid)
            "shared_group": group,
            "downlink_username": downlink_username,
            "downlink_password_file": str(directory / DOWNLINK_PASSWORD),
        },
    }
    header = (
        f"# Written by `nerve devices bridge add {name}`: bridge {name}'s settings for `nerve bridge`,\n"
        "# one of the site broker's $share group (keep its name to the bridges: a device that knew it could\n"
        f"# join the group and swallow a share of the uplink). Every file it names is in {directory}.\n"
        "# Add the rest (nats: its URL and credentials; configs/bridge.yaml has them all); keep these.\n"
    )
    return header + yaml.safe_dump(settings, sort_keys=False)


def edge_config(*, device: str, prefix: str, url: str, device_dir: Path, signing_key: str) -> str:
    """The `edge.yaml` of a bundle: every path under `device_dir`, where the bundle's files go."""
    settings = {
        "prefix": prefix,
        "edge": {
            "device": device,
            "signing_key": str(device_dir / signing_key),
            "trusted_keys_dir": str(device_dir / BUNDLE_TRUSTED),
        },
        "mqtt": {
            "url": url,
            "ca_file": str(device_dir / BUNDLE_CA),
            "username": device,
            "password_file": str(device_dir / BUNDLE_PASSWORD),
        },
    }
    header = (
        f"# Written by `nerve devices add {device}`: device {device}'s settings for `nerve edge`.\n"
        f"# Every file it names is in this directory, which goes to {device_dir} on the device.\n"
        "# Add more (sensors, actions: configs/edge.yaml has them all); keep these.\n"
    )
    return header + yaml.safe_dump(settings, sort_keys=False)
