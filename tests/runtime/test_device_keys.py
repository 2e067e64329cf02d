"""Results signed by the device: the signature over a `CommandResult`, and the registry central reads.

`nerve.runtime.trust.devices.DeviceKeys` is the one place central (and `nerve send`, `nerve demo`) decides
whether a result is its device's: unsigned, signed under another key id, by an unknown or a revoked
device, or altered after signing, it is refused with a reason; the registry is read again when its
directory changes, at most once per `recheck_s`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import DecodeError, SignatureError
from nerve.runtime.testing import provision_device
from nerve.runtime.trust.devices import REVOKED_DIR, DeviceKeys, registry_dir
from nerve.runtime.trust.signing import Signer, Verifier, canonical_bytes, generate_keypair, read_public_key

if TYPE_CHECKING:
    from pathlib import Path

    from nacl.signing import VerifyKey

    from nerve.runtime.envelope.model import ResultStatus


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def command(device: str = "pi-01", command_id: str = "cmd-1") -> Command:
    return Command.create(
        device=device,
        action="clear_temp",
        args={"older_than_s": 60},
        source="nerve://central/disk",
        ttl=timedelta(seconds=60),
        command_id=command_id,
    )


def result_of(cmd: Command, *, status: ResultStatus = "ok", reason: str = "", **data: Any) -> CommandResult:
    return CommandResult.for_command(
        cmd,
        source=f"nerve://edge/{cmd.subject}",
        status=status,
        reason=reason,
        data=data or {"files_deleted": 3},
    )


def kind(keys: DeviceKeys, result: CommandResult) -> str | None:
    """Why `keys` refuses `result`, in a word; None: believed."""
    refusal = keys.refusal(result)
    return None if refusal is None else refusal.kind


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "devices"


@pytest.fixture
def pi01(registry: Path) -> Signer:
    return provision_device(registry, "pi-01")


@pytest.fixture
def keys(registry: Path, pi01: Signer) -> DeviceKeys:
    return DeviceKeys(registry)


# --- the signature over a result -------------------------------------------------------------------------


def test_a_signed_result_verifies_and_survives_the_codecs(pi01: Signer, keys: DeviceKeys) -> None:
    signed = pi01.sign(result_of(command()))
    assert (signed.keyid, len(signed.sig)) == ("pi-01", 88)
    for payload in (to_json(signed), to_msgpack(signed)):
        assert keys.refusal(decode(payload, CommandResult)) is None


def test_the_signature_covers_every_attribute_but_sig(pi01: Signer) -> None:
    signed = pi01.sign(result_of(command(), status="failed", reason="disk on fire"))
    covered = json.loads(canonical_bytes(signed))
    assert "sig" not in covered
    for name in ("subject", "causationid", "action", "status", "reason", "data", "time", "keyid", "id"):
        assert name in covered, name


def test_one_verifier_for_commands_and_results(pi01: Signer) -> None:
    verifier = Verifier.from_config({"pi-01": pi01.public_key})
    verifier.verify(pi01.sign(result_of(command())))
    with pytest.raises(SignatureError, match="result is not signed"):
        verifier.verify(result_of(command()))
    with pytest.raises(SignatureError, match="bad signature: the result was altered or forged"):
        verifier.verify(msgspec.structs.replace(pi01.sign(result_of(command())), status="failed"))


wire_values = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["2031-01-01T00:00:00Z", "pi-02", "ok", "failed", "cmd-2", "clear_temp", "1.0", ""]),
    st.dictionaries(st.text(max_size=6), st.integers(-(2**31), 2**31) | st.text(max_size=6), max_size=3),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(data=st.data())
def test_any_mutated_attribute_of_a_signed_result_is_refused(
    pi01: Signer, keys: DeviceKeys, data: st.DataObject
) -> None:
    signed = pi01.sign(result_of(command(), status="ok", files_deleted=3, bytes_freed=4096))
    assert keys.refusal(signed) is None  # verified and remembered: a changed copy must not pass for it
    document = json.loads(to_json(signed))
    name = data.draw(st.sampled_from([*sorted(set(document) - {"sig"}), "expires", "datacontenttype"]))
    value = data.draw(wire_values.filter(lambda v: v != document.get(name, object())))
    mutated = {**document, name: value}
    for payload in (json.dumps(mutated).encode(), msgspec.msgpack.encode(mutated)):
        try:
            result = decode(payload, CommandResult)
        except DecodeError:
            continue  # refused before any signature check
        if result == signed:  # the same result: only if the value reads back equal (1 == 1.0, say)
            continue
        refusal = keys.refusal(result)
        assert refusal is not None
        assert refusal.kind in {"bad_signature", "wrong_keyid", "unknown_device", "revoked", "unsigned"}


def test_a_genuine_result_cannot_be_pointed_at_another_command_or_device(
    registry: Path, pi01: Signer, keys: DeviceKeys
) -> None:
    provision_device(registry, "pi-02")
    genuine = pi01.sign(result_of(command(command_id="old-command")))
    repointed = msgspec.structs.replace(genuine, causationid="new-command")
    refusal = keys.refusal(repointed)
    assert refusal is not None
    assert (refusal.kind, str(refusal)) == (
        "bad_signature",
        "result from pi-01: bad signature: the result was altered or forged",
    )
    # Moved to another device: signed as pi-01, so `keyid` is not the subject; relabelled: bad signature.
    other = msgspec.structs.replace(genuine, subject="pi-02")
    assert kind(keys, other) == "wrong_keyid"
    relabelled = msgspec.structs.replace(genuine, subject="pi-02", keyid="pi-02")
    assert kind(keys, relabelled) == "bad_signature"


# --- what central refuses, and why ------------------------------------------------------------------------


def test_unsigned_result_is_refused(keys: DeviceKeys) -> None:
    refusal = keys.refusal(result_of(command()))
    assert refusal is not None
    assert (refusal.kind, refusal.reason) == ("unsigned", "result from pi-01 is not signed")


def test_result_signed_by_another_devices_key_is_refused(registry: Path, keys: DeviceKeys) -> None:
    pi02 = provision_device(registry, "pi-02")
    refusal = keys.refusal(pi02.sign(result_of(command("pi-01"))))
    assert refusal is not None
    assert refusal.kind == "wrong_keyid"
    assert refusal.reason == "result from pi-01 is signed by key id 'pi-02', not by the device's own key"


def test_result_signed_with_a_key_not_registered_under_the_device_id(
    tmp_path: Path, keys: DeviceKeys
) -> None:
    private, _ = generate_keypair(tmp_path / "rogue", "pi-01")  # the right key id, the wrong key
    refusal = keys.refusal(Signer.from_file(private).sign(result_of(command())))
    assert refusal is not None
    assert refusal.kind == "bad_signature"


def test_unknown_device_is_refused(tmp_path: Path, keys: DeviceKeys) -> None:
    private, _ = generate_keypair(tmp_path / "k", "ghost")
    refusal = keys.refusal(Signer.from_file(private).sign(result_of(command("ghost"))))
    assert refusal is not None
    assert (refusal.kind, refusal.reason) == ("unknown_device", "device ghost has no registered key")
    assert not keys.knows("ghost")
    assert keys.knows("pi-01")


def test_revoked_device_is_refused(registry: Path, pi01: Signer) -> None:
    (registry / REVOKED_DIR).mkdir()
    (registry / "pi-01.pub").rename(registry / REVOKED_DIR / "pi-01.pub")
    keys = DeviceKeys(registry)
    refusal = keys.refusal(pi01.sign(result_of(command())))
    assert refusal is not None
    assert (refusal.kind, refusal.reason) == ("revoked", "device pi-01 is revoked")
    assert keys.knows("pi-01")


def test_a_result_verified_once_is_refused_once_its_device_is_revoked(registry: Path, pi01: Signer) -> None:
    clock = [0.0]
    keys = DeviceKeys(registry, clock=lambda: clock[0])
    result = pi01.sign(result_of(command()))
    assert keys.refusal(result) is None
    assert keys.refusal(result) is None  # the second check remembers the first
    (registry / REVOKED_DIR).mkdir()
    (registry / "pi-01.pub").rename(registry / REVOKED_DIR / "pi-01.pub")
    clock[0] += 60.0  # past the registry's re-read interval
    assert kind(keys, result) == "revoked"


def test_no_registry_directory_believes_nobody(tmp_path: Path, pi01: Signer) -> None:
    keys = DeviceKeys(tmp_path / "nowhere")
    assert keys.devices == frozenset()
    assert kind(keys, pi01.sign(result_of(command()))) == "unknown_device"


def test_a_bad_key_file_is_skipped_with_a_warning(
    registry: Path, pi01: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    (registry / "broken.pub").write_text("not base64!\n")
    (registry / "not a token.pub").write_text((registry / "pi-01.pub").read_text())
    with caplog.at_level(logging.WARNING):
        keys = DeviceKeys(registry)
        assert keys.devices == frozenset({"pi-01"})
    assert "device keys: broken skipped (its results are refused)" in caplog.text
    assert "key is not valid base64" in caplog.text


def test_registry_dir_defaults_to_the_data_dir(tmp_path: Path) -> None:
    assert registry_dir(None, tmp_path) == tmp_path / "devices"
    assert registry_dir(tmp_path / "elsewhere", tmp_path) == tmp_path / "elsewhere"


# --- read again when the directory changes -------------------------------------------------------------


def age(path: Path, seconds: float = 10.0) -> None:
    """Set `path`'s times `seconds` in the past: as if the change was long ago (settled)."""
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_an_added_or_revoked_device_counts_after_the_recheck_interval(registry: Path, pi01: Signer) -> None:
    clock = Clock()
    age(registry)
    keys = DeviceKeys(registry, clock=clock)
    assert keys.devices == frozenset({"pi-01"})
    pi02 = provision_device(registry, "pi-02")
    late = pi02.sign(result_of(command("pi-02")))
    clock.now += 0.5
    assert kind(keys, late) == "unknown_device"  # not looked at yet
    clock.now += 0.6
    assert keys.refusal(late) is None  # a second later: read again
    (registry / REVOKED_DIR).mkdir()
    (registry / "pi-02.pub").rename(registry / REVOKED_DIR / "pi-02.pub")
    clock.now += 1.1
    assert kind(keys, late) == "revoked"
    assert keys.devices == frozenset({"pi-01"})


def test_an_unchanged_directory_is_not_read_again(
    registry: Path, pi01: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    age(registry)
    clock = Clock()
    keys = DeviceKeys(registry, clock=clock)
    assert keys.devices == frozenset({"pi-01"})
    reads: list[Path] = []

    def counted(path: Path, *, what: str = "public key") -> VerifyKey:
        reads.append(path)
        return read_public_key(path, what=what)

    monkeypatch.setattr("nerve.runtime.trust.devices.read_public_key", counted)
    for _ in range(5):
        clock.now += 1.5
        assert keys.refusal(pi01.sign(result_of(command()))) is None
    assert reads == []  # one stat a second, no file read
