"""Refusals over a real mosquitto: each says why, and no file anywhere is touched.

A tree (inside the clear_temp root, and outside it) is snapshotted before and compared after every
refusal. The property test mutates one field of a validly signed command that would delete every
file in the root if it ran: whatever hypothesis puts there, the answer is `rejected` (or, when the id
itself is gone, no answer) and the tree is unchanged. Each mutated message is followed by a probe (a
genuine command for another device, always refused) so the test knows when the edge is done with it
without waiting for a silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nerve.edge import CommandJournal, EdgeAgent, Executor
from nerve.runtime.config.settings import MqttSettings, Settings
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import DecodeError
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
def agent(mosquitto: Mosquitto, tmp_path: Path, root: Path, keys: Path, journal: CommandJournal) -> EdgeAgent:
    settings = Settings.model_validate(
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
    executor = Executor.from_settings(settings, device=DEVICE, journal=journal)
    return EdgeAgent(settings=settings, device=DEVICE, executor=executor)


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
