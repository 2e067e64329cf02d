"""The device key registry, reading side: which devices' results central believes.

A directory (`central.device_keys_dir`, unset: `<data_dir>/devices`) holds one `<device>.pub` per
registered device: its Ed25519 public key in base64, as `generate_keypair` writes it. Revoking a device
moves its file into `revoked/` there. `nerve devices` writes the directory; this module only reads it.

`DeviceKeys` reads the directory again when it changed (its modification time, looked at no more than
once per `recheck_s`, a second by default), so a device added or revoked counts within about a second
without restarting central, for the price of one `stat` a second. Adding, removing, renaming or
moving a file changes the directory's time; a file rewritten in place does not, so a key is replaced by
writing the new file beside it and renaming it over the old one (what `nerve devices` does).

A result is believed only if it is signed (`keyid`, `sig`), its `keyid` is its `subject` (a device signs
as itself), the device is registered and not revoked, and the signature verifies against its key
(`nerve.runtime.trust.signing`): the signature covers `subject`, `causationid` (the command), `action`,
`status`, `reason`, `data` and `time`, so a genuine result cannot be replayed for another command or
device either. One unsigned result is believed: the bridge's `expired` for a command the caller sent,
once that command expired (`nerve.runtime.trust.expiry`). See docs/trust.md.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from nerve.runtime.errors import ConfigError, SignatureError
from nerve.runtime.subjects import is_token
from nerve.runtime.trust.expiry import expired_claim_refusal
from nerve.runtime.trust.signing import PUBLIC_SUFFIX, Verifier, canonical_bytes, read_public_key

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime
    from pathlib import Path

    from nacl.signing import VerifyKey

    from nerve.runtime.envelope.model import Command, CommandResult

__all__ = [
    "DEFAULT_RECHECK_S",
    "REFUSAL_KINDS",
    "REVOKED_DIR",
    "DeviceKeys",
    "Refusal",
    "RefusalKind",
    "registry_dir",
]

log = logging.getLogger(__name__)
#: How many verified results `DeviceKeys` remembers (so that a second check of one costs no signature check).
VERIFIED_KEPT: Final = 4096

REVOKED_DIR: Final = "revoked"
DEFAULT_RECHECK_S: Final = 1.0
REGISTRY_DIR_NAME: Final = "devices"

#: Why a result is not believed: no signature; `keyid` is not the result's device; the device has no
#: registered key; its key was revoked; the signature does not verify (altered, forged, replayed).
RefusalKind = Literal["unsigned", "wrong_keyid", "unknown_device", "revoked", "bad_signature"]
REFUSAL_KINDS: Final[tuple[RefusalKind, ...]] = (
    "unsigned",
    "wrong_keyid",
    "unknown_device",
    "revoked",
    "bad_signature",
)


def registry_dir(device_keys_dir: Path | None, data_dir: Path) -> Path:
    """Where central's registry is: `central.device_keys_dir`, else `<data_dir>/devices`."""
    return device_keys_dir if device_keys_dir is not None else data_dir / REGISTRY_DIR_NAME


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a result is not believed: its `kind` (`REFUSAL_KINDS`) and one line for a person."""

    kind: RefusalKind
    reason: str

    def __str__(self) -> str:
        """The reason."""
        return self.reason


@dataclass(frozen=True, slots=True)
class _Snapshot:
    stamp: tuple[int, int] | None  # (mtime_ns of the directory, of revoked/); None: no directory
    verifier: Verifier
    revoked: frozenset[str]
    # False while the directory changed within the last `_SETTLE_NS`: a second change within one tick
    # of the file system's clock would leave its time as it was, so it is read again until then.
    settled: bool = True


_EMPTY: Final = _Snapshot(stamp=None, verifier=Verifier({}), revoked=frozenset())
_SETTLE_NS: Final = 2_000_000_000


class DeviceKeys:
    """The registered devices' public keys, read from `directory` and again whenever it changes.

    Never raises for what is in the directory: a missing directory is an empty registry, and a file
    that is not a valid key is skipped (a warning is logged each time the directory is read), so that
    device's results are refused as unknown. Not thread-safe: one per task that reads results.
    """

    def __init__(
        self,
        directory: Path,
        *,
        recheck_s: float = DEFAULT_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._recheck_s = recheck_s
        self._clock = clock
        self._checked: float | None = None
        self._snapshot = _EMPTY
        #: Results verified against the registry as it is now (central checks a result in its command
        #: audit and again in the step that waits for it): digest of what was signed and the signature.
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._verified_in: Verifier | None = None

    @property
    def directory(self) -> Path:
        """The registry directory."""
        return self._directory

    @property
    def devices(self) -> frozenset[str]:
        """The devices registered now (not revoked)."""
        self._refresh()
        return self._snapshot.verifier.keyids

    def knows(self, device: str) -> bool:
        """Whether `device` is registered or revoked: a device of this fleet, not a name made up."""
        self._refresh()
        return self._snapshot.verifier.trusts(device) or device in self._snapshot.revoked

    def refusal(
        self, result: CommandResult, *, sent: Command | None = None, arrived: datetime | None = None
    ) -> Refusal | None:
        """Why `result` must not be acted on, or None if its device signed it (see the module docstring).

        Given the command the caller `sent` and when the result `arrived` (by the caller's clock), an
        unsigned `expired` result for it is believed on the terms of `nerve.runtime.trust.expiry`.
        """
        if not result.sig or not result.keyid:
            return _unsigned_refusal(result, sent, arrived)
        if result.keyid != result.subject:
            return Refusal(
                "wrong_keyid",
                f"result from {result.subject} is signed by key id {result.keyid[:64]!r}, "
                "not by the device's own key",
            )
        self._refresh()
        snapshot = self._snapshot
        if not snapshot.verifier.trusts(result.subject):
            if result.subject in snapshot.revoked:
                return Refusal("revoked", f"device {result.subject} is revoked")
            return Refusal("unknown_device", f"device {result.subject} has no registered key")
        return self._signature_refusal(result, snapshot.verifier)

    def _signature_refusal(self, result: CommandResult, verifier: Verifier) -> Refusal | None:
        """`refusal`'s last check, remembered for results verified against this registry as it is now."""
        if self._verified_in is not verifier:  # the registry changed (a key revoked, say): check again
            self._verified.clear()
            self._verified_in = verifier
        signed = canonical_bytes(result) + b"\0" + result.sig.encode()
        digest = hashlib.blake2b(signed, digest_size=16).digest()
        if digest in self._verified:
            return None
        try:
            verifier.verify(result)
        except SignatureError as exc:
            return Refusal("bad_signature", f"result from {result.subject}: {exc}")
        self._verified[digest] = None
        if len(self._verified) > VERIFIED_KEPT:
            self._verified.popitem(last=False)
        return None

    def _refresh(self) -> None:
        now = self._clock()
        if self._checked is not None and now - self._checked < self._recheck_s:
            return
        self._checked = now
        stamp = _stamp(self._directory)
        if stamp == self._snapshot.stamp and self._snapshot.settled:
            return
        self._snapshot = _EMPTY if stamp is None else _read(self._directory, stamp)
        log.debug("device keys: %d registered in %s", len(self._snapshot.verifier.keyids), self._directory)


def _unsigned_refusal(
    result: CommandResult, sent: Command | None, arrived: datetime | None
) -> Refusal | None:
    """`DeviceKeys.refusal` of an unsigned result: None only for an `expired` the rule believes."""
    refusal = Refusal("unsigned", f"result from {result.subject} is not signed")
    if sent is None or arrived is None:
        return refusal
    why = expired_claim_refusal(result, sent, arrived=arrived)
    if why is None:
        return None
    if result.status != "expired":
        return refusal
    return Refusal("unsigned", f"{refusal.reason}, and {why}")


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def _stamp(directory: Path) -> tuple[int, int] | None:
    outer = _mtime_ns(directory)
    return None if outer < 0 else (outer, _mtime_ns(directory / REVOKED_DIR))


def _devices_in(directory: Path) -> list[tuple[str, Path]]:
    try:
        paths = sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))
    except OSError as exc:
        log.warning("device keys: cannot list %s: %s", directory, exc)
        return []
    return [(path.stem, path) for path in paths if is_token(path.stem)]


def _read(directory: Path, stamp: tuple[int, int]) -> _Snapshot:
    keys: dict[str, VerifyKey] = {}
    for device, path in _devices_in(directory):
        try:
            keys[device] = read_public_key(path, what="device key")
        except ConfigError as exc:
            log.warning("device keys: %s skipped (its results are refused): %s", device, exc)
    revoked = frozenset(device for device, _ in _devices_in(directory / REVOKED_DIR)) - set(keys)
    settled = time.time_ns() - max(stamp) >= _SETTLE_NS
    return _Snapshot(stamp=stamp, verifier=Verifier(keys), revoked=revoked, settled=settled)
