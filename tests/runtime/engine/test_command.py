"""`step.command`: a signed command sent once, and a durable wait for the device's verified result."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.bridge import Bridge
from nerve.bridge.downlink import SOURCE as BRIDGE
from nerve.runtime.engine import Engine, Step, StepFailed, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine import engine as engine_module
from nerve.runtime.engine.journal import create_record
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, derived_id, utcnow
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.subjects import Address, Kind
from nerve.runtime.testing import provision_device, stream_messages, wait_for_count
from nerve.runtime.trust.devices import DeviceKeys
from nerve.runtime.trust.expiry import EXPIRED_CLAIM_MARGIN_S
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker


@durable_agent("fixer", trigger=Trigger(Kind.EVENTS, "broken"), key=lambda event: str(event.data["device"]))
async def fixer(event: Envelope, step: Step) -> str:
    try:
        result = await step.command(
            "fix",
            device=step.key,
            action="clear_temp",
            args={"older_than_s": 1},
            ttl=float(event.data.get("ttl", 30)),
            attempts=int(event.data.get("attempts", 1)),
        )
    except StepFailed as exc:
        return f"timed out: {exc.reason}"
    return f"{result.status} {result.data.get('files_deleted')}"


class Refusals:
    """Central's part (`ResultRefusals`), recorded: which results were refused."""

    def __init__(self, keys: DeviceKeys) -> None:
        self.keys = keys
        self.refused: list[str] = []

    async def refuse_result(self, result: CommandResult) -> bool:
        if self.keys.refusal(result) is None:
            return False
        self.refused.append(result.id)
        return True


@pytest.fixture
def central(tmp_path: Path) -> tuple[Signer, Verifier]:
    private, _ = generate_keypair(tmp_path / "keys", "central")
    return Signer.from_file(private), Verifier.from_config({}, tmp_path / "keys")


async def commands(js: JetStreamContext) -> list[Command]:
    return [decode(m.data, Command) for m in await stream_messages(js, "NERVE_COMMANDS")]


async def answer(js: JetStreamContext, command: Command, signer: Signer, *, files: int = 3) -> CommandResult:
    result = signer.sign(
        CommandResult.for_command(command, source="t", status="ok", data={"files_deleted": files})
    )
    subject = Address(device=command.subject or "", kind=Kind.RESULTS, name=command.action).subject(PREFIX)
    await publish_envelope(js, subject, result)
    return result


async def test_the_command_is_signed_and_only_its_devices_result_is_acted_on(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    signer, verifier = central
    dev1 = provision_device(tmp_path / "devices", "dev1")
    dev2 = provision_device(tmp_path / "devices", "dev2")
    refusals = Refusals(DeviceKeys(tmp_path / "devices"))
    engine = Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, refusals=refusals)
    async with engine:
        event = await publish_event(js, "broken", {"device": "dev1"}, event_id="e-broken-1")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        verifier.verify(command)  # raises if the signature is bad
        run_id = fixer.run_id(event.id)
        record = await engine.record(run_id)
        assert record is not None
        assert command.id == derived_id(run_id, "step", "fix")  # the step id: a re-run sends it again
        assert command.causationid == event.id
        forged = await answer(js, command, dev2, files=666)  # another device's key: refused
        unsigned = CommandResult.for_command(command, source="t", status="ok", data={"files_deleted": 7})
        await publish_envelope(js, "nerve.dev1.results.clear_temp", unsigned)
        await answer(js, command, dev1)
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result == "ok 3"
    assert forged.id in refusals.refused
    assert unsigned.id in refusals.refused
    assert len(await commands(js)) == 1


async def test_a_result_that_came_while_no_engine_ran_is_found_and_nothing_is_sent_twice(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    signer, _ = central
    dev3 = provision_device(tmp_path / "devices", "dev3")
    keys = DeviceKeys(tmp_path / "devices")
    async with Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys):
        event = await publish_event(js, "broken", {"device": "dev3"}, event_id="e-broken-3")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
    (command,) = await commands(js)
    await answer(js, command, dev3, files=5)  # the engine is gone: the result waits in NERVE_RESULTS
    async with Engine(
        nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys
    ) as engine:
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=20)
    assert done.result == "ok 5"
    assert len(await commands(js)) == 1  # sent again on resume under the same id: kept once


async def test_no_result_in_time_sends_again_under_a_new_id_then_fails_the_step(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    signer, _ = central
    keys = DeviceKeys(tmp_path / "devices")
    async with Engine(
        nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys
    ) as engine:
        data = {"device": "dev4", "ttl": 0.1, "attempts": 2}
        event = await publish_event(js, "broken", data, event_id="e-broken-4")
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=40)
    assert str(done.result).startswith("timed out: no result from dev4 to clear_temp within")
    sent = await commands(js)
    assert len(sent) == 2
    assert len({command.id for command in sent}) == 2
    assert done.steps["fix"].status == "failed"
    assert done.steps["fix"].attempts == 2


async def test_a_result_refused_without_a_registry(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    """An engine told of no device registry believes no result: the step times out."""
    signer, _ = central
    dev5 = provision_device(tmp_path / "devices", "dev5")
    async with Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer) as engine:
        event = await publish_event(js, "broken", {"device": "dev5", "ttl": 0.5}, event_id="e-broken-5")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        await answer(js, command, dev5)
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=30)
    assert str(done.result).startswith("timed out")


async def test_a_command_step_needs_a_signer(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "broken", {"device": "dev6"}, event_id="e-broken-6")
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=20)
    assert done.state == "failed"
    assert "no signer" in done.error


async def test_a_crash_after_the_send_before_its_journal_entry_still_finds_the_result(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    """The send, its journal entry and its timer go out together: the entry may never land.

    Here it never does (the first engine's write of the waiting step hangs, as for a process killed
    there); the device answers meanwhile. The next engine resumes from the step before, sends the same
    id again (kept once) and reads the result from a place before the first send.
    """
    signer, _ = central
    dev5 = provision_device(tmp_path / "devices", "dev5")
    keys = DeviceKeys(tmp_path / "devices")
    first = Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys)
    hung = asyncio.Event()
    async with first:
        real_update = first.kv.update

        async def update(key: str, value: bytes, last: int | None = None) -> int:
            if b'"waiting"' in value:  # the command step's entry: never stored
                hung.set()
                await asyncio.get_running_loop().create_future()
            return await real_update(key, value, last=last)

        first.kv.update = update  # type: ignore[method-assign,assignment]
        event = await publish_event(js, "broken", {"device": "dev5"}, event_id="e-broken-5")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        async with asyncio.timeout(10):
            await hung.wait()
        (command,) = await commands(js)
        await answer(js, command, dev5, files=9)
    run_id = fixer.run_id(event.id)
    async with Engine(
        nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys
    ) as engine:
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result == "ok 9"
    assert len(await commands(js)) == 1  # the same id twice: kept once


async def test_a_trigger_whose_journal_failed_after_its_command_left_finds_the_answer_when_it_comes_again(
    nc: NatsClient,
    js: JetStreamContext,
    tmp_path: Path,
    central: tuple[Signer, Verifier],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first delivery starts the run while its journal is on its way: here NATS fails that journal
    after the command left, and the device answers before the trigger comes again (2 s later).

    The second delivery journals first and reads results from where NERVE_RESULTS was when the trigger
    was stored: it finds the answer, sends nothing twice, and the run ends ok. (Reading from where the
    stream was at the second delivery, it waited in vain and timed out.)
    """
    signer, _ = central
    dev7 = provision_device(tmp_path / "devices", "dev7")
    provision_device(tmp_path / "devices", "dev8")
    keys = DeviceKeys(tmp_path / "devices")
    failed = asyncio.Event()
    real_create = create_record

    async def create(kv: KeyValue, run_id: str, data: bytes) -> int | None:
        if not failed.is_set():
            await wait_for_count(js, "NERVE_COMMANDS", 1)  # the run's command left first
            failed.set()
            raise NatsTimeoutError
        return await real_create(kv, run_id, data)

    monkeypatch.setattr(engine_module, "create_record", create)
    async with Engine(
        nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys
    ) as engine:
        event = await publish_event(js, "broken", {"device": "dev7", "ttl": 3}, event_id="e-broken-7")
        async with asyncio.timeout(10):
            await failed.wait()
        (command,) = await commands(js)
        await answer(js, command, dev7, files=4)
        # A busy central reads NERVE_RESULTS' position again in the meantime (here for another run),
        # so at the second delivery the position it knows is past the answer.
        await asyncio.sleep(1.2)
        await publish_event(js, "broken", {"device": "dev8", "ttl": 0.5}, event_id="e-broken-8")
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=30)
    assert done.result == "ok 4"
    assert [sent.id for sent in await commands(js) if sent.subject == "dev7"] == [command.id]


@durable_agent("halves", trigger=Trigger(Kind.EVENTS, "halved"), key=lambda event: str(event.data["device"]))
async def halves(event: Envelope, step: Step) -> str:
    """`send`, a fact while the command is out, then `result`; or `result` alone, which is a mistake."""
    if event.data.get("mistake"):
        await step.result("fix")
        return "unreachable"
    command_id = await step.send("fix", device=step.key, action="clear_temp", args={}, ttl=30)
    await step.fact("out", kind="command_issued", summary=f"sent {command_id}")
    result = await step.result("fix")
    return f"{command_id == step.id('fix')} {result.status}"


async def test_send_then_result_are_the_command_in_two_halves(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    signer, _ = central
    dev6 = provision_device(tmp_path / "devices", "dev6")
    keys = DeviceKeys(tmp_path / "devices")
    async with Engine(
        nc=nc, agents=[halves], prefix=PREFIX, settings=FAST, signer=signer, device_keys=keys
    ) as engine:
        event = await publish_event(js, "halved", {"device": "dev6"}, event_id="e-halved-1")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        await answer(js, command, dev6)
        done = await wait_for_run(engine.kv, halves.run_id(event.id), timeout=20)
        assert done.result == "True ok"
        assert list(done.steps) == ["fix", "out"]
        mistake = await publish_event(
            js, "halved", {"device": "dev7", "mistake": True}, event_id="e-halved-2"
        )
        failed = await wait_for_run(engine.kv, halves.run_id(mistake.id), timeout=20)
    assert failed.state == "failed"
    assert "result() of a command that send() did not send" in failed.error


# --- the bridge's unsigned `expired` (nerve.runtime.trust.expiry) ---------------------------------


async def until_expired(command: Command) -> None:
    """Sleep until `command` expired, plus the margin after which the bridge's `expired` is believed."""
    left = (command.expires - utcnow()).total_seconds() + EXPIRED_CLAIM_MARGIN_S
    await asyncio.sleep(max(0.0, left) + 0.05)


async def test_the_bridges_expired_result_ends_the_wait_before_the_steps_timeout(  # noqa: PLR0917
    settings: Settings,
    nc: NatsClient,
    js: JetStreamContext,
    tmp_path: Path,
    central: tuple[Signer, Verifier],
    running: Running,
) -> None:
    """The bridge was away until the command expired: it stores `expired`, unsigned, and the run takes it."""
    signer, _ = central
    provision_device(tmp_path / "devices", "dev8")
    refusals = Refusals(DeviceKeys(tmp_path / "devices"))
    engine = Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, refusals=refusals)
    async with engine:
        event = await publish_event(js, "broken", {"device": "dev8", "ttl": 1}, event_id="e-broken-8")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        await until_expired(command)
        async with running(Bridge(settings=settings), wait=30):
            done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=30)
    assert done.result == "expired None"
    step = done.steps["fix"]
    assert step.finished is not None
    assert step.finished < step.due  # learnt from the bridge, not from the step's own timer
    (stored,) = [decode(m.data, CommandResult) for m in await stream_messages(js, "NERVE_RESULTS")]
    assert (stored.source, stored.sig, stored.causationid) == (BRIDGE, "", command.id)
    assert refusals.refused == []


async def test_a_forged_expired_before_the_command_expired_is_refused_and_the_run_waits_on(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    signer, _ = central
    dev9 = provision_device(tmp_path / "devices", "dev9")
    refusals = Refusals(DeviceKeys(tmp_path / "devices"))
    engine = Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, refusals=refusals)
    async with engine:
        event = await publish_event(js, "broken", {"device": "dev9", "ttl": 30}, event_id="e-broken-9")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        subject = "nerve.dev9.results.clear_temp"
        # Dated after `expires`, and shaped as the bridge's: judged by when it was stored.
        forged = msgspec.structs.replace(
            CommandResult.for_command(command, source=BRIDGE, status="expired"),
            time=command.expires + timedelta(minutes=5),
        )
        await publish_envelope(js, subject, forged)
        forged_ok = CommandResult.for_command(command, source=BRIDGE, status="ok")
        await publish_envelope(js, subject, forged_ok)
        await wait_for_count(js, "NERVE_RESULTS", 2)
        async with asyncio.timeout(10):
            while len(refusals.refused) < 2:  # both read and refused: the run is still waiting
                await asyncio.sleep(0.05)
        record = await engine.record(fixer.run_id(event.id))
        assert record is not None
        assert record.state != "done"
        await answer(js, command, dev9, files=2)  # the device's own, signed: taken
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=20)
    assert done.result == "ok 2"
    assert refusals.refused == [forged.id, forged_ok.id]


async def test_an_unsigned_expired_for_another_command_is_refused_even_after_it_expired(
    nc: NatsClient, js: JetStreamContext, tmp_path: Path, central: tuple[Signer, Verifier]
) -> None:
    """The claim must name the command this step sent: one for an expired command of someone else's is not."""
    signer, _ = central
    provision_device(tmp_path / "devices", "dev10")
    refusals = Refusals(DeviceKeys(tmp_path / "devices"))
    engine = Engine(nc=nc, agents=[fixer], prefix=PREFIX, settings=FAST, signer=signer, refusals=refusals)
    async with engine:
        event = await publish_event(js, "broken", {"device": "dev10", "ttl": 1}, event_id="e-broken-10")
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands(js)
        await until_expired(command)
        # For this command, but on another device's subject and naming it (read: causationid matches).
        other = CommandResult.for_command(command, source=BRIDGE, status="expired", subject="dev11")
        await publish_envelope(js, "nerve.dev10.results.clear_temp", other)
        with_data = CommandResult.for_command(command, source=BRIDGE, status="expired", data={"x": 1})
        await publish_envelope(js, "nerve.dev10.results.clear_temp", with_data)
        done = await wait_for_run(engine.kv, fixer.run_id(event.id), timeout=30)
    assert str(done.result).startswith("timed out")
    assert refusals.refused == [other.id, with_data.id]
