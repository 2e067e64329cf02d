"""Refusals over a real mosquitto: each says why, and no file anywhere is touched.

A tree (inside the clear_temp root, and outside it) is snapshotted before and compared after every
refusal. The property test mutates one field of a validly signed command that would delete every
file in the root if it ran: whatever hypothesis puts there, the answer is `rejected` (or, when the id
itself is gone, no answer) and the tree is unchanged. Each mutated message is followed by a probe (a
genuine command for another device, always refused) so the test knows when the edge is done with it
without waiting for a silence.

The hostile property sends mutated, deeply nested, huge-number, wrong-type, non-UTF-8 and oversized
commands through the same handler: each gets a `rejected` result (always, when its id is readable), or
is counted in `Executor.unanswered`, and the handler never raises (every unanswered message is counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nerve.agents.disk import disk_runbook
from nerve.edge import CommandJournal, EdgeAgent, Executor
from nerve.runtime.cli.send import MAX_EXPIRES_S
from nerve.runtime.config.settings import (
    MAX_MAX_COMMAND_VALIDITY_S,
    DiskRunbookSettings,
    EdgeSettings,
    MqttSettings,
    Settings,
)
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import ConfigError, DecodeError
from nerve.runtime.trust.signing import Signer, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.edge.conftest import Put

    from nerve.runtime.stack.brokers import Mosquitto

DEVICE = "pi-01"
WAIT = 10.0
HOUR = 3600.0
TOPIC = f"nerve/{DEVICE}/commands/clear_temp"
RESULTS = f"nerve/{DEVICE}/results/+"
DELETE: Final = object()


def snapshot(*tops: Path) -> dict[str, tuple[bool, float, int]]:
    """Every entry under `tops` (links not followed): is it a link, its mtime, its size."""
    seen: dict[str, tuple[bool, float, int]] = {}
    for top in tops:
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(directory, name)  # noqa: PTH118 - os.walk hands out strings
                st = os.lstat(path)
                seen[path] = (stat.S_ISLNK(st.st_mode), st.st_mtime, st.st_size)
    return seen


@pytest.fixture
def tree(tmp_path: Path, root: Path, put: Put) -> tuple[Path, Path]:
    """Old files in the root, and outside it (an old file, a directory), linked to from the root."""
    outside = tmp_path / "outside"
    put(root / "old.log", age=10 * HOUR)
    put(root / "deep" / "older.log", age=20 * HOUR)
    put(root / "fresh.log", age=0)
    put(outside / "precious.db", age=100 * HOUR)
    (root / "link-to-file").symlink_to(outside / "precious.db")
    (root / "link-to-dir").symlink_to(outside)
    return root, outside


@pytest.fixture
def edge_settings(mosquitto: Mosquitto, tmp_path: Path, root: Path, keys: Path) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),  # the outbox goes there, not into the working directory
            "mqtt": {"url": mosquitto.url},
            "edge": {
                "interval_s": 3600,
                "mounts": [],
                "clear_temp_roots": [str(root)],
                "trusted_keys_dir": str(keys),
                "actions": {"max_args_bytes": 1024},
            },
        }
    )


@pytest.fixture
def executor(edge_settings: Settings, journal: CommandJournal) -> Executor:
    return Executor.from_settings(edge_settings, device=DEVICE, journal=journal)


@pytest.fixture
def agent(edge_settings: Settings, executor: Executor) -> EdgeAgent:
    return EdgeAgent(settings=edge_settings, device=DEVICE, executor=executor)


@contextlib.asynccontextmanager
async def connected(agent: EdgeAgent, url: str) -> AsyncIterator[MqttClient]:
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(WAIT):
            await agent.ready.wait()
        async with MqttClient(MqttSettings(url=url), client_id="refusals") as client:
            await client.subscribe(RESULTS)
            yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def command(args: dict[str, Any], *, device: str = DEVICE, command_id: str | None = None) -> Command:
    return Command.create(
        device=device,
        action="clear_temp",
        args=args,
        source="nerve://test",
        ttl=timedelta(minutes=5),
        command_id=command_id,
    )


async def exchange(client: MqttClient, signer: Signer, payload: bytes) -> list[CommandResult]:
    """Publish `payload`, then a probe; return the results that came before the probe's."""
    probe = signer.sign(command({}, device="probe-device"))
    await client.publish(TOPIC, payload, qos=1)
    await client.publish(TOPIC, to_msgpack(probe), qos=1)
    results: list[CommandResult] = []
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            result = decode(message.payload, CommandResult)
            if result.causationid == probe.id:
                assert result.status == "rejected"
                return results
            results.append(result)
    raise AssertionError("no probe result")  # pragma: no cover


@pytest.mark.broker
@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"path": "../../outside"}, "argument 'path' is not a known argument"),
        ({"root": "/etc"}, "argument 'root' is not a known argument"),
        ({"older_than_s": 0, "roots": ["/"]}, "argument 'roots' is not a known argument"),
        ({"older_than_s": "../"}, "argument 'older_than_s' is a str"),
        ({"older_than_s": 0, "pad": "x" * 2000}, "arguments too large"),
    ],
)
async def test_paths_in_arguments_and_oversized_arguments_are_refused(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto,
    agent: EdgeAgent,
    signer: Signer,
    tree: tuple[Path, Path],
    args: dict[str, Any],
    reason: str,
) -> None:
    before = snapshot(*tree)
    async with connected(agent, mosquitto.url) as client:
        sent = signer.sign(command(args))
        [result] = await exchange(client, signer, to_msgpack(sent))
    assert (result.status, result.causationid) == ("rejected", sent.id)
    assert reason in result.reason
    assert snapshot(*tree) == before


@pytest.mark.broker
async def test_a_symlink_out_of_the_root_is_never_followed(
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, tree: tuple[Path, Path]
) -> None:
    root, outside = tree
    before = snapshot(outside)
    async with connected(agent, mosquitto.url) as client:
        [result] = await exchange(client, signer, to_msgpack(signer.sign(command({"older_than_s": HOUR}))))
    assert result.status == "ok", result.reason
    assert (result.data["files_deleted"], result.data["skipped"]) == (2, 2)
    assert snapshot(outside) == before
    assert (root / "link-to-file").is_symlink()
    assert (root / "link-to-dir").is_symlink()
    assert (root / "fresh.log").exists()


@pytest.mark.broker
async def test_a_replay_runs_nothing_and_a_used_id_with_other_content_is_refused(
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, tree: tuple[Path, Path], put: Put
) -> None:
    root, _ = tree
    genuine = signer.sign(command({"older_than_s": 5 * HOUR}))
    async with connected(agent, mosquitto.url) as client:
        [first] = await exchange(client, signer, to_msgpack(genuine))
        assert first.status == "ok"
        put(root / "later.log", age=10 * HOUR)
        before = snapshot(*tree)
        # The captured bytes again: the recorded result, nothing runs.
        [again] = await exchange(client, signer, to_msgpack(genuine))
        assert again == first
        # A validly signed command that reuses the id for another request: refused as replayed.
        other = signer.sign(command({"older_than_s": 0}, command_id=genuine.id))
        [refused] = await exchange(client, signer, to_msgpack(other))
    assert refused.status == "rejected"
    assert refused.reason.startswith(f"replayed: command id {genuine.id!r} was used before")
    assert snapshot(*tree) == before


@pytest.mark.broker
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("forged", "bad signature"),
        ("unknown-key", "unknown key id 'intruder'"),
        ("wrong-device", "command is for device 'pi-02', not 'pi-01'"),
        ("expired", "command expired at"),
        ("future-dated", "future-dated: command time is "),
        ("over-long", "validity too long: command is valid for 3153600000 s"),
        ("unknown-action", "action 'reboot' is not allow-listed on this device"),
    ],
)
async def test_each_refusal_says_why_and_touches_nothing(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto,
    agent: EdgeAgent,
    signer: Signer,
    tree: tuple[Path, Path],
    tmp_path: Path,
    change: str,
    reason: str,
) -> None:
    wipe = {"older_than_s": 0}
    topic = TOPIC
    if change == "forged":
        sent = msgspec.structs.replace(signer.sign(command({"older_than_s": 9 * HOUR})), data=wipe)
    elif change == "unknown-key":
        generate_keypair(tmp_path / "other", "intruder")
        sent = Signer.from_file(tmp_path / "other" / "intruder.key").sign(command(wipe))
    elif change == "wrong-device":
        sent = signer.sign(command(wipe, device="pi-02"))
    elif change == "expired":
        sent = signer.sign(
            msgspec.structs.replace(command(wipe), expires=command(wipe).time - timedelta(hours=1))
        )
    elif change == "future-dated":  # a day ahead, valid for a minute from then
        ahead = command(wipe).time + timedelta(days=1)
        sent = signer.sign(
            msgspec.structs.replace(command(wipe), time=ahead, expires=ahead + timedelta(minutes=1))
        )
    elif change == "over-long":  # valid for 100 years
        sent = signer.sign(
            msgspec.structs.replace(command(wipe), expires=command(wipe).time + timedelta(days=36500))
        )
    else:
        sent = signer.sign(
            Command.create(device=DEVICE, action="reboot", args={}, source="t", ttl=timedelta(minutes=1))
        )
        topic = f"nerve/{DEVICE}/commands/reboot"
    before = snapshot(*tree)
    async with connected(agent, mosquitto.url) as client:
        await client.publish(topic, to_msgpack(sent), qos=1)
        [result] = await exchange(client, signer, b"\xc1")  # garbage: no answer, only the probe's
    assert result.causationid == sent.id
    assert result.status == "rejected"
    assert reason in result.reason
    assert snapshot(*tree) == before


# Every attribute of a command (its model says which).
FIELDS: Final = Command.__struct_fields__
VALUES: Final = st.one_of(
    st.just(DELETE),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.sampled_from(["older_than_s", "path", "x"]), st.integers(0, 10), max_size=2),
)


@pytest.mark.broker
async def test_any_mutated_field_of_a_signed_command_is_refused_and_touches_nothing(
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, tree: tuple[Path, Path]
) -> None:
    # If this command ran as signed, it would delete every file in the root.
    original = signer.sign(command({"older_than_s": 0}))
    genuine = to_msgpack(original)
    before = snapshot(*tree)
    loop = asyncio.get_running_loop()
    async with connected(agent, mosquitto.url) as client:

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(field=st.sampled_from(FIELDS), value=VALUES)
        def mutated_is_refused(field: str, value: object) -> None:
            document = msgpack.unpackb(genuine)
            assume(document.get(field, DELETE) != value)
            if value is DELETE:
                del document[field]
            else:
                document[field] = value
            payload = msgpack.packb(document)
            # A change that decodes to the same command (null for an absent field, a default deleted)
            # is no change: that command is the genuine one, and it must run.
            with contextlib.suppress(DecodeError):
                assume(decode(payload, Command) != original)
            results = asyncio.run_coroutine_threadsafe(exchange(client, signer, payload), loop).result(
                WAIT * 2
            )
            # A command without an id, or with a bad one, gets no answer: there is nothing to answer to.
            has_id = field != "id" or (isinstance(value, str) and 0 < len(value) <= 128)
            if has_id:
                [result] = results
                assert result.status == "rejected", (field, value, result)
            else:
                assert results == []
            assert snapshot(*tree) == before

        # Hypothesis runs its examples synchronously; the MQTT client lives on this loop.
        await asyncio.to_thread(mutated_is_refused)


# --- hostile payloads through the real handler: every one answered, or counted; nothing raises ------

MAX_PAYLOAD: Final = 64 * 1024  # bridge.max_payload by default: what the edge reads of a command
SENTINEL: Final = "@@hostile@@"
#: What JSON can say that msgpack cannot, or that nerve refuses: out of 64 bits, infinite, or very long.
HUGE_NUMBERS: Final = ("18446744073709551616", "-9223372036854775809", "1e400", "-1e999", "9" * 4000)


@dataclass(frozen=True)
class Hostile:
    """A payload, and the command id it carries in a readable place (None: it may not be answerable)."""

    payload: bytes
    command_id: str | None


def is_message_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128


def nested_data(depth: int) -> object:
    value: object = 0
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


@st.composite
def hostile_payloads(draw: st.DrawFn, genuine: Command) -> Hostile:  # noqa: C901, PLR0911 - one case per kind
    """A hostile variant of `genuine` (a signed command that would wipe the root if it ran)."""
    document: dict[str, Any] = json.loads(to_json(genuine))
    document["id"] = genuine_id = draw(st.uuids()).hex  # a fresh id: nothing is answered from the journal
    as_json = draw(st.booleans())

    def encoded(doc: dict[str, Any]) -> bytes:
        return json.dumps(doc).encode() if as_json else msgpack.packb(doc)

    kind = draw(
        st.sampled_from(["nested", "huge", "wrong-type", "non-utf8", "oversized", "mutated", "bytes"])
    )
    if kind == "nested":  # deeper than the envelope's 32 levels, shallower than what Python can read
        document["data"] = {"older_than_s": 0, "x": nested_data(draw(st.integers(33, 600)))}
        return Hostile(encoded(document), genuine_id)
    if kind == "huge":  # a number that fits no field, in JSON (msgpack cannot even carry most of them)
        field = draw(st.sampled_from([*FIELDS, "data.older_than_s"]))
        if field == "data.older_than_s":
            document["data"]["older_than_s"] = SENTINEL
        else:
            document[field] = SENTINEL
        payload = json.dumps(document).replace(f'"{SENTINEL}"', draw(st.sampled_from(HUGE_NUMBERS))).encode()
        return Hostile(payload, None if field == "id" else genuine_id)
    if kind == "wrong-type":
        field = draw(st.sampled_from(FIELDS))
        value = draw(WRONG_TYPES)
        assume(type(value) is not type(document.get(field)))
        document[field] = value
        payload = encoded(document)
        if field != "id":
            return Hostile(payload, genuine_id)
        return Hostile(payload, value if is_message_id(value) else None)
    if kind == "non-utf8":  # invalid UTF-8 where a string should be
        field = draw(st.sampled_from([name for name in FIELDS if isinstance(document.get(name), str)]))
        document[field] = SENTINEL
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        payload = encoded(document).replace(SENTINEL.encode(), bad.ljust(len(SENTINEL), b"\xfe"))
        return Hostile(payload, None)  # an id may still be read past a bad string elsewhere
    if kind == "oversized":  # over the edge's cap, under the MQTT packet limit (256 KiB)
        document["data"] = {"older_than_s": 0, "pad": "x" * draw(st.integers(MAX_PAYLOAD, 200_000))}
        if draw(st.booleans()):
            return Hostile(encoded(document), genuine_id)
        del document["id"]  # nobody to answer: counted as `oversized`
        return Hostile(encoded(document), None)
    if kind == "mutated":
        edited = bytearray(encoded(document))
        for index, value in draw(
            st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=6)
        ):
            edited[index % len(edited)] = value
        return Hostile(bytes(edited[: draw(st.integers(1, len(edited)))]), None)
    return Hostile(draw(st.binary(max_size=300)), None)


WRONG_TYPES: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=2),
)


@pytest.mark.broker
async def test_hostile_commands_are_each_answered_or_counted_and_nothing_raises(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto,
    agent: EdgeAgent,
    executor: Executor,
    signer: Signer,
    tree: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    genuine = signer.sign(command({"older_than_s": 0}))  # would delete every file in the root
    before = snapshot(*tree)
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {}
    async with connected(agent, mosquitto.url) as client:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(hostile=hostile_payloads(genuine))
        def answered_or_counted(hostile: Hostile) -> None:
            with contextlib.suppress(DecodeError):
                # A change that decodes to the genuine command (a default made explicit) is no change.
                assume(decode(hostile.payload, Command, max_size=10**6) != genuine)
            counted = sum(executor.unanswered.values())
            results = asyncio.run_coroutine_threadsafe(
                exchange(client, signer, hostile.payload), loop
            ).result(WAIT * 2)
            assert len(results) <= 1
            if hostile.command_id is not None:
                [result] = results
                assert result.causationid == hostile.command_id
            if results:
                assert results[0].status == "rejected", results[0]
                assert sum(executor.unanswered.values()) == counted
                seen[results[0].reason.split(":", 1)[0]] = seen.get(results[0].reason.split(":", 1)[0], 0) + 1
            else:
                assert sum(executor.unanswered.values()) == counted + 1
            # Every message the agent did not answer is one the executor counted: none raised.
            assert agent.dropped == sum(executor.unanswered.values())
            assert snapshot(*tree) == before

        await asyncio.to_thread(answered_or_counted)
    assert "could not be handled" not in caplog.text
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "nerve.edge.executor" and "dropped (" in r.getMessage()
    ]
    assert len(warned) == len({message.split("(", 2)[1].split(")")[0] for message in warned}) <= 3
    # Both outcomes came up: answered (by reason) and counted.
    assert seen
    assert sum(executor.unanswered.values()) > 0


@pytest.mark.broker
async def test_the_attackers_command_nested_500_deep_is_refused_with_its_reason(
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, tree: tuple[Path, Path]
) -> None:
    # It raised RecursionError in the handler once: no result, no audit fact.
    document: dict[str, Any] = json.loads(to_json(signer.sign(command({"older_than_s": 0}))))
    document["data"] = {"older_than_s": 0, "x": nested_data(500)}
    payload = msgpack.packb(document)
    assert len(payload) < 1500  # about 1 KB
    before = snapshot(*tree)
    async with connected(agent, mosquitto.url) as client:
        [result] = await exchange(client, signer, payload)
    assert (result.status, result.causationid) == ("rejected", document["id"])
    assert "nested deeper than 32 levels" in result.reason
    assert snapshot(*tree) == before


def test_whatever_sends_commands_keeps_within_the_edges_default_window() -> None:
    window = EdgeSettings().max_command_validity_s
    assert DiskRunbookSettings().command_ttl_s <= window
    assert window >= MAX_EXPIRES_S
    assert window <= MAX_MAX_COMMAND_VALIDITY_S
    with pytest.raises(ConfigError, match="longer than any device accepts a command for") as caught:
        disk_runbook(DiskRunbookSettings(command_ttl_s=MAX_MAX_COMMAND_VALIDITY_S + 1))
    assert caught.value.key == "central.disk.command_ttl_s"
