"""Central's durable agents under kill -9: 200 sagas through 20 random kills, and two processes, one killed.

The engine process is `tests/runtime/engine/crash_engine.py` (agent "chaos_saga": steps a-d, each with
an undo, a nap after b; a trigger with `"fail": true` fails at d). Where effects land: the stream EFFECTS,
one message per step or undo id (Nats-Msg-Id), so it holds each effect once however often its function
ran. How often functions ran: DIR/executions (a line per execution). Who ran them, when, under which
fencing token: DIR/spans. A span the process never ended (it was killed) ends when the test saw the
process die.

Here too: nats-server SIGKILLed while steps run and write their journals (a NATS timeout there is not
the agent's failure: the run must not compensate). The other chaos cases of issue 10 are in
tests/runtime/engine: nats-server killed while runs sleep, runs resume and timers fire once
(`test_nats_restart.py`); a timer due while no engine ran fires once when one is back
(`test_timers_and_waits.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from nats.js.api import StreamConfig
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event
from tests.runtime.engine.crash_engine import CHAOS_STEPS
from tests.runtime.engine.test_crash import executions, kill, start_engine, stop
from tests.runtime.engine.test_nats_restart import jetstream_back

from nerve.runtime.engine import RunRecord, Trigger, wait_for_run
from nerve.runtime.engine.engine import MAX_ACK_PENDING, NO_LIMIT, ensure_engine_storage
from nerve.runtime.engine.names import trigger_consumer
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.jetstream.client import shared_durable
from nerve.runtime.jetstream.streams import STREAM_OF_KIND
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.stack.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENT = "chaos_saga"
ACK_WAIT_S = 2.0
UNDOS = tuple(f"undo_{name}" for name in reversed(CHAOS_STEPS))  # the order they must run in


def fails(n: int) -> bool:
    """The runs that fail at their last step and compensate: a fixed fifth of them."""
    return n % 5 == 4


@pytest.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    """JetStream with nerve's streams, the engine's storage, the stream EFFECTS and the trigger consumer
    of "chaos_saga" (as the engine makes it, but with a short ack wait)."""
    context = nc.jetstream()
    await ensure_engine_storage(context, PREFIX, FAST)
    await context.add_stream(StreamConfig(name="EFFECTS", subjects=["effects.>"]))
    trigger = Trigger(Kind.EVENTS, AGENT)
    consumer = await shared_durable(
        context,
        subject=trigger.subject(PREFIX),
        stream=STREAM_OF_KIND[trigger.kind],
        name=trigger_consumer(AGENT),
        ack_wait_s=ACK_WAIT_S,
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=NO_LIMIT,
    )
    await consumer.unsubscribe()  # the durable consumer stays; no trigger was published yet
    info = await context.consumer_info(STREAM_OF_KIND[trigger.kind], trigger_consumer(AGENT))
    assert info.config.ack_wait == ACK_WAIT_S
    return context


@pytest.fixture
def seed() -> int:
    """The seed of this test's random choices: NERVE_CHAOS_SEED, or a new one (printed if it fails)."""
    return int(os.environ.get("NERVE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))


async def start_run(js: JetStreamContext, n: int) -> str:
    event = await publish_event(js, AGENT, {"n": n, "fail": fails(n)}, event_id=f"e-chaos-saga-{n}")
    return derived_id(AGENT, "run", event.id)


async def landed(js: JetStreamContext) -> list[tuple[str, str]]:
    """(run id, step or undo) of every effect stored in EFFECTS, in the order they were stored."""
    info = await js.stream_info("EFFECTS")
    stored = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg("EFFECTS", seq)
        stored.append(((message.data or b"").decode(), (message.subject or "").removeprefix("effects.")))
    return stored


def expected_effects(runs: dict[str, int]) -> Counter[tuple[str, str]]:
    """Each step's effect once per run (d's too: it fails after its effect), each undo once if it failed."""
    wanted: Counter[tuple[str, str]] = Counter()
    for run_id, n in runs.items():
        for name in CHAOS_STEPS + (UNDOS if fails(n) else ()):
            wanted[(run_id, name)] = 1
    return wanted


@dataclass(frozen=True)
class Span:
    """One execution of a step or undo function: by which process, under which fencing token, when."""

    run_id: str
    name: str
    pid: int
    token: int
    start: float
    end: float
    killed: bool


def spans(directory: Path, deaths: dict[int, float]) -> list[Span]:
    """Every execution in DIR/spans; one a killed process never ended lasts until it was seen dead."""
    started: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    found = []
    for line in (directory / "spans").read_text().splitlines():
        what, run_id, name, pid_text, token_text, at = line.split()
        where = (run_id, name, int(pid_text), int(token_text))
        if what == "start":
            started[where].append(float(at))
        else:
            found.append(Span(*where, start=started[where].pop(), end=float(at), killed=False))
    for (run_id, name, pid, token), starts in started.items():
        for start in starts:
            assert pid in deaths, f"{name} of run {run_id} started in live process {pid} and never ended"
            found.append(Span(run_id, name, pid, token, start=start, end=deaths[pid], killed=True))
    return found


def check_fencing(executed: list[Span]) -> None:
    """No two executions of one run at once (by one process or two), and a run that changed hands
    changed its fencing token: the later holder's is higher."""
    by_run: dict[str, list[Span]] = defaultdict(list)
    for span in executed:
        by_run[span.run_id].append(span)
    for run_id, run_spans in by_run.items():
        ordered = sorted(run_spans, key=lambda span: span.start)
        for before, after in itertools.pairwise(ordered):
            assert before.end <= after.start, f"run {run_id}: {before} and {after} overlap"
            assert after.token >= before.token, f"run {run_id}: the token went back: {before}, {after}"
            if after.pid != before.pid:
                assert after.token > before.token, f"run {run_id} changed hands under one token: {after}"


async def wait_for_all(kv: KeyValue, run_ids: list[str], directory: Path) -> list[RunRecord]:
    try:
        return [await wait_for_run(kv, run_id, timeout=60) for run_id in run_ids]
    except TimeoutError:
        print((directory / "engine.log").read_text()[-20_000:])  # noqa: T201 - what the engines said
        raise


def check_runs(records: list[RunRecord], runs: dict[str, int]) -> None:
    """Every run ended: done, or (the failing ones) compensated with every undo journalled done."""
    states = {record.run_id: record.state for record in records}
    assert states == {run_id: "compensated" if fails(n) else "done" for run_id, n in runs.items()}
    for record in records:
        if record.state == "compensated":
            assert [(undo.step, undo.status) for undo in record.undos] == [(s, "done") for s in CHAOS_STEPS]


def check_effects(stored: list[tuple[str, str]], ran: Counter[tuple[str, str]], runs: dict[str, int]) -> None:
    """Each effect stored once (the undos of failed runs only, in reverse), each executed at least once."""
    wanted = expected_effects(runs)
    assert Counter(stored) == wanted
    assert set(ran) == set(wanted)  # nothing else ever ran: no undo of a run that did not fail
    for run_id, n in runs.items():
        if fails(n):
            assert [name for who, name in stored if who == run_id and name.startswith("undo_")] == list(UNDOS)


async def test_200_sagas_through_20_random_kill_9s_each_effect_lands_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, seed: int
) -> None:
    print(f"seed {seed} (NERVE_CHAOS_SEED={seed} repeats these choices)")  # noqa: T201 - shown on failure
    chance = random.Random(seed)  # noqa: S311 - reproducible instants, not cryptography
    kv = await js.key_value("nerve_runs")
    (tmp_path / "delay").write_text("0.05")
    deaths: dict[int, float] = {}
    runs: dict[str, int] = {}
    numbers = iter(range(200))
    process = await start_engine(nats_server, tmp_path)
    try:
        for _ in range(20):
            # A wave of new runs for this process, beside the ones it resumes, then a kill at random.
            for n in [next(numbers) for _ in range(10)]:
                runs[await start_run(js, n)] = n
            await asyncio.sleep(chance.uniform(0.05, 1.2))
            await kill(process)
            deaths[process.pid] = time.monotonic()
            process = await start_engine(nats_server, tmp_path)
        records = await wait_for_all(kv, list(runs), tmp_path)
    finally:
        await stop(process)
    check_runs(records, runs)
    ran = executions(tmp_path)
    check_effects(await landed(js), ran, runs)
    executed = spans(tmp_path, deaths)
    check_fencing(executed)
    cut = [span for span in executed if span.killed]
    print(f"{sum(ran.values())} functions executed for {len(ran)} effects; {len(cut)} killed mid-way")  # noqa: T201
    # The kills did land mid-step: those steps ran again (their effect executed twice, stored once).
    assert cut
    assert all(ran[(span.run_id, span.name)] >= 2 for span in cut)


async def test_two_engines_share_sagas_one_killed_mid_run_none_lost_none_run_twice_at_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    kv = await js.key_value("nerve_runs")
    (tmp_path / "delay").write_text("0.1")
    first = await start_engine(nats_server, tmp_path)
    second = await start_engine(nats_server, tmp_path)
    processes = {first.pid: first, second.pid: second}
    runs = {await start_run(js, n): n for n in range(40)}
    deaths: dict[int, float] = {}
    try:
        # Kill a process that executes a step now, once both have taken some of the work.
        async with asyncio.timeout(30):
            while True:
                now = spans(tmp_path, dict.fromkeys(processes, 0.0)) if (tmp_path / "spans").exists() else []
                if {span.pid for span in now} == set(processes) and (cut := [s for s in now if s.killed]):
                    break
                await asyncio.sleep(0.01)
        victim = cut[0].pid
        await kill(processes[victim])
        deaths[victim] = time.monotonic()
        records = await wait_for_all(kv, list(runs), tmp_path)
    finally:
        for process in processes.values():
            if process.returncode is None:
                await stop(process)
    check_runs(records, runs)
    ran = executions(tmp_path)
    check_effects(await landed(js), ran, runs)
    executed = spans(tmp_path, deaths)
    check_fencing(executed)
    # The victim was mid-step in some run; the survivor took that run over and finished it.
    taken_over = {span.run_id for span in executed if span.killed}
    assert taken_over
    for run_id in taken_over:
        assert {span.pid for span in executed if span.run_id == run_id} == set(processes)


async def test_nats_server_killed_while_steps_run_each_run_resumes_and_ends_as_it_should(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    # tests/runtime/engine/test_nats_restart.py kills nats-server while runs sleep; here steps are
    # executing and writing their journals when it goes.
    kv = await js.key_value("nerve_runs")
    (tmp_path / "delay").write_text("0.1")
    process = await start_engine(nats_server, tmp_path)
    runs = {await start_run(js, n): n for n in range(40)}
    try:
        async with asyncio.timeout(30):
            while not (tmp_path / "spans").exists() or len(spans(tmp_path, {process.pid: 0.0})) < 40:
                await asyncio.sleep(0.01)
        await nats_server.kill()
        await asyncio.sleep(0.5)
        await nats_server.start()
        await jetstream_back(js)
        records = await wait_for_all(kv, list(runs), tmp_path)
    finally:
        await stop(process)
    check_runs(records, runs)
    check_effects(await landed(js), executions(tmp_path), runs)
    check_fencing(spans(tmp_path, {}))
