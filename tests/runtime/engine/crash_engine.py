"""A central process with one durable agent, for the crash tests: `python crash_engine.py NATS_URL DIR`.

Each step's effect is a message on `effects.<step>` whose Nats-Msg-Id is the step id, so the stream
EFFECTS holds each effect once however often the step ran; every execution is also a line in
DIR/executions. With DIR/hold present, step "slow" stops after its effect (and says so in
DIR/slow-started) until the process is killed; DIR/delay holds how long each step waits after its effect.
DIR/ready appears once the engine runs. Agent "crashy_saga" fails at its step "c" and undoes b and a;
with DIR/hold present, the undo of "b" stops after its effect (DIR/undo-started) in the same way.
Agent "limited" (concurrency 1 per key) writes `start <run> <pid>` and `end <run> <pid>` lines to
DIR/limited around a step that takes 0.3 s.
Agent "poison": a trigger with `"kill": true` kills the process (SIGKILL) while it is taken (in its key
function), as a trigger that crashes central would.
Agent "chaos_saga" (the chaos tests, tests/chaos/test_engine_chaos.py): four steps with undos and a nap;
a trigger with `"fail": true` fails at its last step, so the four undos run. Each execution of one of its
steps or undos is a span in DIR/spans: `start|end <run> <name> <pid> <fencing token> <monotonic time>`
(a process killed mid-step leaves a start without an end).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import nats

from nerve.runtime.cancellation import until_signalled
from nerve.runtime.engine import Engine, EngineSettings, Limits, Step, Terminal, Trigger, durable_agent
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nats.js import JetStreamContext

    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.envelope.model import Envelope

STEPS = ("one", "slow", "two")
SAGA_STEPS = ("a", "b", "c")
CHAOS_STEPS = ("a", "b", "c", "d")


class Effects:
    """Where the agents' effects land: one message per step id in EFFECTS, and a line per execution."""

    def __init__(self, js: JetStreamContext, directory: Path) -> None:
        self.js = js
        self.directory = directory

    async def __call__(self, step: Step, name: str) -> None:
        with (self.directory / "executions").open("a") as executions:
            executions.write(f"{step.run_id} {name}\n")
        await self.js.publish(f"effects.{name}", step.run_id.encode(), headers={"Nats-Msg-Id": step.id(name)})

    @contextmanager
    def span(self, step: Step, name: str) -> Iterator[None]:
        """A `start` line in DIR/spans now, an `end` line when the block is left (however it is left)."""
        where = f"{step.run_id} {name} {os.getpid()} {step.record.token}"
        with (self.directory / "spans").open("a") as spans:
            spans.write(f"start {where} {time.monotonic()}\n")
        try:
            yield
        finally:
            with (self.directory / "spans").open("a") as spans:
                spans.write(f"end {where} {time.monotonic()}\n")


def crashy(effect: Effects, delay: float) -> DurableAgent:
    """Three steps and a nap; "slow" may be held after its effect."""
    hold = effect.directory / "hold"

    @durable_agent("crashy", trigger=Trigger(Kind.EVENTS, "crash_test"), key=lambda e: str(e.data["n"]))
    async def agent(_event: Envelope, step: Step) -> str:
        for name in STEPS:

            async def do(name: str = name) -> None:
                await effect(step, name)
                if name == "slow" and hold.exists():
                    (effect.directory / "slow-started").touch()
                    await asyncio.sleep(3600)
                await asyncio.sleep(delay)  # a window for a kill between the effect and the journal

            await step.run(name, do)
            if name == "one":
                await step.sleep("nap", 0.1)
        return "done"

    return agent


def crashy_saga(effect: Effects) -> DurableAgent:
    """Three steps with undos; "c" fails, and the undo of "b" may be held after its effect."""
    hold = effect.directory / "hold"

    @durable_agent("crashy_saga", trigger=Trigger(Kind.EVENTS, "crash_saga"), key=lambda e: str(e.data["n"]))
    async def agent(_event: Envelope, step: Step) -> None:
        for name in SAGA_STEPS:

            async def do(name: str = name) -> None:
                await effect(step, name)
                if name == "c":
                    raise Terminal("c fails, always")

            async def undo(name: str = name) -> None:
                await effect(step, f"undo_{name}")
                if name == "b" and hold.exists():
                    (effect.directory / "undo-started").touch()
                    await asyncio.sleep(3600)

            await step.run(name, do, undo=undo)

    return agent


def chaos_saga(effect: Effects, delay: float) -> DurableAgent:
    """Steps a-d with undos and a nap after b; a trigger with `"fail": true` fails at d (terminal)."""

    @durable_agent("chaos_saga", trigger=Trigger(Kind.EVENTS, "chaos_saga"), key=lambda e: str(e.data["n"]))
    async def agent(event: Envelope, step: Step) -> str:
        for name in CHAOS_STEPS:

            async def do(name: str = name) -> None:
                with effect.span(step, name):
                    await effect(step, name)
                    await asyncio.sleep(delay)  # a window for a kill between the effect and the journal
                    if name == CHAOS_STEPS[-1] and event.data.get("fail"):
                        raise Terminal(f"{name} fails for this run")

            async def undo(name: str = name) -> None:
                with effect.span(step, f"undo_{name}"):
                    await effect(step, f"undo_{name}")
                    await asyncio.sleep(delay)

            await step.run(name, do, undo=undo)
            if name == "b":
                await step.sleep("nap", 0.2)
        return "done"

    return agent


def limited(directory: Path) -> DurableAgent:
    """One open run per key at a time, in every process: its step says when it starts and ends."""

    @durable_agent(
        "limited",
        trigger=Trigger(Kind.EVENTS, "limited"),
        key=lambda e: str(e.data["key"]),
        limits=Limits(concurrency=1),
    )
    async def agent(_event: Envelope, step: Step) -> None:
        async def work() -> None:
            with (directory / "limited").open("a") as lines:
                lines.write(f"start {step.run_id} {os.getpid()}\n")
            await asyncio.sleep(0.3)
            with (directory / "limited").open("a") as lines:
                lines.write(f"end {step.run_id} {os.getpid()}\n")

        await step.run("work", work)

    return agent


def _poison_key(event: Envelope) -> str:
    if event.data.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return "k"


async def _nothing(_event: Envelope, _step: Step) -> None:
    return None


poison = durable_agent("poison", trigger=Trigger(Kind.EVENTS, "poison"), key=_poison_key)(_nothing)


async def serve(url: str, directory: Path) -> int:
    nc = await nats.connect(url)
    delay_file = directory / "delay"
    delay = float(delay_file.read_text()) if delay_file.exists() else 0.0
    effect = Effects(nc.jetstream(), directory)
    try:
        agents = [
            crashy(effect, delay),
            crashy_saga(effect),
            limited(directory),
            chaos_saga(effect, delay),
            poison,
        ]
        async with Engine(nc=nc, agents=agents, settings=EngineSettings(lease_s=1.0)):
            (directory / "ready").touch()
            await asyncio.Event().wait()
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        filename=Path(sys.argv[2]) / "engine.log",
        level=logging.INFO,
        format=f"%(asctime)s {os.getpid()} %(name)s %(message)s",
    )
    sys.exit(asyncio.run(until_signalled(serve(sys.argv[1], Path(sys.argv[2])))))
