"""A run survives kill -9 of its engine process at any instant: resumed, each step's effect lands once."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine.engine import MAX_ACK_PENDING, MAX_DELIVER, NO_LIMIT, ensure_engine_storage
from nerve.runtime.engine.names import trigger_consumer
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.jetstream.client import REASON_HEADER, shared_durable
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM, STREAM_OF_KIND
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker

SCRIPT = Path(__file__).with_name("crash_engine.py")
EVENTS = STREAM_OF_KIND[Kind.EVENTS]
STEPS = ("one", "slow", "two")


async def start_engine(nats_server: NatsServer, directory: Path) -> asyncio.subprocess.Process:
    (directory / "ready").unlink(missing_ok=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), nats_server.url, str(directory)
    )
    async with asyncio.timeout(30):
        while not (directory / "ready").exists():
            assert process.returncode is None, "the engine process exited while starting"
            await asyncio.sleep(0.02)
    return process


async def kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    async with asyncio.timeout(10):
        await process.wait()


async def stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await process.wait() == 0


async def effects(js: JetStreamContext) -> Counter[tuple[str, str]]:
    """(run id, step) of every effect stored."""
    info = await js.stream_info("EFFECTS")
    landed: Counter[tuple[str, str]] = Counter()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg("EFFECTS", seq)
        landed[((message.data or b"").decode(), (message.subject or "").removeprefix("effects."))] += 1
    return landed


def executions(directory: Path) -> Counter[tuple[str, str]]:
    lines = (directory / "executions").read_text().splitlines()
    return Counter(tuple(line.split()) for line in lines)  # type: ignore[misc]


async def test_a_run_killed_mid_step_resumes_elsewhere_and_each_effect_lands_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await js.add_stream(StreamConfig(name="EFFECTS", subjects=["effects.>"]))
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    (tmp_path / "hold").touch()
    first = await start_engine(nats_server, tmp_path)
    event = await publish_event(js, "crash_test", {"n": 1}, event_id="e-crash")
    run_id = derived_id("crashy", "run", event.id)
    async with asyncio.timeout(30):
        while not (tmp_path / "slow-started").exists():
            await asyncio.sleep(0.02)
    await kill(first)  # in step "slow", after its effect, before its result is journalled
    (tmp_path / "hold").unlink()
    second = await start_engine(nats_server, tmp_path)
    try:
        record = await wait_for_run(kv, run_id, timeout=30)
    finally:
        await stop(second)
    assert record.state == "done"
    assert record.token >= 2  # claimed again by the second process
    assert executions(tmp_path) == {(run_id, "one"): 1, (run_id, "slow"): 2, (run_id, "two"): 1}
    assert await effects(js) == {(run_id, step): 1 for step in STEPS}


async def test_a_trigger_that_kills_central_each_time_is_dead_lettered_by_the_next_one(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await js.add_stream(StreamConfig(name="EFFECTS", subjects=["effects.>"]))
    await ensure_engine_storage(js, PREFIX, FAST)
    consumer = trigger_consumer("poison")
    # The trigger consumer as the engine makes it, with a short ack wait: each death is noticed at once.
    made = await shared_durable(
        js,
        subject=Trigger(Kind.EVENTS, "poison").subject(PREFIX),
        stream=EVENTS,
        name=consumer,
        ack_wait_s=0.5,
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=NO_LIMIT,
    )
    await made.unsubscribe()
    await publish_event(js, "poison", {"kill": True}, event_id="e-poison")
    deaths = 0
    while (await js.stream_info(DEADLETTER_STREAM)).state.messages == 0:
        assert deaths <= MAX_DELIVER, "still not dead-lettered"
        (tmp_path / "ready").unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), nats_server.url, str(tmp_path)
        )
        try:
            async with asyncio.timeout(30):
                while (
                    process.returncode is None
                    and (await js.stream_info(DEADLETTER_STREAM)).state.messages == 0
                ):
                    await asyncio.sleep(0.05)
        finally:
            if process.returncode is None:
                await stop(process)  # the one that dead-lettered it
            else:
                assert process.returncode == -signal.SIGKILL
                deaths += 1
    [stored] = await stream_messages(js, DEADLETTER_STREAM)
    reason = stored.headers[REASON_HEADER]
    # Each process that took it died; a delivery may also go to a dead process's connection before the
    # server noticed it closed (counted, never taken). After MAX_DELIVER, it was not taken.
    delivered = re.fullmatch(r"poison: delivered (\d+) times, never settled .*", reason)
    assert delivered is not None, reason
    assert 1 < deaths <= MAX_DELIVER < int(delivered[1]), (deaths, reason)
    info = await js.consumer_info(EVENTS, consumer)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_compensation_killed_mid_undo_resumes_and_each_undo_lands_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await js.add_stream(StreamConfig(name="EFFECTS", subjects=["effects.>"]))
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    (tmp_path / "hold").touch()
    first = await start_engine(nats_server, tmp_path)
    event = await publish_event(js, "crash_saga", {"n": 1}, event_id="e-crash-saga")
    run_id = derived_id("crashy_saga", "run", event.id)
    async with asyncio.timeout(30):
        while not (tmp_path / "undo-started").exists():
            await asyncio.sleep(0.02)
    await kill(first)  # in the undo of "b", after its effect, before it is journalled
    (tmp_path / "hold").unlink()
    second = await start_engine(nats_server, tmp_path)
    try:
        record = await wait_for_run(kv, run_id, timeout=30)
    finally:
        await stop(second)
    assert record.state == "compensated"
    assert [(undo.step, undo.status) for undo in record.undos] == [
        ("a", "done"),
        ("b", "done"),
        ("c", "done"),
    ]
    ran = executions(tmp_path)
    assert (
        ran[(run_id, "c")],
        ran[(run_id, "undo_c")],
        ran[(run_id, "undo_b")],
        ran[(run_id, "undo_a")],
    ) == (
        1,
        1,
        2,  # the undo that was killed ran again in the second process
        1,
    )
    landed = await effects(js)
    assert landed == {(run_id, name): 1 for name in ("a", "b", "c", "undo_c", "undo_b", "undo_a")}


@pytest.mark.slow
async def test_runs_survive_kill_9_at_random_instants(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await js.add_stream(StreamConfig(name="EFFECTS", subjects=["effects.>"]))
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    chance = random.Random(20261201)  # noqa: S311 - a reproducible choice of instants, not cryptography
    (tmp_path / "delay").write_text("0.3")
    process = await start_engine(nats_server, tmp_path)
    run_ids = []
    for n in range(20):
        event = await publish_event(js, "crash_test", {"n": n}, event_id=f"e-chaos-{n}")
        run_ids.append(derived_id("crashy", "run", event.id))
    for _ in range(5):
        await asyncio.sleep(chance.uniform(0.2, 0.8))
        await kill(process)
        process = await start_engine(nats_server, tmp_path)
    try:
        records = [await wait_for_run(kv, run_id, timeout=60) for run_id in run_ids]
    except TimeoutError:
        print((tmp_path / "engine.log").read_text())  # noqa: T201 - what the engine processes said
        raise
    finally:
        await stop(process)
    assert [record.state for record in records] == ["done"] * len(run_ids)
    assert await effects(js) == {(run_id, step): 1 for run_id in run_ids for step in STEPS}
    ran = executions(tmp_path)
    assert all(ran[(run_id, step)] >= 1 for run_id in run_ids for step in STEPS)
    # The kills did land mid-run: some runs were resumed by the next process (a claim after the wake-up
    # from the nap makes 2).
    assert max(record.token for record in records) >= 3


def most_open(directory: Path) -> int:
    """The most runs of agent "limited" open at once, from its start and end lines (a run killed mid-step
    and resumed elsewhere is still one open run)."""
    open_runs: set[str] = set()
    most = 0
    for line in (directory / "limited").read_text().splitlines():
        what, run_id, _pid = line.split()
        if what == "start":
            open_runs.add(run_id)
        else:
            open_runs.discard(run_id)
        most = max(most, len(open_runs))
    return most


async def test_concurrency_holds_across_two_engine_processes_and_a_kill_of_one(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    first = await start_engine(nats_server, tmp_path)
    second = await start_engine(nats_server, tmp_path)
    runs = []
    try:
        for n in range(6):
            event = await publish_event(js, "limited", {"key": "one-key"}, event_id=f"limited-{n}")
            runs.append(derived_id("limited", "run", event.id))
        # Kill whichever process executes the first run, in the middle of its step: its slot stays
        # taken by that run, which the other process resumes a lease later and ends.
        async with asyncio.timeout(30):
            # The file exists from the moment it is opened, before its first line is written.
            while not (tmp_path / "limited").exists() or not (tmp_path / "limited").read_text():
                await asyncio.sleep(0.02)
        pid = int((tmp_path / "limited").read_text().split()[2])
        await kill(first if first.pid == pid else second)
        for run_id in runs:
            record = await wait_for_run(kv, run_id, timeout=60)
            assert record.state == "done"
    finally:
        for process in (first, second):
            if process.returncode is None:
                await stop(process)
    assert most_open(tmp_path) == 1
    ends = [
        line.split()[1] for line in (tmp_path / "limited").read_text().splitlines() if line.startswith("end")
    ]
    assert sorted(ends) == sorted(runs)  # each run's step ended once (the killed one in the survivor)


#: What the agent "nats_hiccup" did, in order: ("do"|"undo", key, step).
hiccups: list[tuple[str, str, str]] = []


@durable_agent("nats_hiccup", trigger=Trigger(Kind.EVENTS, "hiccup"), key=lambda e: str(e.data["k"]))
async def nats_hiccup(event: Envelope, step: Step) -> str:
    """Step a, then (on its first execution only) an error between steps of the kind `error` names: the
    engine's own NATS calls there (a journal write) raise nats-py's TimeoutError when NATS is slow."""

    async def a() -> None:
        hiccups.append(("do", step.key, "a"))

    async def undo_a() -> None:
        hiccups.append(("undo", step.key, "a"))

    async def b() -> None:
        hiccups.append(("do", step.key, "b"))

    await step.run("a", a, undo=undo_a)
    if step.record.token == 1:
        raise NatsTimeoutError if event.data["error"] == "nats" else TimeoutError("the agent's own")
    await step.run("b", b)
    return "done"


async def test_a_nats_timeout_between_steps_resumes_the_run_and_an_agent_timeout_compensates(
    nc: NatsClient, js: JetStreamContext
) -> None:
    hiccups.clear()
    async with Engine(nc=nc, agents=[nats_hiccup], prefix=PREFIX, settings=FAST) as engine:
        nats_event = await publish_event(js, "hiccup", {"k": "n", "error": "nats"}, event_id="e-hiccup-n")
        own_event = await publish_event(js, "hiccup", {"k": "o", "error": "own"}, event_id="e-hiccup-o")
        resumed = await wait_for_run(engine.kv, nats_hiccup.run_id(nats_event.id), timeout=30)
        failed = await wait_for_run(engine.kv, nats_hiccup.run_id(own_event.id), timeout=30)
    # NATS away is not the agent's failure: stopped, claimed again a lease later, a not run again.
    assert (resumed.state, resumed.token, resumed.result) == ("done", 2, "done")
    assert [entry for entry in hiccups if entry[1] == "n"] == [("do", "n", "a"), ("do", "n", "b")]
    # The agent's own TimeoutError is its failure: a is undone.
    assert (failed.state, failed.token) == ("compensated", 1)
    assert "the agent's own" in failed.error
    assert [entry for entry in hiccups if entry[1] == "o"] == [("do", "o", "a"), ("undo", "o", "a")]
