"""The edge signs every result it sends with the device's own key (`edge.signing_key`), refusals included."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec
import pytest

from nerve.edge.executor import Executor
from nerve.edge.settings import EdgeProcessSettings, handover_json
from nerve.runtime.config.settings import Settings
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import ConfigError
from nerve.runtime.testing import provision_device
from nerve.runtime.trust.devices import DeviceKeys
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair

if TYPE_CHECKING:
    from pathlib import Path

    from tests.edge.conftest import Put

    from nerve.edge.journal import CommandJournal

DEVICE = "pi-01"
TOPIC = f"nerve/{DEVICE}/commands/clear_temp"


def command(*, ttl: timedelta = timedelta(minutes=1), command_id: str | None = None) -> Command:
    return Command.create(
        device=DEVICE,
        action="clear_temp",
        args={"older_than_s": 3600},
        source="nerve://central/test",
        ttl=ttl,
        command_id=command_id,
    )


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "devices"


@pytest.fixture
def device_key(registry: Path) -> Signer:
    return provision_device(registry, DEVICE)


@pytest.fixture
def executor(keys: Path, journal: CommandJournal, root: Path, device_key: Signer) -> Executor:
    return Executor(
        device=DEVICE,
        verifier=Verifier.from_config({}, keys),
        signer=device_key,
        journal=journal,
        clear_temp_roots=[root],
        max_validity_s=300.0,
        source=f"nerve://edge/{DEVICE}",
    )


def answer(executor: Executor, payload: bytes, topic: str = TOPIC) -> CommandResult:
    result = executor.handle(topic, payload)
    assert result is not None
    return decode(to_msgpack(result), CommandResult)


def test_every_answer_is_signed_by_the_device_and_central_believes_it(
    executor: Executor, signer: Signer, registry: Path, root: Path, put: Put
) -> None:
    put(root / "old.log", age=7200)
    keys = DeviceKeys(registry)
    genuine = signer.sign(command())
    forged = msgspec.structs.replace(signer.sign(command()), data={"older_than_s": 0})
    expired = signer.sign(command(ttl=timedelta(minutes=-5)))
    too_big = b"x" * (70 * 1024)
    answers = {
        "ran": answer(executor, to_msgpack(genuine)),
        "replayed": answer(executor, to_msgpack(genuine)),  # the journal's recorded result
        "forged": answer(executor, to_msgpack(forged)),
        "expired": answer(executor, to_msgpack(expired)),
        "unreadable": answer(executor, b'{"id": "c-1", "action": 3}'),
        "bad topic": answer(executor, to_msgpack(genuine), f"nerve/{DEVICE}/commands/not.valid"),
    }
    assert executor.handle(TOPIC, too_big) is None  # no id to answer: nothing to sign
    assert answers["ran"].status == "ok"
    assert answers["replayed"] == answers["ran"]
    for name, result in answers.items():
        assert result.keyid == DEVICE, name
        assert keys.refusal(result) is None, name
    assert {answers[n].status for n in ("forged", "expired", "unreadable", "bad topic")} == {"rejected"}


def test_the_journal_keeps_results_unsigned_and_replays_are_signed_with_the_key_of_now(
    keys: Path, journal: CommandJournal, root: Path, signer: Signer, registry: Path
) -> None:
    genuine = signer.sign(command(command_id="once"))
    unsigned = Executor(
        device=DEVICE,
        verifier=Verifier.from_config({}, keys),
        journal=journal,
        clear_temp_roots=[root],
        max_validity_s=300.0,
        source="s",
    )
    first = answer(unsigned, to_msgpack(genuine))
    assert (first.keyid, first.sig) == ("", "")
    rotated = provision_device(registry, DEVICE)  # a new key for the device, after the first answer
    signing = Executor(
        device=DEVICE,
        verifier=Verifier.from_config({}, keys),
        signer=rotated,
        journal=journal,
        clear_temp_roots=[root],
        max_validity_s=300.0,
        source="s",
    )
    again = answer(signing, to_msgpack(genuine))
    assert msgspec.structs.replace(again, keyid="", sig="") == first
    assert DeviceKeys(registry).refusal(again) is None


def test_a_key_id_that_is_not_the_device_id_is_refused(
    keys: Path, journal: CommandJournal, root: Path, tmp_path: Path
) -> None:
    private, _ = generate_keypair(tmp_path / "other", "pi-02")
    with pytest.raises(ConfigError, match="the device's key id must be its device id 'pi-01', got 'pi-02'"):
        Executor(
            device=DEVICE,
            verifier=Verifier.from_config({}, keys),
            signer=Signer.from_file(private),
            journal=journal,
            clear_temp_roots=[root],
            max_validity_s=300.0,
            source="s",
        )


def test_from_settings_signs_with_edge_signing_key_in_the_lean_process_too(  # noqa: PLR0917 - fixtures
    keys: Path, journal: CommandJournal, root: Path, signer: Signer, registry: Path, tmp_path: Path
) -> None:
    provision_device(registry, DEVICE, keys=tmp_path / "device-keys")
    settings = Settings.model_validate(
        {
            "edge": {
                "trusted_keys_dir": str(keys),
                "clear_temp_roots": [str(root)],
                "signing_key": str(tmp_path / "device-keys" / f"{DEVICE}.key"),
            }
        }
    )
    lean = EdgeProcessSettings.from_json(handover_json(settings))
    assert lean.edge.signing_key == tmp_path / "device-keys" / f"{DEVICE}.key"
    for view in (settings, lean):
        result = answer(
            Executor.from_settings(view, device=DEVICE, journal=journal), to_msgpack(signer.sign(command()))
        )
        assert DeviceKeys(registry).refusal(result) is None


def test_without_a_signing_key_the_edge_runs_and_warns_once(
    keys: Path, journal: CommandJournal, root: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.model_validate(
        {"edge": {"trusted_keys_dir": str(keys), "clear_temp_roots": [str(root)]}}
    )
    with caplog.at_level(logging.WARNING, logger="nerve.edge.executor"):
        executor = Executor.from_settings(settings, device=DEVICE, journal=journal)
        result = answer(executor, to_msgpack(signer.sign(command())))
    assert result.status == "ok"
    assert (result.keyid, result.sig) == ("", "")
    warnings = [r.getMessage() for r in caplog.records if "signing_key" in r.getMessage()]
    assert warnings == [
        (
            "edge.signing_key is not set: this device's results go out unsigned, and central will not act "
            f"on them (`nerve devices add {DEVICE}` makes its key)"
        )
    ]


def test_an_unreadable_signing_key_is_one_config_error(
    keys: Path, journal: CommandJournal, root: Path, tmp_path: Path
) -> None:
    bad = tmp_path / f"{DEVICE}.key"
    bad.write_text("not a key\n")
    settings = Settings.model_validate({"edge": {"trusted_keys_dir": str(keys), "signing_key": str(bad)}})
    with pytest.raises(ConfigError, match="key is not valid base64"):
        Executor.from_settings(settings, device=DEVICE, journal=journal)
