"""nats-server killed (SIGKILL) and restarted under a running engine: runs resume, timers fire once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

import nats
import pytest
from nats.errors import Error as NatsError
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker

ran: Counter[str] = Counter()


@durable_agent("survivor", trigger=Trigger(Kind.EVENTS, "survive"), key=lambda event: str(event.data["n"]))
async def survivor(_event: Envelope, step: Step) -> str:
    async def before() -> None:
        ran[f"{step.key}:before"] += 1

    async def after() -> None:
        ran[f"{step.key}:after"] += 1

    await step.run("before", before)
    await step.sleep("nap", 2.0)
    await step.run("after", after)
    return "survived"


async def jetstream_back(js: JetStreamContext) -> None:
    """Wait until the restarted server's JetStream answers (it recovers its streams first)."""
    async with asyncio.timeout(30):
        while True:
            try:
                await js.account_info()
            except (NatsError, TimeoutError):
                await asyncio.sleep(0.1)
            else:
                return


async def test_runs_resume_and_timers_fire_once_across_a_nats_server_kill(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await ensure_streams(js, PREFIX)
        async with Engine(nc=nc, agents=[survivor], prefix=PREFIX, settings=FAST) as engine:
            events = [
                await publish_event(js, "survive", {"n": n}, event_id=f"e-survive-{n}") for n in range(5)
            ]
            run_ids = [survivor.run_id(event.id) for event in events]
            async with asyncio.timeout(20):
                while sum(ran[f"{n}:before"] for n in range(5)) < len(events):
                    await asyncio.sleep(0.02)
            await nats_server.kill()  # while the runs sleep: their timers are pending in the server
            await asyncio.sleep(0.5)
            await nats_server.start()
            await jetstream_back(js)
            records = [await wait_for_run(engine.kv, run_id, timeout=30) for run_id in run_ids]
    finally:
        await nc.close()
    assert [record.state for record in records] == ["done"] * len(events)
    assert all((ran[f"{n}:before"], ran[f"{n}:after"]) == (1, 1) for n in range(5))
