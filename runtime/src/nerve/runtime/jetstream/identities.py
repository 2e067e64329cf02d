"""NATS identities: one nkey per part (admin, bridge, central, cli), each seed in a file of its own.

An nkey is an Ed25519 key pair in NATS's encoding: the seed `SU...` (base32 of two prefix bytes, the
32-byte seed and a CRC16) stays with the part, in a file of mode 0600; the public key `U...` goes into
the server's configuration. At connect the server sends a `nonce` in its INFO, and the client proves it
holds the seed by signing it (`sign_nonce`): nothing secret crosses the wire or sits in the server's
config. The encoding is the `nkeys` library's (nats-io's); this module adds the checks it leaves out
(the CRC, the user prefix) and the files. See docs/nats.md.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

import nkeys
from nacl.signing import SigningKey

from nerve.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

SEED_SUFFIX: Final = ".nk"
#: Where `nerve up` and `nerve nats-identities` keep the seeds: `<data_dir>/nats/<identity>.nk`.
IDENTITIES_DIR: Final = "nats"
# Any bit for group or others: a seed others can read is refused, as ssh refuses such a key.
_OPEN_BITS: Final = 0o077


class Identity(StrEnum):
    """The parts that talk to NATS, each with its own nkey and permissions (`permissions.py`)."""

    ADMIN = "admin"  # stream and bucket configuration: the only one that may
    BRIDGE = "bridge"
    CENTRAL = "central"
    CLI = "cli"  # the operator's nerve send, facts, deadletters, demo


@dataclass(frozen=True, slots=True)
class NKey:
    """A user nkey loaded from its seed file: signs the server's nonce; `public_key` goes to the config."""

    path: Path
    public_key: str
    _key: SigningKey

    def sign_nonce(self, nonce: str) -> str:
        """The CONNECT `sig` for the INFO `nonce`: Ed25519, base64url without padding."""
        signature = self._key.sign(nonce.encode()).signature
        return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def encode_user_seed(raw: bytes) -> str:
    """The nkey seed text (`SU...`) of 32 raw bytes."""
    return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)).decode()


def decode_user_seed(text: str, *, source: str) -> tuple[bytes, str]:
    """The raw seed and public key (`U...`) of a user seed; `ConfigError` naming `source` if it is not one.

    Stricter than `nkeys.decode_seed`, which takes a wrong checksum: the text must be exactly what
    `encode_user_seed` gives for the seed it holds (so a mistyped character is refused, not a new key).
    """
    seed = text.strip()
    try:
        prefix, raw = nkeys.decode_seed(bytearray(seed.encode("ascii")))
        canonical = bytes(nkeys.encode_seed(bytes(raw), prefix)).decode()
    except (nkeys.NkeysError, binascii.Error, ValueError, IndexError):
        raise ConfigError(
            "not an nkey seed (expected one line SU..., see docs/nats.md)", source=source
        ) from None
    if prefix != nkeys.PREFIX_BYTE_USER:
        raise ConfigError("not a user nkey seed (it must start with SU)", source=source)
    if canonical != seed:
        raise ConfigError("nkey seed fails its checksum (a character is wrong)", source=source)
    keys = nkeys.KeyPair(seed=bytearray(seed.encode("ascii")), keys=SigningKey(bytes(raw)))
    return bytes(raw), bytes(keys.public_key).decode()


def load_nkey(path: Path) -> NKey:
    """Read a user seed file; `ConfigError` naming the file if it is unreadable, open to others, or bad."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ConfigError(f"cannot read the nkey seed: {reason}", source=str(path)) from None
    if not stat.S_ISREG(mode):
        raise ConfigError("the nkey seed is not a regular file", source=str(path))
    if mode & _OPEN_BITS:
        raise ConfigError(
            f"the nkey seed is readable by others (mode {stat.S_IMODE(mode):04o}): chmod 600 it",
            source=str(path),
        )
    raw, public = decode_user_seed(text, source=str(path))
    return NKey(path=path, public_key=public, _key=SigningKey(raw))


def write_seed(path: Path) -> NKey:
    """Create a new user seed in `path` (mode 0600, never more open); `ConfigError` if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("an nkey seed is there already", source=str(path)) from None
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(encode_user_seed(os.urandom(32)) + "\n")
    return load_nkey(path)


def seed_path(directory: Path, identity: Identity) -> Path:
    """Where `identity`'s seed lives in an identities directory: `<directory>/<identity>.nk`."""
    return directory / f"{identity.value}{SEED_SUFFIX}"


def identities_dir(data_dir: Path) -> Path:
    """The identities directory of a data dir: `<data_dir>/nats`."""
    return data_dir / IDENTITIES_DIR


def ensure_identities(directory: Path) -> dict[Identity, NKey]:
    """Every identity's nkey in `directory`, creating the seeds that are missing (0600)."""
    keys: dict[Identity, NKey] = {}
    for identity in Identity:
        path = seed_path(directory, identity)
        keys[identity] = load_nkey(path) if path.exists() else write_seed(path)
    return keys
