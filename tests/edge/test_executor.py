"""Unit tests of nerve.edge.executor: signed, allow-listed, at most once, never raising. No broker."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nerve.edge.executor import INTERRUPTED_REASON, Executor
from nerve.edge.journal import CommandJournal, JournalState
from nerve.edge.settings import EdgeProcessSettings, handover_json
from nerve.runtime.config.settings import Settings
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import ConfigError
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.edge.conftest import Put


DEVICE = "pi-01"
PREFIX = "nerve"
SOURCE = f"nerve://edge/{DEVICE}"
HOUR = 3600.0
MAX_VALIDITY_S = 300.0


class Clock:
    """The real time, shifted by `offset`."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def as_model(result: CommandResult) -> CommandResult:
    """The executor's answer, decoded from its bytes (which proves them valid)."""
    model = decode(to_msgpack(result), CommandResult)
    assert model == result  # nothing lost on the way
    return model


def topic(action: str = "clear_temp", device: str = DEVICE) -> str:
    return f"{PREFIX}/{device}/commands/{action}"


def make(
    action: str = "clear_temp",
    args: dict[str, Any] | None = None,
    *,
    device: str = DEVICE,
    ttl: timedelta = timedelta(minutes=1),
    command_id: str | None = None,
) -> Command:
    return Command.create(
        device=device,
        action=action,
        args={"older_than_s": HOUR} if args is None else args,
        source="nerve://central/test",
        ttl=ttl,
        command_id=command_id,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def executor(keys: Path, journal: CommandJournal, root: Path, clock: Clock) -> Executor:
    return Executor(
        device=DEVICE,
        verifier=Verifier.from_config({}, keys),
        journal=journal,
        clear_temp_roots=[root],
        clock_skew_s=30.0,
        max_validity_s=MAX_VALIDITY_S,
        source=SOURCE,
        max_payload=64 * 1024,
        clock=clock,
    )


def answer(
    executor: Executor,
    command: Command,
    *,
    on: str | None = None,
    encode: Callable[[Command], bytes] = to_msgpack,
) -> CommandResult:
    result = executor.handle(on or topic(command.action), encode(command), prefix=PREFIX)
    assert result is not None
    return as_model(result)


def assert_refused(result: CommandResult, command: Command, reason: str) -> None:
    assert result.status == "rejected"
    assert reason in result.reason
    assert result.causationid == command.id
    assert result.subject == DEVICE


# --- what runs ---------------------------------------------------------------------------------------


def test_signed_clear_temp_runs(
    executor: Executor, signer: Signer, root: Path, journal: CommandJournal, put: Put
) -> None:
    old = put(root / "old.log", age=2 * HOUR, size=100)
    new = put(root / "new.log", age=0)
    command = signer.sign(make())
    result = answer(executor, command)
    assert result.status == "ok", result.reason
    assert result.data["files_deleted"] == 1
    assert result.data["bytes_freed"] == 100
    assert result.data["skipped"] == 0
    assert result.data["errors"] == []
    assert result.data["summary"].startswith("deleted 1 file")
    assert not old.exists()
    assert new.exists()
    assert (result.subject, result.action, result.source) == (DEVICE, "clear_temp", SOURCE)
    assert result.type == "nerve.result.clear_temp"
    assert (result.causationid, result.correlationid, result.hops) == (command.id, command.id, 1)
    entry = journal.lookup(command.id)
    assert entry is not None
    assert entry.state is JournalState.FINISHED


def test_json_command_runs(executor: Executor, signer: Signer, root: Path, put: Put) -> None:
    old = put(root / "old.log", age=2 * HOUR)
    assert answer(executor, signer.sign(make()), encode=to_json).status == "ok"
    assert not old.exists()


def test_replay_gets_the_recorded_result_and_runs_nothing(
    executor: Executor, signer: Signer, root: Path, put: Put
) -> None:
    put(root / "old.log", age=2 * HOUR)
    payload = to_msgpack(signer.sign(make()))
    first = executor.handle(topic(), payload, prefix=PREFIX)
    later = put(root / "later.log", age=2 * HOUR)
    again = executor.handle(topic(), payload, prefix=PREFIX)
    assert first is not None
    assert again == first
    assert later.exists()


def test_replay_after_expiry_is_refused_as_expired_and_runs_nothing(  # noqa: PLR0917 - fixtures
    executor: Executor, signer: Signer, root: Path, clock: Clock, journal: CommandJournal, put: Put
) -> None:
    put(root / "old.log", age=2 * HOUR)
    command = signer.sign(make(ttl=timedelta(seconds=10)))
    assert answer(executor, command).status == "ok"
    later = put(root / "later.log", age=2 * HOUR)
    clock.offset = timedelta(seconds=41)  # 31 s past expiry, 30 s allowed
    again = answer(executor, command)
    assert again.status == "rejected"
    assert again.reason.startswith("expired: command expired at")
    assert "it was answered before and is not run again" in again.reason
    assert again.causationid == command.id
    assert later.exists()
    # The same request with another expiry (outside the digest): the signature no longer matches.
    forged = msgspec.structs.replace(command, expires=command.expires - timedelta(seconds=1))
    refused = answer(executor, forged)
    assert refused.status == "rejected"
    assert "signature" in refused.reason
    entry = journal.lookup(command.id)
    assert entry is not None
    assert as_model(executor._recorded(entry)).status == "ok"  # type: ignore[arg-type]


def test_within_clock_skew_still_runs(executor: Executor, signer: Signer, clock: Clock) -> None:
    command = signer.sign(make(ttl=timedelta(seconds=10)))
    clock.offset = timedelta(seconds=35)  # 25 s past expiry, 30 s allowed
    assert answer(executor, command).status == "ok"


def test_action_that_raises_is_failed_and_journalled(
    executor: Executor, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("nerve.edge.actions.clear_temp", broken)
    payload = to_msgpack(signer.sign(make()))
    result = executor.handle(topic(), payload, prefix=PREFIX)
    assert result is not None
    assert result.status == "failed"
    assert "OSError: disk on fire" in result.reason
    assert executor.handle(topic(), payload, prefix=PREFIX) == result


# --- refused, and not journalled (nothing about the command can be trusted) ------------------------


@pytest.fixture
def victim(root: Path, put: Put) -> Path:
    """An old file that any run of clear_temp would delete."""
    return put(root / "victim.log", age=2 * HOUR)


def test_forged_signature(executor: Executor, signer: Signer, victim: Path, journal: CommandJournal) -> None:
    genuine = signer.sign(make(args={"older_than_s": 7 * HOUR}))
    forged = msgspec.structs.replace(genuine, data={"older_than_s": 0})
    result = answer(executor, forged)
    assert_refused(result, forged, "bad signature")
    assert victim.exists()
    assert journal.lookup(forged.id) is None


def test_forgery_does_not_poison_the_genuine_command(
    executor: Executor, signer: Signer, victim: Path
) -> None:
    genuine = signer.sign(make())
    forged = msgspec.structs.replace(genuine, data={"older_than_s": 0})
    assert answer(executor, forged).status == "rejected"
    assert answer(executor, genuine).status == "ok"
    assert not victim.exists()


def test_unknown_key(executor: Executor, tmp_path: Path, victim: Path, journal: CommandJournal) -> None:
    generate_keypair(tmp_path / "other", "intruder")
    command = Signer.from_file(tmp_path / "other" / "intruder.key").sign(make())
    assert_refused(answer(executor, command), command, "unknown key id 'intruder'")
    assert victim.exists()
    assert journal.lookup(command.id) is None


def test_unsigned(executor: Executor, victim: Path, journal: CommandJournal) -> None:
    command = make()
    assert_refused(answer(executor, command), command, "not signed")
    assert victim.exists()
    assert journal.lookup(command.id) is None


def test_for_another_device(executor: Executor, signer: Signer, victim: Path) -> None:
    command = signer.sign(make(device="pi-02"))
    result = answer(executor, command)
    assert_refused(result, command, "command is for device 'pi-02', not 'pi-01'")
    assert victim.exists()


def test_action_differs_from_topic(executor: Executor, signer: Signer, victim: Path) -> None:
    command = signer.sign(make())
    result = answer(executor, command, on=topic("reboot"))
    assert_refused(result, command, "does not match its topic's action 'reboot'")
    assert victim.exists()


def test_invalid_topic_action_is_answered(executor: Executor, signer: Signer, victim: Path) -> None:
    command = signer.sign(make())
    result = answer(executor, command, on=f"{PREFIX}/{DEVICE}/commands/not a token")
    assert_refused(result, command, "not valid")
    assert result.action == "clear_temp"
    assert victim.exists()


def test_journal_unavailable_runs_nothing(
    executor: Executor, signer: Signer, victim: Path, journal: CommandJournal
) -> None:
    journal.close()
    command = signer.sign(make())
    assert_refused(answer(executor, command), command, "not run: command journal")
    assert victim.exists()


# --- refused after the signature verified: journalled, so a replay gets the same answer ---------


def test_expired(executor: Executor, signer: Signer, victim: Path) -> None:
    command = signer.sign(make(ttl=timedelta(seconds=-31)))
    result = answer(executor, command)
    assert result.status == "rejected"
    assert result.reason.startswith("expired: ")
    assert "command expired at" in result.reason
    assert "clock skew allowed: 30 s" in result.reason
    assert answer(executor, command) == result
    assert victim.exists()


def timed(signer: Signer, *, time: timedelta, valid_for: timedelta) -> Command:
    """A signed command whose `time` is `time` from now and whose `expires` is `valid_for` after that."""
    start = datetime.now(UTC) + time
    return signer.sign(msgspec.structs.replace(make(), time=start, expires=start + valid_for))


def test_future_dated_is_refused_and_stays_refused_when_its_time_comes(
    executor: Executor, signer: Signer, victim: Path, clock: Clock, journal: CommandJournal
) -> None:
    command = timed(signer, time=timedelta(days=1), valid_for=timedelta(minutes=1))
    result = answer(executor, command)
    assert_refused(result, command, "future-dated: command time is ")
    assert "clock skew allowed: 30 s" in result.reason
    entry = journal.lookup(command.id)
    assert entry is not None
    assert entry.state is JournalState.FINISHED
    # A replay once its time has come: the recorded refusal, nothing runs.
    clock.offset = timedelta(days=1, seconds=5)
    assert answer(executor, command) == result
    assert victim.exists()


def test_a_time_ahead_within_the_clock_skew_runs(executor: Executor, signer: Signer, victim: Path) -> None:
    command = timed(signer, time=timedelta(seconds=20), valid_for=timedelta(minutes=1))
    assert answer(executor, command).status == "ok"
    assert not victim.exists()


@pytest.mark.parametrize(
    ("valid_for", "shown"),
    [(timedelta(days=36500), "3153600000"), (timedelta(seconds=MAX_VALIDITY_S + 0.5), "300.5")],
)
def test_a_validity_window_over_the_maximum_is_refused(
    executor: Executor, signer: Signer, victim: Path, valid_for: timedelta, shown: str
) -> None:
    command = timed(signer, time=timedelta(), valid_for=valid_for)
    result = answer(executor, command)
    assert_refused(result, command, f"validity too long: command is valid for {shown} s (from ")
    assert f"this device accepts at most {MAX_VALIDITY_S:g} s (edge.max_command_validity_s)" in result.reason
    assert answer(executor, command) == result
    assert victim.exists()


def test_a_validity_window_of_exactly_the_maximum_runs(
    executor: Executor, signer: Signer, victim: Path
) -> None:
    command = timed(signer, time=timedelta(), valid_for=timedelta(seconds=MAX_VALIDITY_S))
    assert answer(executor, command).status == "ok"
    assert not victim.exists()


def test_not_allow_listed(executor: Executor, signer: Signer, victim: Path) -> None:
    command = signer.sign(make("reboot", {}))
    result = answer(executor, command)
    assert_refused(result, command, "action 'reboot' is not allow-listed on this device")
    assert answer(executor, command) == result
    assert victim.exists()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"path": "/etc"}, "argument 'path' is not a known argument"),
        ({"older_than_s": "soon"}, "argument 'older_than_s' is a str"),
        ({"older_than_s": -1}, "argument 'older_than_s' is -1"),
        ({"older_than_s": True}, "is a bool"),
    ],
)
def test_bad_arguments(
    executor: Executor, signer: Signer, victim: Path, args: dict[str, Any], reason: str
) -> None:
    command = signer.sign(make(args=args))
    result = answer(executor, command)
    assert_refused(result, command, reason)
    assert answer(executor, command) == result
    assert victim.exists()


def test_without_roots_clear_temp_is_not_allow_listed(
    keys: Path, journal: CommandJournal, signer: Signer, victim: Path
) -> None:
    executor = Executor(
        device=DEVICE,
        verifier=Verifier.from_config({}, keys),
        journal=journal,
        clear_temp_roots=(),
        source=SOURCE,
        max_validity_s=MAX_VALIDITY_S,
    )
    assert executor.actions == frozenset()
    command = signer.sign(make())
    assert_refused(answer(executor, command), command, "not allow-listed on this device (no clear_temp roots")
    assert victim.exists()


# --- after a crash ----------------------------------------------------------------------------------


def test_started_before_a_restart_is_unknown_and_not_run(
    executor: Executor, signer: Signer, victim: Path, journal: CommandJournal
) -> None:
    command = signer.sign(make())
    journal.start(command.id, expires=command.expires)  # the device died while running it
    result = answer(executor, command)
    assert result.status == "unknown"
    assert result.reason == INTERRUPTED_REASON
    assert result.causationid == command.id
    assert answer(executor, command) == result
    assert victim.exists()


def test_forgery_of_an_interrupted_command_is_refused(
    executor: Executor, signer: Signer, victim: Path, journal: CommandJournal
) -> None:
    command = signer.sign(make())
    journal.start(command.id, expires=command.expires)
    forged = msgspec.structs.replace(command, action="reboot")
    assert_refused(answer(executor, forged), forged, "bad signature")
    entry = journal.lookup(command.id)
    assert entry is not None
    assert entry.state is JournalState.STARTED
    assert answer(executor, command).status == "unknown"
    assert victim.exists()


def test_unreadable_recorded_result_is_unknown(
    executor: Executor, signer: Signer, victim: Path, journal: CommandJournal
) -> None:
    command = signer.sign(make())
    journal.finish(command.id, b"\x00garbage", expires=command.expires)
    result = answer(executor, command)
    assert result.status == "unknown"
    assert "cannot be read" in result.reason
    assert victim.exists()


# --- no answer possible -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe garbage", b"not json", b"[1, 2]", b'{"no": "id"}', msgpack.packb({"id": 5})],
)
def test_garbage_gets_no_answer(
    executor: Executor, payload: bytes, victim: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nerve.edge.executor"):
        assert executor.handle(topic(), payload, prefix=PREFIX) is None
    assert "no command id" in caplog.text
    assert victim.exists()


def test_invalid_command_with_an_id_is_answered(executor: Executor, victim: Path) -> None:
    document = {"id": "abc", "correlationid": "chain", "hops": 2, "specversion": "1.0", "subject": DEVICE}
    result = executor.handle(topic(), msgpack.packb(document), prefix=PREFIX)
    assert result is not None
    assert result.status == "rejected"
    assert "not a valid Command" in result.reason
    assert (result.causationid, result.correlationid, result.hops) == ("abc", "chain", 3)
    assert (result.subject, result.action) == (DEVICE, "clear_temp")
    assert victim.exists()


def test_an_oversized_command_is_refused_when_its_id_can_be_read(
    executor: Executor, signer: Signer, victim: Path
) -> None:
    command = signer.sign(make(args={"older_than_s": 0, "pad": "x" * 70_000}))
    result = answer(executor, command)
    assert_refused(result, command, "too large: payload of ")
    assert "exceeds the limit of 65536 bytes" in result.reason
    assert executor.unanswered["oversized"] == 0
    assert victim.exists()


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb({"pad": "x" * 70_000}),
        b"\xff" * 70_000,
        msgpack.packb({"id": 7, "pad": "x" * 70_000}),
        msgpack.packb({"pad": [[[[[]]]]] * 20_000, "id": "abc"})[:-1],  # cut short: malformed
    ],
)
def test_an_oversized_message_without_a_readable_id_is_counted_and_warned_about_once(
    executor: Executor, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(payload) > 64 * 1024
    with caplog.at_level(logging.DEBUG, logger="nerve.edge.executor"):
        assert executor.handle(topic(), payload, prefix=PREFIX) is None
        assert executor.handle(topic(), payload, prefix=PREFIX) is None
    assert executor.unanswered == {"oversized": 2, "no_command_id": 0, "foreign_topic": 0}
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "(oversized): it has no command id to answer: too large: payload of" in warnings[0].getMessage()
    assert "further oversized messages are counted" in warnings[0].getMessage()
    assert sum(
        record.levelno == logging.DEBUG and "dropped" in record.getMessage() for record in caplog.records
    )


def nested(depth: int) -> dict[str, object]:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("encode", [msgpack.packb, lambda document: json.dumps(document).encode()])
def test_a_deeply_nested_command_is_refused_with_its_reason(
    executor: Executor, signer: Signer, victim: Path, encode: Callable[[object], bytes]
) -> None:
    # What the attacker sent: a 1 KB command nested 500 deep (a RecursionError in the handler once).
    document = msgpack.unpackb(to_msgpack(signer.sign(make())), timestamp=3)
    document["data"] = nested(500)
    document["time"] = document["expires"] = "2030-01-01T00:00:00Z"
    payload = encode(document)
    assert len(payload) < 4096
    result = executor.handle(topic(), payload, prefix=PREFIX)
    assert result is not None
    assert result.status == "rejected"
    assert result.causationid == document["id"]
    assert "nested deeper than 32 levels" in result.reason
    assert victim.exists()


def test_a_command_nested_deeper_than_python_can_read_is_counted(executor: Executor) -> None:
    # Its id cannot be read past 30,000 levels of nesting (msgspec stops at Python's recursion limit).
    payload = b'{"id": "abc", "data": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(payload) < 64 * 1024
    assert executor.handle(topic(), payload, prefix=PREFIX) is None
    assert executor.unanswered == {"oversized": 0, "no_command_id": 1, "foreign_topic": 0}


@pytest.mark.parametrize(
    "where",
    [
        f"{PREFIX}/pi-02/commands/clear_temp",
        f"{PREFIX}/{DEVICE}/results/clear_temp",
        f"other/{DEVICE}/commands/clear_temp",
        f"{PREFIX}/pi 02/commands/clear_temp",
        "",
    ],
)
def test_not_our_command_topic_gets_no_answer(
    executor: Executor, signer: Signer, victim: Path, where: str
) -> None:
    assert executor.handle(where, to_msgpack(signer.sign(make())), prefix=PREFIX) is None
    assert victim.exists()


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"device": "pi 01"}, "device"),
        ({"clear_temp_roots": ["relative/tmp"]}, "edge.clear_temp_roots"),
        ({"clock_skew_s": -1.0}, "edge.clock_skew_s"),
        ({"clock_skew_s": 8 * 86400.0}, "edge.clock_skew_s"),
        ({"max_payload": 0}, "max_payload"),
        ({"max_validity_s": 0.0}, "edge.max_command_validity_s"),
    ],
)
def test_bad_configuration(
    keys: Path, journal: CommandJournal, root: Path, change: dict[str, Any], key: str
) -> None:
    arguments: dict[str, Any] = {
        "device": DEVICE,
        "verifier": Verifier.from_config({}, keys),
        "journal": journal,
        "clear_temp_roots": [root],
        "source": SOURCE,
        "max_validity_s": MAX_VALIDITY_S,
    } | change
    with pytest.raises(ConfigError) as caught:
        Executor(**arguments)
    assert caught.value.key == key


@pytest.mark.parametrize("value", [0, -1, 86401])
def test_the_validity_window_setting_is_bounded(value: float) -> None:
    with pytest.raises(ValidationError, match=r"edge\.max_command_validity_s"):
        Settings.model_validate({"edge": {"max_command_validity_s": value}})


def test_the_lean_edge_process_gets_the_validity_window(
    keys: Path, journal: CommandJournal, root: Path, signer: Signer, victim: Path
) -> None:
    settings = Settings.model_validate(
        {
            "edge": {
                "trusted_keys_dir": str(keys),
                "clear_temp_roots": [str(root)],
                "max_command_validity_s": 120,
            }
        }
    )
    lean = EdgeProcessSettings.from_json(handover_json(settings))
    assert lean.edge.max_command_validity_s == 120
    executor = Executor.from_settings(lean, device=DEVICE, journal=journal)
    command = timed(signer, time=timedelta(), valid_for=timedelta(seconds=121))
    assert_refused(answer(executor, command), command, "this device accepts at most 120 s")
    assert victim.exists()


def test_from_settings(keys: Path, journal: CommandJournal, root: Path, signer: Signer, victim: Path) -> None:
    settings = Settings.model_validate(
        {"edge": {"trusted_keys_dir": str(keys), "clear_temp_roots": [str(root)], "clock_skew_s": 5}}
    )
    executor = Executor.from_settings(settings, device=DEVICE, journal=journal)
    assert executor.device == DEVICE
    assert executor.actions == frozenset({"clear_temp"})
    result = answer(executor, signer.sign(make()))
    assert result.status == "ok"
    assert result.source == SOURCE
    assert not victim.exists()


def test_from_settings_without_keys_warns(journal: CommandJournal, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nerve.edge.executor"):
        Executor.from_settings(Settings(), device=DEVICE, journal=journal)
    assert "no trusted keys" in caplog.text


# --- never raises, never runs what it should not (property tests) ---------------------------------

PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(payload=st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_nor_run(executor: Executor, victim: Path, payload: bytes) -> None:
    result = executor.handle(topic(), payload, prefix=PREFIX)
    assert result is None or result.status == "rejected"
    assert victim.exists()


@PROPERTY
@given(where=st.text(max_size=80), payload=st.binary(max_size=64))
def test_arbitrary_topics_never_raise(executor: Executor, where: str, payload: bytes) -> None:
    executor.handle(where, payload, prefix=PREFIX)


@dataclass(frozen=True)
class Executed:
    """A genuine command that ran once, and an old file put in its root afterwards."""

    packed: bytes
    text: bytes
    result: CommandResult
    after: Path


@pytest.fixture
def executed(executor: Executor, signer: Signer, root: Path, put: Put) -> Executed:
    command = signer.sign(make(args={"older_than_s": 60}))
    result = answer(executor, command)
    assert result.status == "ok"
    after = put(root / "after.log", age=2 * HOUR)
    return Executed(packed=to_msgpack(command), text=to_json(command), result=result, after=after)


@PROPERTY
@given(
    use_json=st.booleans(),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mutated_commands_never_raise_nor_run(
    executor: Executor, executed: Executed, use_json: bool, edits: list[tuple[int, int]], cut: int | None
) -> None:
    payload = bytearray(executed.text if use_json else executed.packed)
    for index, value in edits:
        payload[index % len(payload)] = value
    if cut is not None:
        del payload[cut % len(payload) :]
    result = executor.handle(topic(), bytes(payload), prefix=PREFIX)
    # Either the id survived (the journal answers) or the signature no longer holds.
    assert result is None or as_model(result) == executed.result or result.status == "rejected"
    assert executed.after.exists()


@PROPERTY
@given(
    field=st.sampled_from(
        ["id", "subject", "action", "expires", "data", "keyid", "sig", "hops", "time", "source"]
    ),
    value=st.one_of(
        st.text(max_size=20), st.integers(), st.none(), st.dictionaries(st.text(max_size=5), st.integers())
    ),
)
def test_field_changes_never_run(executor: Executor, executed: Executed, field: str, value: object) -> None:
    document = msgpack.unpackb(executed.packed)
    document[field] = value
    try:
        payload = msgpack.packb(document)
    except (OverflowError, TypeError):
        return
    result = executor.handle(topic(), payload, prefix=PREFIX)
    assert result is None or as_model(result) == executed.result or result.status == "rejected"
    assert executed.after.exists()


def test_recorded_result_is_the_msgpack_of_the_answer(
    executor: Executor, signer: Signer, journal: CommandJournal
) -> None:
    command = signer.sign(make())
    result = answer(executor, command)
    entry = journal.lookup(command.id)
    assert entry is not None
    assert entry.result is not None
    assert decode(entry.result, CommandResult) == result
