"""`make bench-central` (issues 10 and 11): central's engine beside the hand-written runbook, in one run.

Two columns, each case on fresh brokers (free ports, a temp dir): **engine** is today's code (`nerve
central`, the disk runbook a durable agent); **baseline** is the hand-written runbook of before
(`bench/baseline_runbook.py`: a KV compare-and-set state machine on `Central`'s Agent API).

1. Step transitions per second in one central process (goal >= 2,000), in-process on one nats-server.
   Engine: `bench/engine_steps.py`'s `steps_per_second` (RUNS runs x STEPS trivial `step.run`s: each
   transition is one compare-and-set of the run's journal). Baseline: its only transitions are an
   incident's two compare-and-sets of its KV state (open: `create`, then `clear_temp` signed and sent and
   two facts; closed: the device's signed result verified, two facts, `update` to cooling), so
   transitions/s = 2 x its incidents/s below.
   Beside it, like for like: disk incidents per second from spike to end (`incidents_per_second`), both
   through `Central` in-process: INCIDENTS spikes on distinct registered devices stored at once, then,
   once the commands are out, each device's signed `ok` result (and a reading at 40 % for the engine's
   verify step). Engine: the shipped runbook's 9 steps, cooldown 0 s; runs that fail or never end are
   counted and shown.
2. Readings per second through a trigger that does not fire, through the whole stack (goal >= 10,000):
   READINGS disk readings at 50 % (100 devices, msgpack Events as the bridge stores them) are stored in
   NERVE_TELEMETRY first (a backlog); then a real central process starts (`nerve central --config`, or
   `bench/baseline_runbook.py --config`), with its built-in agents. Its disk consumer's ack floor is
   sampled every 50 ms from the first ack until nothing is pending or unacknowledged: readings/s = acked
   / that window; CPU per reading = the process's utime + stime (/proc/<pid>/stat) over the same window.
   Only disk readings: central's consumers filter by subject in nats-server, so cpu or memory readings
   never reach it.
3. Reaction, MQTT spike -> signed `clear_temp` at the device (goal p99 <= 10 ms): mosquitto, nats-server,
   `nerve bridge` and the central process of the column, each its own process; `bench/reaction_latency.py`'s
   `spikes` (one spike at a time, each on a new device, which answers as an edge does) and `floor` (a QoS1
   round trip through the same mosquitto). Twice: spaced (each spike `--gap` after the last command, 50 ms
   by default: the reaction of a central that is not busy with the previous incident) and back to back
   (each spike as soon as the last command arrived, so it lands while central checks that incident's
   result, keeps its facts and verifies it: about 100 incidents a second, a load figure). Both verdicts
   are printed. `make bench` measures the engine through `nerve up` (one process) instead.

The goals are the engine's: PASS/FAIL is printed for its column (exit code 1 if one fails); the baseline
is printed beside it. The machine is shared: the figures are lower bounds of what it can do.

    .venv/bin/python bench/central.py            # ~2-3 min
    .venv/bin/python bench/central.py --quick    # a short run (~15-30 s): small counts, same cases
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import nats
from nats.js.errors import NotFoundError

# `python bench/central.py` puts bench/ on the path; the other benches are imported as `bench.<name>`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline_runbook import DiskRunbook
from bench.bridge_throughput import cpu_seconds
from bench.engine_steps import steps_per_second
from bench.fleet import spawn, stop, write_config
from bench.reaction_latency import floor, percentiles, spikes

from nerve.agents import disk_runbook
from nerve.runtime.central.runner import Central
from nerve.runtime.config.settings import MqttSettings, load_settings
from nerve.runtime.engine.journal import DECODER as JOURNAL
from nerve.runtime.engine.names import RUNS_BUCKET
from nerve.runtime.envelope.codec import DEFAULT_CODEC, decode, encode
from nerve.runtime.envelope.model import Command, CommandResult, Event
from nerve.runtime.jetstream.client import envelope_headers, publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams, open_bucket
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, free_port
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.signing import Signer, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

BIN: Final = Path(sys.executable).parent
BASELINE_ENTRY: Final = Path(__file__).resolve().parent / "baseline_runbook.py"
# The issues' goals (issue 10, "Figures"; issue 11, "Central >= 10,000 readings/s per process").
GOAL_STEPS: Final = 2_000.0
GOAL_READINGS: Final = 10_000.0
GOAL_P99_MS: Final = 10.0
# The disk consumers of the two columns (`engine.names.trigger_consumer`, `runner.consumer_name`).
CONSUMERS: Final = {"engine": "nerve-engine-disk", "baseline": "nerve-agent-disk-telemetry-disk"}
DEVICES: Final = 100
SAMPLE_S: Final = 0.05
READY_TIMEOUT_S: Final = 60.0
DRAIN_TIMEOUT_S: Final = 600.0
PRELOAD_CHUNK: Final = 1_000
# The registry must be older than this before central believes it (`trust.devices._SETTLE_NS`, 2 s).
REGISTRY_SETTLE_S: Final = 2.2
# Incidents: give up waiting for runs to end after this long without one ending.
NO_PROGRESS_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class Drain:
    """A central process draining a backlog of readings that fire nothing."""

    readings: int
    seconds: float
    cpu_s: float
    nats_cpu_s: float

    @property
    def per_second(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    @property
    def shares(self) -> str:
        span = max(self.seconds, 1e-9)
        return f"{100 * self.cpu_s / span:.0f} / {100 * self.nats_cpu_s / span:.0f}"

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / self.readings if self.readings else 0.0


# --- 1. step transitions -----------------------------------------------------------------------------


async def incidents_per_second(
    column: str, js: JetStreamContext, root: Path, url: str, count: int
) -> Incidents:
    """Disk incidents per second, each from its spike to its end, in one in-process `Central` (docstring, 1).

    `count` spikes on distinct registered devices are stored at once; once every command is out, each
    device's signed `ok` result (and, for the engine's verify step, a reading at 40 %) is stored. The
    clock runs from the first spike stored until the last incident ended: the baseline's closed (its
    runner handled 2 x `count` messages), the engine's runs done (claim, 2 facts, the command and its
    result, its fact, verify, the closing fact, a cooldown of 0 s and the release: 9 steps).
    """
    key, _ = generate_keypair(root / "keys", "central")
    settings = load_settings(
        overrides={
            "nats": {"url": url},
            "data_dir": str(root / "data"),
            "central": {
                "signing_key": str(key),
                "device_keys_dir": str(root / "devices"),
                # Nothing times out during the run; the engine's runs end after a cooldown of 0 s.
                "disk": {
                    "result_timeout_s": 600,
                    "verify_s": 600,
                    "cooldown_s": 0 if column == "engine" else 3600,
                },
            },
        }
    )
    # One device key, registered under every device id: the registry maps a device to its public key.
    device_key, public = generate_keypair(root / "device-keys", "bench-device")
    registry = root / "devices"
    registry.mkdir()
    devices = [f"bench-{n:05d}" for n in range(count)]
    for device in devices:
        shutil.copyfile(public, registry / f"{device}.pub")
    signers = {device: Signer.from_file(device_key, device) for device in devices}
    await asyncio.sleep(REGISTRY_SETTLE_S)
    agent = disk_runbook(settings.central.disk)
    runner = Central(
        settings=settings,
        signer=Signer.from_file(key, "central"),
        agents=[DiskRunbook(settings.central.disk)] if column == "baseline" else [],
        durable=[agent] if column == "engine" else [],
    )
    task = asyncio.create_task(runner.run(), name=f"bench-{column}-central")
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await runner.ready.wait()
        commands_before = (await js.stream_info("NERVE_COMMANDS")).state.messages
        started = time.perf_counter()
        spikes = [
            Event(source="nerve://bench", type="nerve.telemetry.disk", subject=device, data={"value": 97})
            for device in devices
        ]
        for spike in spikes:
            await publish_envelope(js, f"nerve.{spike.subject}.telemetry.disk", spike)
        await settle_count(js, "NERVE_COMMANDS", commands_before + count)
        for stored in (await stream_messages(js, "NERVE_COMMANDS"))[commands_before:]:
            command = decode(stored.data, Command)
            device = command.subject
            result = CommandResult.for_command(command, source="nerve://bench", status="ok", data={})
            await publish_envelope(js, f"nerve.{device}.results.clear_temp", signers[device].sign(result))
            if column == "engine":
                cleared = Event(
                    source="nerve://bench", type="nerve.telemetry.disk", subject=device, data={"value": 40}
                )
                await publish_envelope(js, f"nerve.{device}.telemetry.disk", cleared)
        if column == "engine":
            ended, failed, last = await runs_ended(js, {agent.run_id(spike.id) for spike in spikes})
        else:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while runner.handled < 2 * count:  # noqa: ASYNC110 - a counter; the runner has no event
                    await asyncio.sleep(0.005)
            ended, failed, last = count, 0, time.perf_counter()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return Incidents(ended=ended, of=count, seconds=last - started, failed=failed)


async def settle_count(js: JetStreamContext, stream: str, target: int) -> int:
    """Wait until `stream` holds `target` messages, or its count did not grow for `NO_PROGRESS_S`."""
    count, grew = 0, time.perf_counter()
    while count < target and time.perf_counter() - grew < NO_PROGRESS_S:
        await asyncio.sleep(SAMPLE_S)
        now = (await js.stream_info(stream)).state.messages
        if now > count:
            count, grew = now, time.perf_counter()
    return count


async def runs_ended(js: JetStreamContext, wanted: set[str]) -> tuple[int, int, float]:
    """How many of the runs `wanted` ended, how many of those not `done`, and when the last ended.

    It waits until all ended, or none did for `NO_PROGRESS_S`.

    A run may never end in the time (say, its facts could not be chained: `FactChainContended`); then
    the figure counts the runs that did, and says how many did not.
    """
    runs = await open_bucket(js, RUNS_BUCKET)
    watcher = await runs.watchall()
    ended: set[str] = set()
    failed = 0
    last = time.perf_counter()
    try:
        while len(ended) < len(wanted):
            # Journals change without a run ending (lease renewals): the clock is since the last end.
            left = last + NO_PROGRESS_S - time.perf_counter()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    entry = await anext(watcher)
            except TimeoutError:
                break
            if entry is None or not entry.value:
                continue
            record = JOURNAL.decode(entry.value)
            if record.terminal and record.run_id in wanted and record.run_id not in ended:
                ended.add(record.run_id)
                failed += record.state != "done"
                last = time.perf_counter()
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return len(ended), failed, last


@dataclass(frozen=True, slots=True)
class Incidents:
    """Disk incidents run from spike to end in one process."""

    ended: int
    of: int
    seconds: float
    failed: int = 0

    @property
    def per_second(self) -> float:
        """Incidents resolved (runs `done`) per second; failed ones are counted beside it."""
        return (self.ended - self.failed) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        notes = [f"{self.failed} failed"] if self.failed else []
        if self.ended < self.of:
            notes.append(f"{self.of - self.ended} did not end")
        return f"{self.per_second:,.1f}" + (f" ({', '.join(notes)} of {self.of})" if notes else "")


@dataclass(frozen=True, slots=True)
class Steps:
    """Figure 1 of both columns."""

    engine_steps: float
    baseline_steps: float
    engine_incidents: Incidents
    baseline_incidents: Incidents


async def transitions(args: argparse.Namespace) -> Steps:
    """Step transitions and incidents per second, each case on its own nats-server."""
    steps = 0.0
    figures: list[Incidents] = []
    for case in ("steps", "engine", "baseline"):
        with tempfile.TemporaryDirectory(prefix="nerve-bench-central-") as tmp:
            async with NatsServer(port=free_port(), data_dir=Path(tmp) / "nats") as server:
                nc = await nats.connect(server.url)
                try:
                    js = nc.jetstream()
                    await ensure_streams(js, "nerve")
                    if case == "steps":
                        steps = await steps_per_second(js, nc, args.runs, args.steps, waits=False)
                    else:
                        figures.append(
                            await incidents_per_second(case, js, Path(tmp), server.url, args.incidents)
                        )
                finally:
                    await nc.close()
    engine, baseline = figures
    # The baseline's only transitions are its two compare-and-sets per incident.
    return Steps(
        engine_steps=steps,
        baseline_steps=2 * baseline.per_second,
        engine_incidents=engine,
        baseline_incidents=baseline,
    )


# --- 2. readings that fire nothing, whole stack ----------------------------------------------------


async def preload(nc: NatsClient, js: JetStreamContext, readings: int) -> None:
    """Store `readings` disk readings at 50 % (core publishes, flushed by chunk; the stream keeps each)."""
    for start in range(0, readings, PRELOAD_CHUNK):
        for n in range(start, min(readings, start + PRELOAD_CHUNK)):
            device = f"bench-{n % DEVICES:03d}"
            event = Event(
                source=f"nerve://{device}",
                type="nerve.telemetry.disk",
                subject=device,
                data={"value": 50.0, "mount": "/"},
            )
            await nc.publish(
                f"nerve.{device}.telemetry.disk",
                encode(event, DEFAULT_CODEC),
                headers=envelope_headers(event, DEFAULT_CODEC),
            )
        await nc.flush()
    await wait_for_count(js, "NERVE_TELEMETRY", readings, timeout=DRAIN_TIMEOUT_S)


def central_argv(column: str, config: Path) -> list[str]:
    if column == "engine":
        return [str(BIN / "nerve"), "central", "--config", str(config), "--log-level", "warning"]
    return [sys.executable, str(BASELINE_ENTRY), "--config", str(config), "--log-level", "warning"]


async def drain(column: str, readings: int) -> Drain:
    """A central process of `column` draining a backlog of `readings` (module docstring, 2)."""
    with tempfile.TemporaryDirectory(prefix="nerve-bench-central-") as tmp:
        root = Path(tmp)
        async with NatsServer(port=free_port(), data_dir=root / "nats") as server:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await ensure_streams(js, "nerve")
                await preload(nc, js, readings)
                config = write_config(root, "mqtt://127.0.0.1:1", server.url)  # central needs no MQTT
                process = await spawn(central_argv(column, config), root / "central.log")
                try:
                    return await watch_drain(
                        js,
                        consumer=CONSUMERS[column],
                        process=process,
                        nats_pid=server.pid,
                        readings=readings,
                    )
                finally:
                    await stop(process)
            finally:
                await nc.close()


async def watch_drain(
    js: JetStreamContext,
    *,
    consumer: str,
    process: asyncio.subprocess.Process,
    nats_pid: int | None,
    readings: int,
) -> Drain:
    """Sample the consumer from its first ack until all `readings` are acknowledged."""
    first: tuple[float, int, float, float] | None = None  # time, acked, cpu, nats cpu
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        while True:
            await asyncio.sleep(SAMPLE_S)
            try:
                info = await js.consumer_info("NERVE_TELEMETRY", consumer)
            except NotFoundError:
                if process.returncode is not None:
                    msg = f"central exited with {process.returncode} before it took its consumer"
                    raise RuntimeError(msg) from None
                continue
            now, cpu, nats_cpu = time.perf_counter(), cpu_seconds(process.pid), cpu_seconds(nats_pid)
            acked = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            acked = acked or 0
            if first is None:
                if acked:
                    first = (now, acked, cpu, nats_cpu)
                continue
            if acked >= readings and not info.num_ack_pending and not info.num_pending:
                return Drain(
                    readings=acked - first[1],
                    seconds=now - first[0],
                    cpu_s=cpu - first[2],
                    nats_cpu_s=nats_cpu - first[3],
                )


# --- 3. reaction ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaction:
    """Spike -> command percentiles and misses, spaced and back to back, and the mosquitto floor's."""

    spaced: dict[str, float]
    spaced_missed: int
    back_to_back: dict[str, float]
    back_to_back_missed: int
    floor: dict[str, float]


async def reaction(column: str, args: argparse.Namespace) -> Reaction:
    """The reaction of one column's stack, spaced and back to back (module docstring, 3)."""
    with tempfile.TemporaryDirectory(prefix="nerve-bench-central-") as tmp:
        root = Path(tmp)
        async with (
            Mosquitto(port=free_port(), data_dir=root / "mosquitto") as mosquitto,
            NatsServer(port=free_port(), data_dir=root / "nats") as server,
        ):
            config = write_config(root, mosquitto.url, server.url)
            log = root / "processes.log"
            parts = [
                await spawn(
                    [str(BIN / "nerve"), "bridge", "--config", str(config), "--log-level", "warning"], log
                ),
                await spawn(central_argv(column, config), log),
            ]
            try:
                settings = MqttSettings(url=mosquitto.url)
                await wait_ready(server.url, CONSUMERS[column], settings, log)
                floor_ms = await floor(settings, args.spikes)
                registry = None if args.silent else root / "devices"
                spaced, spaced_missed = await spikes(
                    settings, args.spaced, args.warmup, registry=registry, gap=args.gap
                )
                back_to_back, back_to_back_missed = await spikes(
                    settings, args.spikes, args.warmup, registry=registry
                )
            finally:
                for process in parts:
                    await stop(process)
    if not spaced or not back_to_back:
        msg = f"{column}: no spike got a command; see the processes' log"
        raise RuntimeError(msg)
    return Reaction(
        percentiles(spaced),
        spaced_missed,
        percentiles(back_to_back),
        back_to_back_missed,
        percentiles(floor_ms),
    )


async def wait_ready(url: str, consumer: str, mqtt: MqttSettings, log: Path) -> None:
    """Until central's disk consumer exists and a reading sent over MQTT is stored (the bridge is up)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                with contextlib.suppress(NotFoundError):
                    await js.consumer_info("NERVE_TELEMETRY", consumer)
                    break
                await asyncio.sleep(SAMPLE_S)
            async with MqttClient(mqtt, client_id="bench-central-warmup") as client:
                while not (await js.stream_info("NERVE_TELEMETRY")).state.messages:
                    await client.publish("nerve/bench-warmup/telemetry/cpu", b"1", qos=1)
                    await asyncio.sleep(SAMPLE_S)
    except TimeoutError:
        msg = f"central ({consumer}) or the bridge not ready in {READY_TIMEOUT_S:g}s; see {log}"
        raise RuntimeError(msg) from None
    finally:
        await nc.close()


# --- the table -----------------------------------------------------------------------------------


def positive(text: str) -> int:
    """An argparse type: a count of at least 1."""
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        msg = f"{text!r} is not a count of at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def verdict(ok: bool) -> str:  # noqa: FBT001 - a printed word
    return "PASS" if ok else "FAIL"


def ms(stats: dict[str, float]) -> str:
    return f"{stats['p50']:.2f} / {stats['p90']:.2f} / {stats['p99']:.2f}"


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a check that it all runs (~30 s)")
    parser.add_argument("--runs", type=positive, help="engine: runs (default 200, quick 20)")
    parser.add_argument("--steps", type=positive, help="engine: steps per run (default 20, quick 10)")
    parser.add_argument("--incidents", type=positive, help="incidents per column (default 500, quick 10)")
    parser.add_argument("--readings", type=positive, help="backlog (default 100000, quick 5000)")
    parser.add_argument("--spikes", type=positive, help="timed spikes per column (default 1,000, quick 30)")
    parser.add_argument(
        "--spaced", type=positive, help="timed spikes per column, spaced by --gap (default 500, quick 30)"
    )
    parser.add_argument(
        "--gap", type=float, default=0.05, help="seconds after a command before the next spaced spike (0.05)"
    )
    parser.add_argument("--warmup", type=int, help="untimed spikes first (default 50, quick 5)")
    parser.add_argument(
        "--silent", action="store_true", help="devices never answer their commands (every run waits 30 s)"
    )
    args = parser.parse_args()
    defaults = {"runs": (200, 20), "steps": (20, 10), "incidents": (500, 10), "readings": (100_000, 5_000)}
    defaults |= {"spikes": (1_000, 30), "spaced": (500, 30), "warmup": (50, 5)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    print(
        f"{os.cpu_count()} cores, shared with other work (figures are lower bounds); python "
        f"{sys.version.split()[0]}{'; --quick: small counts' if args.quick else ''}",
        flush=True,
    )
    steps = await transitions(args)
    engine_steps = steps.engine_steps
    print(
        f"1. step transitions/s: engine {engine_steps:,.0f}, baseline {steps.baseline_steps:,.0f}; "
        f"incidents/s: engine {steps.engine_incidents}, baseline {steps.baseline_incidents}",
        flush=True,
    )
    drains = {column: await drain(column, args.readings) for column in ("engine", "baseline")}
    print(
        "2. readings/s not firing: "
        + ", ".join(f"{column} {d.per_second:,.0f}" for column, d in drains.items()),
        flush=True,
    )
    reactions = {column: await reaction(column, args) for column in ("engine", "baseline")}
    print(
        "3. spike -> command p99, spaced / back to back: "
        + ", ".join(
            f"{column} {r.spaced['p99']:.2f} / {r.back_to_back['p99']:.2f} ms"
            for column, r in reactions.items()
        ),
        flush=True,
    )

    engine, baseline = drains["engine"], drains["baseline"]
    rows = [
        ("step transitions/s per central process", f"{engine_steps:,.0f}", f"{steps.baseline_steps:,.0f}"),
        (
            "  disk incidents resolved/s, spike to end",
            str(steps.engine_incidents),
            str(steps.baseline_incidents),
        ),
        ("readings/s not firing, whole stack", f"{engine.per_second:,.0f}", f"{baseline.per_second:,.0f}"),
        ("  central CPU per reading", f"{engine.cpu_us:.1f} us", f"{baseline.cpu_us:.1f} us"),
        ("  central / nats-server CPU, % of a core", engine.shares, baseline.shares),
        (
            f"spike -> command, {args.gap * 1000:g} ms apart, p50/90/99 ms",
            ms(reactions["engine"].spaced),
            ms(reactions["baseline"].spaced),
        ),
        (
            "  back to back, p50 / p90 / p99 ms",
            ms(reactions["engine"].back_to_back),
            ms(reactions["baseline"].back_to_back),
        ),
        (
            "  missed (no command within 5 s)",
            f"{reactions['engine'].spaced_missed} + {reactions['engine'].back_to_back_missed}",
            f"{reactions['baseline'].spaced_missed} + {reactions['baseline'].back_to_back_missed}",
        ),
        (
            "  floor: mosquitto QoS1 round trip ms",
            ms(reactions["engine"].floor),
            ms(reactions["baseline"].floor),
        ),
    ]
    print()
    print(f"{'figure':<42} {'engine':>28} {'baseline':>28}")
    for name, left, right in rows:
        print(f"{name:<42} {left:>28} {right:>28}")
    print(
        f"(1: engine {args.runs} runs x {args.steps} trivial steps, a journal compare-and-set each; "
        f"baseline {args.incidents} incidents x 2 KV compare-and-sets (open, close); incidents: "
        f"{args.incidents} each. 2: {args.readings:,} readings. 3: {args.spaced} spaced and "
        f"{args.spikes} back to back spikes each)"
    )
    print()
    engine_reaction = reactions["engine"]
    spaced_p99, back_p99 = engine_reaction.spaced["p99"], engine_reaction.back_to_back["p99"]
    checks = [
        (f"step transitions/s >= {GOAL_STEPS:,.0f}", engine_steps >= GOAL_STEPS, f"{engine_steps:,.0f}"),
        (
            f"readings/s not firing >= {GOAL_READINGS:,.0f}",
            engine.per_second >= GOAL_READINGS,
            f"{engine.per_second:,.0f}",
        ),
        (
            f"spike -> command p99 <= {GOAL_P99_MS:g} ms, spikes {args.gap * 1000:g} ms apart",
            spaced_p99 <= GOAL_P99_MS and not engine_reaction.spaced_missed,
            f"{spaced_p99:.2f} ms, {engine_reaction.spaced_missed} missed",
        ),
        (
            f"spike -> command p99 <= {GOAL_P99_MS:g} ms, spikes back to back",
            back_p99 <= GOAL_P99_MS and not engine_reaction.back_to_back_missed,
            f"{back_p99:.2f} ms, {engine_reaction.back_to_back_missed} missed",
        ),
    ]
    for goal, ok, figure in checks:
        print(f"goal (engine) {goal}: {verdict(ok)} ({figure})")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
