"""The durable agent engine on one process: step transitions per second, and triggers that do not fire.

- `steps`: RUNS runs of an agent with STEPS trivial steps each (`step.run`, no undo), started at once;
  step transitions per second = RUNS x STEPS / the time from the first trigger to the last run done.
  Each transition is one compare-and-set of the run's journal (plus the run's creation and its end).
- `steps + waits_on`: the same agent declaring `waits_on=(Kind.EVENTS,)`: each step also reads the
  events stream's position (one more JetStream request per step).
- `no-fire`: readings through a trigger whose predicate refuses them: readings per second.

Against a private nats-server on a free port (the venv's), in a temporary directory.

    .venv/bin/python bench/engine_steps.py [--runs 200] [--steps 20] [--readings 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import nats

from nerve.runtime.engine import Engine, EngineSettings, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import NatsServer, free_port
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import wait_for_count

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.envelope.model import Envelope


def stepper(name: str, steps: int, *, waits: bool) -> DurableAgent:
    async def nothing() -> int:
        return 1

    async def fn(_event: Envelope, step: Step) -> None:
        for index in range(steps):
            await step.run(f"s{index}", nothing)

    waits_on = (Kind.EVENTS,) if waits else ()
    return durable_agent(name, trigger=Trigger(Kind.EVENTS, name), key=lambda e: e.id, waits_on=waits_on)(fn)


async def steps_per_second(
    js: JetStreamContext, nc: NatsClient, runs: int, steps: int, *, waits: bool
) -> float:
    name = "bench_waits" if waits else "bench_steps"
    agent = stepper(name, steps, waits=waits)
    async with Engine(nc=nc, agents=[agent], settings=EngineSettings()) as engine:
        started = time.perf_counter()
        for n in range(runs):
            event = Event(id=f"{name}-{n}", source="nerve://bench", type=name, subject="bench")
            await publish_envelope(js, f"nerve.bench.events.{name}", event)
        for n in range(runs):
            await wait_for_run(engine.kv, agent.run_id(f"{name}-{n}"), timeout=600)
        elapsed = time.perf_counter() - started
    return runs * steps / elapsed


async def readings_per_second(js: JetStreamContext, nc: NatsClient, readings: int) -> float:
    async def never(_event: Envelope, _step: Step) -> None:
        return None

    agent = durable_agent(
        "bench_nofire",
        trigger=Trigger(Kind.TELEMETRY, "disk", where=lambda e: float(e.data["value"]) >= 101),
        key=lambda e: e.subject or "",
    )(never)
    for n in range(readings):
        event = Event(
            id=f"r-{n}", source="nerve://bench", type="nerve.telemetry.disk", subject="pi", data={"value": 50}
        )
        await publish_envelope(js, "nerve.pi.telemetry.disk", event)
    await wait_for_count(js, "NERVE_TELEMETRY", readings, timeout=600)
    async with Engine(nc=nc, agents=[agent], settings=EngineSettings()):
        started = time.perf_counter()
        consumer = "nerve-engine-bench_nofire"
        while True:
            info = await js.consumer_info("NERVE_TELEMETRY", consumer)
            if not info.num_pending and not info.num_ack_pending:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    return readings / elapsed


async def main(runs: int, steps: int, readings: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        async with NatsServer(port=free_port(), data_dir=Path(directory)) as server:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_streams(js, "nerve")
            plain = await steps_per_second(js, nc, runs, steps, waits=False)
            waits = await steps_per_second(js, nc, runs, steps, waits=True)
            nofire = await readings_per_second(js, nc, readings)
            await nc.close()
    print(f"steps             {plain:10,.0f} step transitions/s  ({runs} runs x {steps} steps)")
    print(f"steps + waits_on  {waits:10,.0f} step transitions/s")
    print(f"no-fire           {nofire:10,.0f} readings/s through a trigger that does not fire")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--readings", type=int, default=20_000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, arguments.steps, arguments.readings))
