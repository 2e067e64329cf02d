"""Ed25519 signatures on commands and results.

Central signs commands, devices verify them; devices sign their results, central verifies them
(`nerve.runtime.trust.devices`).

The signature covers the canonical JSON of every attribute of the message but `sig` itself (msgspec's
JSON of the one `Command` or `CommandResult` model, map keys sorted at every level, no spaces; attributes
at their default left out, as in every encoding), so it survives a trip through msgpack or JSON and any
field changed in transit breaks it. Signer and verifier compute it from the same model.

Keys are files: `<keyid>.key` holds the base64 seed (mode 0600), `<keyid>.pub` the base64 public key.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from nerve.runtime.envelope.model import CommandResult
from nerve.runtime.errors import ConfigError, SignatureError
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from nerve.runtime.envelope.model import Command, Fact

PRIVATE_SUFFIX: Final = ".key"
PUBLIC_SUFFIX: Final = ".pub"

#: What a `Signer` signs and a `Verifier` checks with `sign`/`verify`: a command or a command result.
Signed = TypeVar("Signed", "Command", "CommandResult")


def canonical_bytes(message: Command | CommandResult | Fact) -> bytes:
    """The bytes a message's signature covers: its JSON without `sig`, keys sorted at every level."""
    return _CANONICAL.encode(msgspec.structs.replace(message, sig=""))


def _what(message: Command | CommandResult) -> str:
    """How errors name `message`: `command` or `result`."""
    return "result" if isinstance(message, CommandResult) else "command"


_CANONICAL: Final = msgspec.json.Encoder(order="sorted")


def generate_keypair(directory: Path, keyid: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair `<keyid>.key` (0600) and `<keyid>.pub` into `directory`.

    Raises `ConfigError` if the key id is not a token or the files exist and `overwrite` is false.
    """
    if not is_token(keyid):
        raise ConfigError("key id must be 1-64 of A-Z a-z 0-9 _ -", key=keyid)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{keyid}{PRIVATE_SUFFIX}", directory / f"{keyid}{PUBLIC_SUFFIX}"
    if not overwrite and (private.exists() or public.exists()):
        raise ConfigError("key files exist already (pass --force to replace them)", source=str(private))
    key = SigningKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private, flags, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that exists (overwrite)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(base64.b64encode(bytes(key)).decode() + "\n")
    public.write_text(base64.b64encode(bytes(key.verify_key)).decode() + "\n", encoding="ascii")
    return private, public


def _decode_key(text: str, *, source: str, size: int = 32) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("key is not valid base64", source=source) from None
    if len(raw) != size:
        raise ConfigError(f"key must be {size} bytes, got {len(raw)}", source=source)
    return raw


def read_public_key(path: Path, *, what: str = "public key") -> VerifyKey:
    """The base64 public key in `path` (as `generate_keypair` writes `<keyid>.pub`). Raises `ConfigError`."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}", source=str(path)) from None
    return VerifyKey(_decode_key(text, source=str(path)))


class Signer:
    """Signs commands (central, operators) or results (a device, key id = device id) with one private key."""

    def __init__(self, keyid: str, key: SigningKey) -> None:
        self.keyid = keyid
        self._key = key

    @classmethod
    def from_file(cls, path: Path, keyid: str | None = None) -> Signer:
        """Load `<keyid>.key`; the key id defaults to the file's stem. Raises `ConfigError`."""
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read signing key: {exc}", source=str(path)) from None
        return cls(keyid or path.stem, SigningKey(_decode_key(text, source=str(path))))

    @property
    def public_key(self) -> str:
        """The base64 public key that devices must trust."""
        return base64.b64encode(bytes(self._key.verify_key)).decode()

    def sign_bytes(self, data: bytes) -> str:
        """The base64 Ed25519 signature of `data` (facts use it: `nerve.runtime.trust.chain`)."""
        return base64.b64encode(self._key.sign(data).signature).decode()

    def sign(self, message: Signed) -> Signed:
        """Return `message` (a command or a result) with `keyid` and `sig` set."""
        unsigned = msgspec.structs.replace(message, keyid=self.keyid, sig="")
        return msgspec.structs.replace(unsigned, sig=self.sign_bytes(canonical_bytes(unsigned)))


class Verifier:
    """Checks signatures against trusted keys: a device trusts central (several, for rotation)."""

    def __init__(self, trusted: Mapping[str, VerifyKey]) -> None:
        self._trusted = dict(trusted)

    @classmethod
    def from_config(cls, keys: Mapping[str, str], directory: Path | None = None) -> Verifier:
        """Trust the base64 keys in `keys` and every `<keyid>.pub` in `directory`. Raises `ConfigError`."""
        trusted = {
            keyid: VerifyKey(_decode_key(text, source=f"trusted key {keyid!r}"))
            for keyid, text in keys.items()
        }
        if directory is not None:
            if not directory.is_dir():
                raise ConfigError("trusted keys directory does not exist", source=str(directory))
            for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
                trusted[path.stem] = read_public_key(path, what="trusted key")
        return cls(trusted)

    @property
    def keyids(self) -> frozenset[str]:
        """The key ids trusted (a new set each time: for one id, `trusts`)."""
        return frozenset(self._trusted)

    def trusts(self, keyid: str) -> bool:
        """Whether key id `keyid` is trusted (no copy of the set, as `keyids` makes)."""
        return keyid in self._trusted

    def verify(self, message: Command | CommandResult) -> None:
        """Return if `message` is signed by a trusted key; raise `SignatureError` saying why not."""
        self.check(message.keyid, message.sig, lambda: canonical_bytes(message), what=_what(message))

    def check(self, keyid: str, sig: str, signed: Callable[[], bytes], *, what: str = "command") -> None:
        """Return if `sig` by `keyid` signs the bytes `signed()` gives; raise `SignatureError` saying why not.

        `signed` is called only once the key id is known to be trusted; `what` names the thing in errors.
        """
        if not sig or not keyid:
            raise SignatureError(f"{what} is not signed")
        key = self._trusted.get(keyid)
        if key is None:
            raise SignatureError(f"{what} is signed by unknown key id {keyid!r}")
        try:
            signature = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError("signature is not valid base64") from None
        try:
            key.verify(signed(), signature)
        except (BadSignatureError, ValueError, TypeError):  # (data with no JSON form was never signed)
            raise SignatureError(f"bad signature: the {what} was altered or forged") from None
