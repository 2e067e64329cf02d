"""NATS identities without a server: the seed encoding, nonce signatures, the derived permissions."""

from __future__ import annotations

import base64
from pathlib import Path

import nkeys
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from nerve.runtime.engine.names import engine_subjects
from nerve.runtime.errors import ConfigError
from nerve.runtime.jetstream.identities import (
    Identity,
    NKey,
    decode_user_seed,
    encode_user_seed,
    ensure_identities,
    load_nkey,
    seed_path,
)
from nerve.runtime.jetstream.permissions import ADMIN_ONLY_API, INBOXES, permissions, server_config
from nerve.runtime.jetstream.streams import BUCKETS, STREAMS

BASE32: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
seeds = st.binary(min_size=32, max_size=32)


def public_key_of(raw: bytes) -> str:
    """The user public key of a raw seed, computed apart from nerve: prefix, key, CRC16, base32."""
    body = bytes([nkeys.PREFIX_BYTE_USER]) + bytes(SigningKey(raw).verify_key)
    return base64.b32encode(body + nkeys.crc16(bytearray(body)).to_bytes(2, "little")).decode()


@given(seeds)
def test_a_seed_decodes_to_what_it_encodes(raw: bytes) -> None:
    text = encode_user_seed(raw)
    assert text.startswith("SU")
    assert decode_user_seed(text + "\n", source="f") == (raw, public_key_of(raw))


@given(seeds, st.integers(min_value=0, max_value=57), st.sampled_from(BASE32))
def test_a_mistyped_character_is_refused_never_a_new_key(raw: bytes, where: int, char: str) -> None:
    text = encode_user_seed(raw)
    where %= len(text)
    mistyped = text[:where] + char + text[where + 1 :]
    if mistyped == text:
        return
    with pytest.raises(ConfigError, match=r"^f: "):
        decode_user_seed(mistyped, source="f")


@given(st.text(max_size=120))
def test_any_text_is_a_seed_or_one_config_error(text: str) -> None:
    try:
        raw, public = decode_user_seed(text, source="f")
    except ConfigError:
        return
    assert public == public_key_of(raw)


def test_other_kinds_of_seed_are_refused() -> None:
    account = bytes(nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_ACCOUNT)).decode()
    with pytest.raises(ConfigError, match="not a user nkey seed"):
        decode_user_seed(account, source="f")


@given(seeds, st.text(min_size=1, max_size=64))
def test_the_nonce_signature_verifies_and_is_base64url_without_padding(raw: bytes, nonce: str) -> None:
    key = SigningKey(raw)
    text = encode_user_seed(raw)
    _, public = decode_user_seed(text, source="f")
    signature = NKey(path=Path("unused.nk"), public_key=public, _key=key).sign_nonce(nonce)
    assert "=" not in signature
    assert set(signature) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    key.verify_key.verify(nonce.encode(), base64.urlsafe_b64decode(signature + "=="))


def test_identities_are_made_once_with_mode_0600(tmp_path: Path) -> None:
    first = ensure_identities(tmp_path / "nats")
    again = ensure_identities(tmp_path / "nats")
    assert {i: k.public_key for i, k in first.items()} == {i: k.public_key for i, k in again.items()}
    assert len({k.public_key for k in first.values()}) == len(Identity)
    for identity in Identity:
        assert seed_path(tmp_path / "nats", identity).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "nats").stat().st_mode & 0o077 == 0


def test_an_unreadable_or_bad_seed_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'absent.nk'}: cannot read"):
        load_nkey(tmp_path / "absent.nk")
    bad = tmp_path / "bad.nk"
    bad.write_text("SUNOTASEED\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match=f"^{bad}: not an nkey seed"):
        load_nkey(bad)


# --- permissions, derived from the stream and bucket lists ------------------------------------------

PARTS = (Identity.BRIDGE, Identity.CENTRAL, Identity.CLI)


@pytest.mark.parametrize("identity", PARTS)
def test_no_part_is_allowed_the_admin_api_a_wildcard_or_an_inbox(identity: Identity) -> None:
    rules = permissions(identity)
    for subject in rules.publish:
        assert subject not in {">", "$JS.API.>", "$JS.>", INBOXES}
        assert not subject.startswith(("_INBOX", "$JS.API.STREAM.CREATE", "$JS.API.STREAM.UPDATE"))
        assert not subject.startswith(("$JS.API.STREAM.DELETE", "$JS.API.STREAM.PURGE"))
        assert not subject.startswith("$JS.API.CONSUMER.DELETE")
        # The one deletion a part may do: central, of a fired timer once its step is journalled.
        if subject.startswith("$JS.API.STREAM.MSG.DELETE"):
            assert (identity, subject) == (Identity.CENTRAL, "$JS.API.STREAM.MSG.DELETE.NERVE_TIMERS")
    deny = set(rules.deny_publish)
    if identity is Identity.CENTRAL:  # message deletion refused stream by stream, but for the timers
        assert set(ADMIN_ONLY_API) - {"$JS.API.STREAM.MSG.DELETE.>"} <= deny
        assert {f"$JS.API.STREAM.MSG.DELETE.{spec.name}" for spec in STREAMS} <= deny
        assert {f"$JS.API.STREAM.MSG.DELETE.{bucket.stream}" for bucket in BUCKETS} <= deny
        assert "$JS.API.STREAM.MSG.DELETE.NERVE_TIMERS" not in deny
    else:
        assert set(ADMIN_ONLY_API) <= deny
    assert INBOXES in rules.deny_publish


def test_central_may_run_the_engine() -> None:
    """Central's identity reaches the engine's bucket and timers: derived from the lists and its names."""
    central = permissions(Identity.CENTRAL, "site/a").publish
    for subject in engine_subjects("site/a"):
        assert subject in central
    assert "site.a.engine.timers.>" in central
    assert "$JS.API.CONSUMER.DURABLE.CREATE.NERVE_TIMERS.*" in central
    assert "$JS.API.STREAM.INFO.NERVE_TIMERS" in central
    for identity in (Identity.BRIDGE, Identity.CLI):
        assert not set(engine_subjects("site/a")) & set(permissions(identity, "site/a").publish)


def test_only_central_may_publish_facts_and_use_the_buckets() -> None:
    for identity in PARTS:
        publish = permissions(identity).publish
        assert ("nerve.*.facts.*" in publish) is (identity is Identity.CENTRAL)
        for bucket in BUCKETS:
            assert (f"$KV.{bucket.name}.>" in publish) is (identity is Identity.CENTRAL)
    central = permissions(Identity.CENTRAL).publish
    for spec in STREAMS:
        assert f"$JS.API.CONSUMER.DURABLE.CREATE.{spec.name}.*" in central
        assert f"$JS.ACK.{spec.name}.>" in central


def test_permissions_follow_the_prefix() -> None:
    bridge = permissions(Identity.BRIDGE, "site/a").publish
    assert "site.a.*.telemetry.*" in bridge
    assert "site.a.deadletter.bridge" in bridge
    assert "site.a.>" in permissions(Identity.CLI, "site/a").subscribe
    assert '"site.a.*.commands.*"' in server_config(prefix="site/a")


def test_admin_may_do_anything() -> None:
    rules = permissions(Identity.ADMIN)
    assert (rules.publish, rules.subscribe, rules.deny_publish) == ((">",), (">",), ())
