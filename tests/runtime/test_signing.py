"""Unit tests of nerve.runtime.trust.signing: key files, sign/verify, tampering, trusted-key loading."""

from __future__ import annotations

import base64
import json
import stat
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Command, Event
from nerve.runtime.errors import ConfigError, DecodeError, NerveError, SignatureError
from nerve.runtime.trust.signing import Signer, Verifier, canonical_bytes, generate_keypair

if TYPE_CHECKING:
    from pathlib import Path

TTL = timedelta(seconds=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_command(**args: Any) -> Command:
    return Command.create(
        device="pi-01",
        action="clear_temp",
        args=args or {"older_than_s": 3600, "roots": ["/tmp", "/var/tmp"], "ratio": 0.1, "note": "dïsk ✓"},
        source="central/disk",
        ttl=TTL,
    )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("central", SigningKey.generate())


@pytest.fixture(scope="module")
def verifier(signer: Signer) -> Verifier:
    return Verifier.from_config({"central": signer.public_key})


def signature_error(verifier: Verifier, command: Command) -> str:
    with pytest.raises(SignatureError) as info:
        verifier.verify(command)
    assert isinstance(info.value, NerveError)
    return str(info.value)


# --- key files -----------------------------------------------------------------------------------------


def test_generate_keypair(tmp_path: Path) -> None:
    directory = tmp_path / "keys" / "nested"
    private, public = generate_keypair(directory, "central")
    assert private == directory / "central.key"
    assert public == directory / "central.pub"
    assert mode(private) == 0o600
    seed = base64.b64decode(private.read_text(encoding="ascii").strip(), validate=True)
    assert len(seed) == 32
    assert base64.b64decode(public.read_text(encoding="ascii").strip()) == bytes(SigningKey(seed).verify_key)


def test_generated_keys_sign_and_verify(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "central")
    signer = Signer.from_file(private)
    assert signer.keyid == "central"
    assert Signer.from_file(private, keyid="other").keyid == "other"
    verifier = Verifier.from_config({}, tmp_path)
    assert verifier.keyids == {"central"}
    verifier.verify(signer.sign(make_command()))


def test_private_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    import os  # noqa: PLC0415 - only this test changes the umask

    old = os.umask(0)
    try:
        private, _ = generate_keypair(tmp_path, "central")
    finally:
        os.umask(old)
    assert mode(private) == 0o600


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "central")
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(ConfigError, match="exist already") as info:
        generate_keypair(tmp_path, "central")
    assert info.value.source == str(private)
    assert (private.read_bytes(), public.read_bytes()) == before


def test_refuses_to_overwrite_a_lone_public_key(tmp_path: Path) -> None:
    (tmp_path / "central.pub").write_text("x")
    with pytest.raises(ConfigError, match="exist already"):
        generate_keypair(tmp_path, "central")
    assert not (tmp_path / "central.key").exists()


def test_overwrite_replaces_and_tightens_mode(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "central")
    old = private.read_bytes(), public.read_bytes()
    private.chmod(0o644)
    generate_keypair(tmp_path, "central", overwrite=True)
    assert private.read_bytes() != old[0]
    assert public.read_bytes() != old[1]
    # O_CREAT's mode only applies to new files: a world-readable key must not stay world-readable.
    assert mode(private) == 0o600


@pytest.mark.parametrize("keyid", ["", "bad id", "../escape", "a/b", "x" * 65, "kéy", "a.b"])
def test_bad_keyid(tmp_path: Path, keyid: str) -> None:
    with pytest.raises(ConfigError, match="key id") as info:
        generate_keypair(tmp_path, keyid)
    assert info.value.key == keyid
    assert list(tmp_path.iterdir()) == []


def test_signer_from_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read signing key") as info:
        Signer.from_file(tmp_path / "absent.key")
    assert info.value.source == str(tmp_path / "absent.key")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not base64!!\n", "not valid base64"),
        (base64.b64encode(b"x" * 31) + b"\n", "32 bytes, got 31"),
        (base64.b64encode(b"x" * 64), "32 bytes, got 64"),
        (b"\xff\xfe", "cannot read signing key"),
        (b"", "32 bytes, got 0"),
    ],
)
def test_signer_bad_key_material(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "central.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        Signer.from_file(path)
    assert info.value.source == str(path)


# --- sign and verify -----------------------------------------------------------------------------------


def test_sign_sets_keyid_and_sig(signer: Signer) -> None:
    command = make_command()
    signed = signer.sign(command)
    assert signed.keyid == "central"
    assert len(base64.b64decode(signed.sig, validate=True)) == 64
    assert command.sig == ""  # the original is untouched (frozen)
    assert msgspec.structs.replace(signed, keyid="", sig="") == command


def test_sign_verify_round_trip(signer: Signer, verifier: Verifier) -> None:
    verifier.verify(signer.sign(make_command()))


def test_resigning_a_signed_command_works(signer: Signer, verifier: Verifier) -> None:
    other = Signer("other", SigningKey.generate())
    verifier.verify(signer.sign(other.sign(make_command())))


@pytest.mark.parametrize("encode", [to_msgpack, to_json], ids=["msgpack", "json"])
def test_signature_survives_the_codec(signer: Signer, verifier: Verifier, encode: Any) -> None:
    signed = signer.sign(make_command())
    once = decode(encode(signed), Command)
    verifier.verify(once)
    twice = decode(to_json(once), Command)
    verifier.verify(decode(to_msgpack(twice), Command))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.dictionaries(st.text(max_size=8), json_values, max_size=4), ttl_ms=st.integers(1, 10**9))
def test_signature_survives_the_codec_property(
    signer: Signer, verifier: Verifier, args: dict[str, Any], ttl_ms: int
) -> None:
    command = Command.create(
        device="pi-01", action="reboot", args=args, source="s", ttl=timedelta(milliseconds=ttl_ms)
    )
    signed = signer.sign(command)
    verifier.verify(decode(to_msgpack(signed), Command))
    verifier.verify(decode(to_json(signed), Command))


def test_canonical_bytes_excludes_sig_only(signer: Signer) -> None:
    signed = signer.sign(make_command())
    document = json.loads(canonical_bytes(signed))
    assert "sig" not in document
    assert document["keyid"] == "central"
    assert set(document) == set(json.loads(to_json(signed))) - {"sig"}
    assert canonical_bytes(signed) == canonical_bytes(msgspec.structs.replace(signed, sig="other"))


@pytest.mark.parametrize(
    "update",
    [
        pytest.param({"data": {"older_than_s": 0, "roots": ["/"]}}, id="data"),
        pytest.param({"subject": "pi-02"}, id="subject"),
        pytest.param({"action": "reboot"}, id="action"),
        pytest.param({"type": "nerve.command.reboot"}, id="type"),
        pytest.param({"id": "replayed-id"}, id="id"),
        pytest.param({"hops": 0, "correlationid": "other"}, id="correlationid"),
        pytest.param({"source": "attacker"}, id="source"),
    ],
)
def test_tampering_breaks_the_signature(signer: Signer, verifier: Verifier, update: dict[str, Any]) -> None:
    signed = signer.sign(make_command())
    tampered = msgspec.structs.replace(signed, **update)
    assert tampered != signed
    assert signature_error(verifier, tampered) == "bad signature: the command was altered or forged"


def test_tampering_with_expires_breaks_the_signature(signer: Signer, verifier: Verifier) -> None:
    signed = signer.sign(make_command())
    for delta in (timedelta(days=365), timedelta(microseconds=1)):
        tampered = msgspec.structs.replace(signed, expires=signed.expires + delta)
        assert "bad signature" in signature_error(verifier, tampered)


def test_tampering_on_the_wire_breaks_the_signature(signer: Signer, verifier: Verifier) -> None:
    payload = to_json(signer.sign(make_command()))
    tampered = decode(payload.replace(b'"older_than_s":3600', b'"older_than_s":0'), Command)
    assert tampered.data["older_than_s"] == 0
    assert "bad signature" in signature_error(verifier, tampered)


def test_tampering_with_keyid_breaks_the_signature(signer: Signer) -> None:
    other = Signer("other", SigningKey.generate())
    verifier = Verifier.from_config({"central": signer.public_key, "other": other.public_key})
    signed = signer.sign(make_command())
    verifier.verify(signed)
    relabelled = msgspec.structs.replace(signed, keyid="other")
    assert "bad signature" in signature_error(verifier, relabelled)


def test_forged_with_another_key_under_a_trusted_id(verifier: Verifier) -> None:
    forger = Signer("central", SigningKey.generate())
    assert "bad signature" in signature_error(verifier, forger.sign(make_command()))


def test_distinct_messages(signer: Signer, verifier: Verifier) -> None:
    signed = signer.sign(make_command())
    messages = {
        signature_error(verifier, make_command()),
        signature_error(verifier, msgspec.structs.replace(signed, sig="")),
        signature_error(verifier, msgspec.structs.replace(signed, keyid="")),
        signature_error(verifier, Signer("rogue", SigningKey.generate()).sign(make_command())),
        signature_error(verifier, msgspec.structs.replace(signed, sig="not base64!")),
        signature_error(verifier, msgspec.structs.replace(signed, sig=base64.b64encode(b"short").decode())),
        signature_error(verifier, msgspec.structs.replace(signed, data={})),
    }
    assert messages == {
        "command is not signed",
        "command is signed by unknown key id 'rogue'",
        "signature is not valid base64",
        "bad signature: the command was altered or forged",
    }


def test_empty_verifier_trusts_nothing(signer: Signer) -> None:
    verifier = Verifier({})
    assert verifier.keyids == frozenset()
    assert "unknown key id 'central'" in signature_error(verifier, signer.sign(make_command()))


# --- trusted keys --------------------------------------------------------------------------------------


def test_verifier_from_directory_and_dict(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "central")
    generate_keypair(tmp_path, "rotated")
    (tmp_path / "README.txt").write_text("not a key")
    inline = Signer("inline", SigningKey.generate())
    verifier = Verifier.from_config({"inline": inline.public_key}, tmp_path)
    assert verifier.keyids == {"central", "rotated", "inline"}
    for keyid in ("central", "rotated"):
        verifier.verify(Signer.from_file(tmp_path / f"{keyid}.key").sign(make_command()))
    verifier.verify(inline.sign(make_command()))


def test_verifier_from_dict_with_surrounding_whitespace(signer: Signer) -> None:
    verifier = Verifier.from_config({"central": f"  {signer.public_key}\n"})
    verifier.verify(signer.sign(make_command()))


def test_private_keys_in_the_directory_are_not_trusted(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "central")
    (tmp_path / "central.pub").unlink()
    assert Verifier.from_config({}, tmp_path).keyids == frozenset()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        Verifier.from_config({}, tmp_path / "absent")
    assert info.value.source == str(tmp_path / "absent")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("%%%", "not valid base64"),
        (base64.b64encode(b"k" * 16).decode(), "32 bytes, got 16"),
        ("", "32 bytes, got 0"),
    ],
)
def test_bad_key_material_in_dict(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Verifier.from_config({"central": text})
    assert info.value.source == "trusted key 'central'"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"%%%", "not valid base64"),
        (base64.b64encode(b"k" * 33), "32 bytes, got 33"),
        (b"\xff\xfe\xfd", "cannot read trusted key"),
    ],
)
def test_bad_key_material_in_directory(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "central.pub"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        Verifier.from_config({}, tmp_path)
    assert info.value.source == str(path)


def test_unreadable_pub_entry_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "odd.pub").mkdir()
    with pytest.raises(ConfigError, match="cannot read trusted key") as info:
        Verifier.from_config({}, tmp_path)
    assert info.value.source == str(tmp_path / "odd.pub")


wire_values = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["2031-01-01T00:00:00Z", "pi-02", "reboot", "1.0", "central", ""]),
    json_values,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(data=st.data())
def test_any_mutated_attribute_of_a_signed_command_is_refused(
    signer: Signer, verifier: Verifier, data: st.DataObject
) -> None:
    cause = Event(source="s", type="t", hops=2, correlationid="chain-1")
    signed = signer.sign(
        Command.create(device="pi-01", action="clear_temp", args={"a": [1]}, source="s", ttl=TTL, cause=cause)
    )
    document = json.loads(to_json(signed))
    name = data.draw(st.sampled_from([*sorted(set(document) - {"sig"}), "runas", "datacontenttype"]))
    value = data.draw(wire_values.filter(lambda v: v != document.get(name, object())))
    mutated = {**document, name: value}
    for payload in (json.dumps(mutated).encode(), msgspec.msgpack.encode(mutated)):
        try:
            command = decode(payload, Command)
        except DecodeError:
            continue  # refused before any signature check
        # Decoded as the same command? Only if the value reads back equal (1 == 1.0, say).
        if command == signed:
            continue
        assert signature_error(verifier, command)
