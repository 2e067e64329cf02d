"""Simulated devices through the real MQTT path: the engine of `nerve simulate` and of `make bench-fleet`.

N devices (`sim-00000` …), each with its own MQTT client id and connection (or, with `connections`,
multiplexed over that many connections), publish one QoS1 reading every 1/R s, rotating cpu, memory and
disk, enveloped the way the edge does (`<device>.<run>.<seq>` ids, so a redelivered reading is stored
once). S times a second a distinct device publishes a disk reading above the disk runbook's threshold;
each device answers `clear_temp` with a result signed by its own key, registered in central's device
registry as `nerve.runtime.testing.provision_device` does (the private keys live in a temporary folder
and the registrations are removed at the end), so central's runbook closes the incident.

What is measured, from NATS as the cli identity: the NERVE_TELEMETRY stream's last sequence (stored/s);
live, the lag publish → stored of a sample of the devices (about `LIVE_SAMPLE_PER_S` readings a second,
through an ordered, headers-only consumer: its `Nats-Msg-Id` names the reading, its stream timestamp says
when it was stored); and once the load is over, every stored reading of this run, read the same way from
where the run began: lag over the run, duplicates, and what was acknowledged by mosquitto but never
stored (lost). Reading every reading while the load runs cost the simulator about a fifth of its CPU at
10,000 readings/s, on the box it shares with what it measures. A command's latency is from the spike's
publish to the command's arrival on the device's topic. See docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import resource
import secrets
import shutil
import sys
import tempfile
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult, Event, Fact, derived_id
from nerve.runtime.errors import BrokerUnavailable, ConfigError, DecodeError, shown_url
from nerve.runtime.fleet.watch import ARGV as WATCH_ARGV
from nerve.runtime.fleet.watch import READY
from nerve.runtime.jetstream.client import connect
from nerve.runtime.jetstream.streams import STREAM_OF_KIND
from nerve.runtime.subjects import Address, Kind, kind_filter, subject_root
from nerve.runtime.testing import provision_device
from nerve.runtime.trust.devices import registry_dir
from nerve.runtime.trust.signing import PUBLIC_SUFFIX
from nerve.runtime.wire.mqtt import MqttWireError, open_mqtt

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.trust.signing import Signer
    from nerve.runtime.wire.mqtt import Incoming, MqttWire

__all__ = ["FleetPlan", "Second", "Simulation", "Summary", "percentile"]

log = logging.getLogger(__name__)

METRICS: Final = ("cpu", "memory", "disk")
ACTION: Final = "clear_temp"
DEVICE_PREFIX: Final = "sim"
# Connections opened at once while the fleet connects (mosquitto accepts them one by one anyway).
OPENING_AT_ONCE: Final = 64
# Command topics per SUBSCRIBE on a multiplexed connection.
FILTERS_PER_SUBSCRIBE: Final = 64
# How many commands mosquitto may send a connection unacknowledged (they are answered at once).
COMMAND_RECEIVE_MAXIMUM: Final = 64
# Publishes in flight per connection, within what the broker takes (its Receive Maximum).
MAX_IN_FLIGHT: Final = 1000
# Readings waiting for room in flight, per connection: beyond this a reading is skipped (counted), so a
# broker that takes nothing cannot make the simulator's memory grow without bound.
MAX_QUEUED: Final = 1000
TICK_S: Final = 0.01
#: The most readings made in one go, in seconds of the plan's rate; more overdue than that (the simulator
#: cannot keep up: it shares the CPU with what it measures) are not made (`Summary.behind`). Catching up
#: all at once held the event loop for longer each time (each pass made what fell due during the last):
#: in overload runs one simulator stopped sending anything, keep-alives included, for over 45 s, and
#: mosquitto dropped up to all 6,000 of its connections (their readings in flight never acknowledged).
#: Not less than a second's worth: a pass of the loop can take 100 ms under load without the simulator
#: being behind (at 50 ms, two simulators made 8,400 of the 36,000 readings/s asked at 70 % of a core).
MAX_BURST_S: Final = 1.0
REPORT_EVERY_S: Final = 1.0
OPEN_TIMEOUT_S: Final = 10.0
INTERRUPTED_DRAIN_S: Final = 3.0
# Open files kept for NATS, the key files and the interpreter, beyond one per MQTT connection.
SPARE_FILES: Final = 100
_ID_HEADER: Final = "Nats-Msg-Id"
#: Readings a second the live lag is sampled from (whole devices: every k-th device, k as small as fits).
LIVE_SAMPLE_PER_S: Final = 500
#: After the drain window, reading back what was stored goes on while it progresses. When no stored
#: reading came for this long, it reads on from the last one it saw on a new consumer, up to
#: `READ_BACK_RESTARTS` times, then stops (what it did not see is counted lost). Why: a 300 s run of
#: 10,000 devices counted 459,000 of 2.6 million readings stored and the rest lost, while the stack
#: answered every spike. Not proven, the likely cause: nats-py's ordered consumer, when it loses its
#: place, makes its replacement in the background and only logs a failure (a request that times out
#: under load), and tries again only after two missed heartbeats (10 s).
READ_BACK_STALL_S: Final = 10.0
READ_BACK_RESTARTS: Final = 5
#: How long NATS may take to make a consumer of stored readings (busy storing an overload's backlog, its
#: API requests time out): asked again each second until then, a warning each time.
CONSUMER_PATIENCE_S: Final = 120.0
# How long the command watcher (nerve.runtime.fleet.watch, its own process) may take to subscribe.
WATCH_READY_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """What to simulate. `rate` is readings per second per device, `spikes` disk spikes per second.

    `duration_s` None runs until cancelled; `connections` 0 gives each device its own connection;
    `drain_s` is how long to wait at the end for what was sent to be stored (then it is lost).
    """

    devices: int
    rate: float
    spikes: float = 0.0
    duration_s: float | None = None
    connections: int = 0
    drain_s: float = 10.0

    def __post_init__(self) -> None:
        """Raise `ConfigError` naming the first value that cannot be simulated."""
        checks = (
            ("--devices", self.devices > 0, f"{self.devices} devices: give 1 or more"),
            (
                "--rate",
                0 < self.rate < math.inf,
                f"rate {self.rate:g}: give readings per second per device, above 0",
            ),
            ("--spikes", 0 <= self.spikes < math.inf, f"{self.spikes:g} spikes per second: give 0 or more"),
            (
                "--duration",
                self.duration_s is None or 0 < self.duration_s < math.inf,
                f"duration {self.duration_s}: give seconds above 0",
            ),
            ("--connections", self.connections >= 0, f"{self.connections} connections: give 0 or more"),
            ("--drain", 0 <= self.drain_s < math.inf, f"drain {self.drain_s:g}: give seconds, 0 or more"),
        )
        for flag, ok, message in checks:
            if not ok:
                raise ConfigError(message, source="command line", key=flag)

    @property
    def links(self) -> int:
        """How many MQTT connections carry the fleet."""
        return self.devices if self.connections == 0 else min(self.connections, self.devices)


@dataclass(frozen=True, slots=True)
class Second:
    """One live line: rates over the last interval, percentiles of what it measured (ms; None: none)."""

    t: float
    offered_per_s: float
    stored_per_s: float
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    spikes: int
    commands: int
    command_p50_ms: float | None
    command_p99_ms: float | None
    duplicates: int
    queued: int


@dataclass(frozen=True, slots=True)
class Summary:
    """The whole run. Every reading offered is stored, lost or unacknowledged.

    `lost`: acknowledged by mosquitto, never stored (after the drain window); `unacknowledged`: never
    stored, and mosquitto never acknowledged it (its connection was lost, or the run was cut short).
    """

    devices: int
    connections: int
    rate: float
    spikes_per_s: float
    seconds: float
    connect_s: float
    offered: int
    offered_per_s: float
    stored: int
    stored_per_s: float
    lost: int
    unacknowledged: int
    duplicates: int
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    lag_max_ms: float | None
    spikes: int
    commands: int
    spikes_without_command: int
    command_p50_ms: float | None
    command_p99_ms: float | None
    duplicate_commands: int
    incidents_resolved: int
    incidents_failed: int
    connections_lost: int = 0
    skipped: int = 0
    # Readings due that the simulator did not make: it could not keep up with its plan (MAX_BURST_S).
    behind: int = 0
    interrupted: bool = False
    # Spike -> the command delivered by mosquitto, as the command watcher (its own process and MQTT
    # connection, subscribed to every device's commands) saw it; `command_*`: as the simulated device,
    # one of thousands on the simulator's event loop, handled it. None: no watcher (docs/fleet.md).
    delivered_p50_ms: float | None = None
    delivered_p99_ms: float | None = None
    # Where a spike's command spent its time (ms, p50 / p99), for the spikes whose stored time was seen:
    # publish -> the spike stored in JetStream; stored -> the command made by central (its `time`);
    # made -> delivered (the watcher; else handled by the simulated device). Clocks of one machine: from
    # several machines, their skew is in the figures.
    spike_stored_p50_ms: float | None = None
    spike_stored_p99_ms: float | None = None
    central_p50_ms: float | None = None
    central_p99_ms: float | None = None
    downlink_p50_ms: float | None = None
    downlink_p99_ms: float | None = None
    # The last part split at JetStream's stored time of the command: made -> stored (central publishing
    # it), stored -> delivered (the bridge's downlink and mosquitto). For the commands whose stored time
    # the simulator's consumer of the commands stream saw.
    command_stored_p50_ms: float | None = None
    command_stored_p99_ms: float | None = None
    sent_down_p50_ms: float | None = None
    sent_down_p99_ms: float | None = None


def readings_due(due: int, made: int, burst: int) -> tuple[int, int]:
    """How many readings to have made by now, and how many of those due are given up (behind).

    `due`: readings due by now (less those given up before); `made`: made so far. At most `burst` more
    are made in one go: the simulator that fell further behind gives up the rest, and says how many.
    """
    if due - made <= burst:
        return due, 0
    return made + burst, due - made - burst


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0-1, nearest rank) of `values`, or None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass(slots=True)
class _Device:
    """One simulated device: its topics, its signer, and per reading (by seq) its send time and fate.

    `state[seq]`: bit 1 acknowledged by mosquitto, bit 2 stored in JetStream.
    """

    name: str
    link: _Link
    topics: tuple[str, ...]
    results_topic: str
    source: str
    signer: Signer
    sent: array[float] = field(default_factory=lambda: array("d"))
    state: bytearray = field(default_factory=bytearray)
    answered: set[str] = field(default_factory=set)


class _Link:
    """One MQTT connection of the simulator: keeps at most `limit` publishes in flight, queues the rest."""

    def __init__(self, wire: MqttWire, *, limit: int) -> None:
        self.wire = wire
        self.limit = limit
        self.in_flight = 0
        self.queue: deque[tuple[str, bytes, Callable[[bool], None] | None]] = deque()

    def offer(
        self, topic: str, payload: bytes, done: Callable[[bool], None] | None, *, first: bool = False
    ) -> None:
        if self.in_flight < self.limit and not self.queue:
            self._send(topic, payload, done)
        elif first:
            self.queue.appendleft((topic, payload, done))
        else:
            self.queue.append((topic, payload, done))

    def _send(self, topic: str, payload: bytes, done: Callable[[bool], None] | None) -> None:
        try:
            future = self.wire.publish_nowait(topic, payload)
        except MqttWireError:
            if done is not None:
                done(False)  # noqa: FBT003 - the outcome
            return
        self.in_flight += 1

        def acked(future: asyncio.Future[None]) -> None:
            self.in_flight -= 1
            ok = not future.cancelled() and future.exception() is None
            if done is not None:
                done(ok)
            while self.queue and self.in_flight < self.limit and not self.wire.closed.done():
                self._send(*self.queue.popleft())

        future.add_done_callback(acked)


class Simulation:
    """A run of `plan` against the brokers of `settings`; `run()` returns its `Summary`.

    `on_second` gets a `Second` every `REPORT_EVERY_S`; `on_ready` gets one line once the fleet is
    connected and registered, before the load starts. Raises `ConfigError` for an impossible plan,
    `MqttWireError` / `BrokerUnavailable` (one line each) when a broker cannot be reached.
    Cancelling `run()` (Ctrl-C) stops the load and still drains and returns the summary (interrupted).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        plan: FleetPlan,
        on_second: Callable[[Second], None] | None = None,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._plan = plan
        self._on_second = on_second or (lambda _: None)
        self._on_ready = on_ready or (lambda _: None)
        self._run = secrets.token_hex(4)
        self._prefix = settings.prefix
        self._threshold = settings.central.disk.threshold
        self._registry = registry_dir(settings.central.device_keys_dir, settings.data_dir)
        self._devices: list[_Device] = []
        self._by_name: dict[str, _Device] = {}
        self._links: list[_Link] = []
        self._spikes: dict[str, float] = {}  # spike reading id -> when it was sent, until its command came
        self._spike_sent: dict[str, float] = {}  # every spike reading id -> when it was sent
        self._spike_stored: dict[str, float] = {}  # spike reading id -> when JetStream stored it
        # spike id, command id, command made, command came
        self._command_paths: list[tuple[str, str, float, float]] = []
        self._command_stored: dict[str, float] = {}  # id of a command to our devices -> when stored
        self._delivered: dict[str, float] = {}  # spike id -> when the watcher saw its command
        self._read_back: JetStreamContext.PushSubscription | None = None  # the consumer reading back
        self._read_back_from = 0  # where it began (the stream's first sequence that may be ours)
        self._read_back_seq = 0  # the last stream sequence the read-back consumer delivered
        self._read_back_at = 0.0  # when (monotonic)
        self._commands_seen: set[str] = set()
        self._registered: list[Path] = []
        # Counters and samples (wall-clock seconds).
        self._offered = 0
        self._acked = 0
        self._skipped = 0
        self._stored_ours = 0
        self._duplicates = 0
        self._duplicate_commands = 0
        self._behind = 0  # readings due that were not made: the simulator could not keep up
        self._bad_commands = 0
        self._resolved: set[str] = set()
        self._failed: set[str] = set()
        self._lags: array[float] = array("d")
        self._command_latencies: list[float] = []
        self._window_lags: list[float] = []
        self._window_commands: list[float] = []
        self._window_spikes = 0
        self._spike_count = 0
        self._connections_lost = 0
        self._closing = False
        self._stop = asyncio.Event()  # no more load
        self._finished = asyncio.Event()  # drained: no more lines

    # -- setting up

    def _name(self, index: int) -> str:
        # A run's own names: a device of an earlier run may still be cooling down (central.disk.cooldown_s)
        # and would answer no spike.
        width = max(5, len(str(self._plan.devices - 1)))
        return f"{DEVICE_PREFIX}-{self._run}-{index:0{width}d}"

    def _provision(self, keys: Path) -> list[Signer]:
        signers = []
        for index in range(self._plan.devices):
            name = self._name(index)
            signers.append(provision_device(self._registry, name, keys=keys))
            self._registered.append(self._registry / f"{name}{PUBLIC_SUFFIX}")
        return signers

    async def _open_link(self, index: int, names: list[str]) -> _Link:
        holder: list[_Link] = []

        def on_messages(batch: list[Incoming]) -> None:
            link = holder[0]
            ids = []
            for message in batch:
                self._on_command(message)
                if message.packet_id:
                    ids.append(message.packet_id)
            link.wire.puback(ids)

        client_id = f"nerve-sim-{names[0]}" if len(names) == 1 else f"nerve-sim-{self._run}-{index}"
        wire = await open_mqtt(
            self._settings.mqtt,
            client_id=client_id,
            on_messages=on_messages,
            clean_start=True,
            session_expiry_s=0,
            receive_maximum=COMMAND_RECEIVE_MAXIMUM,
            timeout_s=OPEN_TIMEOUT_S,
        )
        link = _Link(wire, limit=min(MAX_IN_FLIGHT, wire.receive_maximum))
        holder.append(link)
        wire.closed.add_done_callback(lambda closed: self._connection_ended(client_id, closed))
        filters = [f"{self._prefix}/{name}/{Kind.COMMANDS}/+" for name in names]
        for start in range(0, len(filters), FILTERS_PER_SUBSCRIBE):
            await wire.subscribe(filters[start : start + FILTERS_PER_SUBSCRIBE], timeout_s=OPEN_TIMEOUT_S)
        return link

    def _connection_ended(self, client_id: str, closed: asyncio.Future[None]) -> None:
        reason = closed.exception() if not closed.cancelled() else None  # (retrieved: never "unretrieved")
        if self._closing:
            return
        self._connections_lost += 1
        # Its devices' readings are counted unacknowledged from now on; the first loss is worth a line.
        if self._connections_lost == 1:
            log.warning("simulated connection %s lost: %s", client_id, reason)

    async def _connect_fleet(self) -> list[_Link]:
        plan = self._plan
        groups: list[list[int]] = [[] for _ in range(plan.links)]
        for index in range(plan.devices):
            groups[index % plan.links].append(index)
        # The first alone: an unreachable broker is one clear error, not thousands.
        links: list[_Link | None] = [None] * plan.links
        links[0] = await self._open_link(0, [self._name(i) for i in groups[0]])
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def open_one(index: int) -> None:
            async with gate:
                links[index] = await self._open_link(index, [self._name(i) for i in groups[index]])

        try:
            async with asyncio.TaskGroup() as tasks:
                for index in range(1, plan.links):
                    tasks.create_task(open_one(index), name=f"nerve-simulate-open-{index}")
        except* MqttWireError as group:
            opened = sum(link is not None for link in links)
            raise MqttWireError(
                f"{group.exceptions[0]} (after {opened} of {plan.links} connections opened: "
                "see docs/fleet.md on how many one process can open)"
            ) from None
        finally:
            self._links = [link for link in links if link is not None]
        return self._links

    def _build_devices(self, links: list[_Link], signers: list[Signer]) -> None:
        for index, signer in enumerate(signers):
            name = self._name(index)
            device = _Device(
                name=name,
                link=links[index % len(links)],
                topics=tuple(Address(name, Kind.TELEMETRY, metric).topic(self._prefix) for metric in METRICS),
                results_topic=Address(name, Kind.RESULTS, ACTION).topic(self._prefix),
                source=f"nerve://edge/{name}",
                signer=signer,
            )
            self._devices.append(device)
            self._by_name[name] = device

    # -- the load

    def _reading(self, device: _Device, metric: int, value: float) -> None:
        if len(device.link.queue) >= MAX_QUEUED:
            self._skipped += 1  # mosquitto takes nothing more from this connection: not offered
            return
        seq = len(device.sent)
        now = time.time()
        name = METRICS[metric]
        data: dict[str, object] = {"value": round(value, 1), "unit": "%"}
        if name == "disk":
            data["mount"] = "/"
        event_id = f"{device.name}.{self._run}.{seq}"
        payload = to_msgpack(
            Event(
                id=event_id,
                source=device.source,
                type=f"nerve.telemetry.{name}",
                subject=device.name,
                time=datetime.fromtimestamp(now, UTC),
                data=data,
            )
        )
        device.sent.append(now)
        device.state.append(0)
        self._offered += 1
        state = device.state

        def done(ok: bool) -> None:  # noqa: FBT001 - the link's callback
            if ok:
                state[seq] |= 1
                self._acked += 1

        device.link.offer(device.topics[metric], payload, done)
        if metric == len(METRICS) - 1 and value >= self._threshold:
            self._spikes[event_id] = now
            self._spike_sent[event_id] = now
            self._spike_count += 1
            self._window_spikes += 1

    def _normal_value(self, metric: int) -> float:
        if METRICS[metric] == "disk":
            return random.uniform(10.0, max(10.0, self._threshold - 20.0))  # noqa: S311 - not a secret
        return random.uniform(5.0, 70.0)  # noqa: S311 - not a secret

    async def _generate(self) -> None:
        plan = self._plan
        devices = self._devices
        count = len(devices)
        per_s = plan.devices * plan.rate
        burst = max(1, int(per_s * MAX_BURST_S))
        spike_value = self._threshold + (100.0 - self._threshold) / 2
        offset = random.randrange(count)  # noqa: S311 - which devices spike first
        began = time.monotonic()
        readings = spikes = 0
        while not self._stop.is_set():
            elapsed = time.monotonic() - began
            due, behind = readings_due(int(per_s * elapsed) - self._behind, readings, burst)
            self._behind += behind
            while readings < due:
                device = devices[readings % count]
                metric = len(device.sent) % len(METRICS)
                self._reading(device, metric, self._normal_value(metric))
                readings += 1
            due_spikes = int(plan.spikes * elapsed)
            while spikes < due_spikes:
                self._reading(devices[(offset + spikes) % count], len(METRICS) - 1, spike_value)
                spikes += 1
            await asyncio.sleep(TICK_S)

    # -- what comes back

    def _on_command(self, message: Incoming) -> None:
        parts = message.topic.split("/")
        device = self._by_name.get(parts[-3]) if len(parts) >= 3 else None  # noqa: PLR2004 - device/kind/action
        if device is None:
            return
        try:
            command = decode(message.payload, Command)
        except DecodeError as exc:
            self._bad_commands += 1
            log.warning("simulated device %s: undecodable command on %s: %s", device.name, message.topic, exc)
            return
        now = time.time()
        sent_first = command.id not in self._commands_seen
        if not sent_first:
            self._duplicate_commands += 1
        else:
            self._commands_seen.add(command.id)
            spike = command.causationid or ""
            sent = self._spikes.pop(spike, None)
            if sent is not None:
                self._command_latencies.append(now - sent)
                self._window_commands.append(now - sent)
                self._command_paths.append((spike, command.id, command.time.timestamp(), now))
        ok = command.action == ACTION and command.subject == device.name
        result = CommandResult.for_command(
            command,
            source=device.source,
            status="ok" if ok else "rejected",
            reason="" if ok else f"{command.action} is not allow-listed on a simulated device",
            data={"files_deleted": 0, "bytes_freed": 0} if ok else {},
            result_id=derived_id(command.id, "result"),  # a repeated command gets the same result
            subject=device.name,
        )
        topic = (
            device.results_topic
            if ok
            else Address(device.name, Kind.RESULTS, command.action).topic(self._prefix)
        )
        device.link.offer(topic, to_msgpack(device.signer.sign(result)), None, first=True)
        if ok and sent_first:
            # As an edge does once clear_temp freed space: its disk reading moved, so it reports it (the
            # disk runbook verifies by that reading before it resolves the incident).
            disk = len(METRICS) - 1
            self._reading(device, disk, self._normal_value(disk))

    def _reading_of(self, msg: Msg) -> tuple[str, _Device, int] | None:
        """The reading of this run a stored message is (its id, device and seq), from its `Nats-Msg-Id`."""
        reading_id = (msg.headers or {}).get(_ID_HEADER, "")
        parts = reading_id.split(".")
        if len(parts) != 3 or parts[1] != self._run:  # noqa: PLR2004 - device.run.seq
            return None
        device = self._by_name.get(parts[0])
        if device is None or not parts[2].isdigit() or int(parts[2]) >= len(device.sent):
            return None
        return reading_id, device, int(parts[2])

    async def _on_sampled(self, msg: Msg) -> None:
        """Live: a sampled device's reading stored; its lag goes to this second's line."""
        found = self._reading_of(msg)
        if found is not None:
            _, device, seq = found
            self._window_lags.append(msg.metadata.timestamp.timestamp() - device.sent[seq])

    async def _on_stored(self, msg: Msg) -> None:
        """Read back once the load is over: every stored reading of this run."""
        metadata = msg.metadata
        self._read_back_seq = metadata.sequence.stream
        self._read_back_at = time.monotonic()
        found = self._reading_of(msg)
        if found is None:
            return
        reading_id, device, seq = found
        if device.state[seq] & 2:
            self._duplicates += 1
            return
        device.state[seq] |= 2
        self._stored_ours += 1
        stored = metadata.timestamp.timestamp()
        if reading_id in self._spike_sent:
            self._spike_stored[reading_id] = stored
        self._lags.append(stored - device.sent[seq])

    async def _on_command_stored(self, msg: Msg) -> None:
        """Live: a command to one of our devices stored; when, by its id (`Nats-Msg-Id`)."""
        parts = msg.subject.split(".")
        if len(parts) >= 3 and parts[-3] in self._by_name:  # noqa: PLR2004 - device/kind/action
            command_id = (msg.headers or {}).get(_ID_HEADER)
            if command_id:
                self._command_stored[command_id] = msg.metadata.timestamp.timestamp()

    async def _on_fact(self, msg: Msg) -> None:
        # A plain subscription sees every publish, also one JetStream then refused as a duplicate: an
        # incident counts once.
        device = msg.subject.split(".")[-3]
        if device not in self._by_name:
            return
        try:
            fact = decode(msg.data, Fact)
        except DecodeError:
            return
        incident = str(fact.data.get("incident_id", fact.id))
        (self._resolved if fact.kind == "incident_resolved" else self._failed).add(incident)

    # -- reporting

    async def _stream_last_seq(self, nc: NatsClient) -> int:
        stream = STREAM_OF_KIND[Kind.TELEMETRY]
        try:
            info = await nc.jetstream().stream_info(stream)
        except NotFoundError:
            raise ConfigError(
                f"no stream {stream} at {shown_url(self._settings.nats.url)}: is the stack running? "
                "(nerve up, or nerve streams apply then nerve bridge and nerve central)",
                key="nats.url",
            ) from None
        return info.state.last_seq

    async def _how_far(self, nc: NatsClient) -> int | None:
        """The telemetry stream's last sequence, or None (said in one line) if NATS did not answer in time.

        A loaded server, or this process, answering late is not the end of the run.
        """
        try:
            async with asyncio.timeout(REPORT_EVERY_S * 5):
                return await self._stream_last_seq(nc)
        except (TimeoutError, NatsError) as exc:
            log.warning(
                "simulate: no answer to how far %s is (%s); the next line covers this second too",
                STREAM_OF_KIND[Kind.TELEMETRY],
                type(exc).__name__,
            )
            return None

    async def _report(self, nc: NatsClient, began: float) -> None:
        last_t = time.monotonic()
        last_offered = self._offered
        last_seq = await self._how_far(nc)
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_EVERY_S):
                    await self._finished.wait()
            checkpoint()
            if self._finished.is_set():
                return
            now = time.monotonic()
            seq = await self._how_far(nc)
            checkpoint()
            if seq is None:
                continue  # the next line covers this window too
            if last_seq is None:  # no answer at the start: rates from here on
                last_t, last_offered, last_seq = now, self._offered, seq
                continue
            span = max(now - last_t, 1e-9)
            lags, self._window_lags = self._window_lags, []
            commands, self._window_commands = self._window_commands, []
            self._on_second(
                Second(
                    t=round(now - began, 1),
                    offered_per_s=round((self._offered - last_offered) / span, 1),
                    stored_per_s=round((seq - last_seq) / span, 1),
                    lag_p50_ms=_ms(percentile(lags, 0.5)),
                    lag_p99_ms=_ms(percentile(lags, 0.99)),
                    spikes=self._window_spikes,
                    commands=len(commands),
                    command_p50_ms=_ms(percentile(commands, 0.5)),
                    command_p99_ms=_ms(percentile(commands, 0.99)),
                    duplicates=self._duplicates,
                    queued=sum(len(link.queue) + link.in_flight for link in self._links),
                )
            )
            self._window_spikes = 0
            last_t, last_offered, last_seq = now, self._offered, seq

    # -- the run

    async def run(self) -> Summary:
        """Connect, load, drain, and say what happened (see the class docstring)."""
        limit = raise_open_files_limit()
        if self._plan.links > limit - SPARE_FILES:
            raise ConfigError(
                f"{self._plan.links} connections need as many open files, and this process may open {limit} "
                f"(ulimit -n): share fewer connections with --connections (at most {limit - SPARE_FILES})",
                source="command line",
                key="--devices",
            )
        nc = await connect(self._settings.nats, name="nerve-simulate")
        keys = Path(tempfile.mkdtemp(prefix="nerve-simulate-keys-"))
        try:
            return await self._run_with(nc, keys)
        finally:
            self._closing = True
            for path in self._registered:
                path.unlink(missing_ok=True)
            shutil.rmtree(keys, ignore_errors=True)
            with contextlib.suppress(Exception):
                await nc.close()
            for link in self._links:
                link.wire.close()

    async def _run_with(self, nc: NatsClient, keys: Path) -> Summary:
        plan = self._plan
        # Whatever is stored from here on may be ours (the stream is checked before anything connects).
        start_seq = await self._stream_last_seq(nc) + 1
        connect_began = time.monotonic()
        links = await self._connect_fleet()  # before provisioning: an unreachable broker leaves nothing
        # In a thread (about 2 ms a device): the connections just opened keep pinging meanwhile. On this
        # loop, 9,000 devices took over the broker's 45 s keep-alive on a busy box, and it dropped them.
        self._build_devices(links, await asyncio.to_thread(self._provision, keys))
        connect_s = time.monotonic() - connect_began
        self._on_ready(
            f"{len(links)} connections open and {plan.devices} devices registered in {self._registry} "
            f"in {connect_s:.1f}s; load starts"
        )
        js = nc.jetstream()
        root = subject_root(self._prefix)
        sampled = await self._read_stored(js, start_seq, self._sampled_filters(), self._on_sampled)
        commands = await self._read_commands_stored(nc)  # before any spike: none is missed
        facts = [
            await nc.subscribe(f"{root}.*.facts.{kind}", cb=self._on_fact)
            for kind in ("incident_resolved", "incident_failed")
        ]
        watcher = await self._start_watcher()
        self._read_back_from = start_seq
        began = time.monotonic()
        interrupted = False
        try:
            async with _unwrapped(BrokerUnavailable), asyncio.TaskGroup() as tasks:
                reader = (
                    None
                    if watcher is None
                    else tasks.create_task(self._read_watcher(watcher), name="nerve-simulate-watch")
                )
                generator = tasks.create_task(self._generate(), name="nerve-simulate-generate")
                reporter = tasks.create_task(self._report(nc, began), name="nerve-simulate-report")
                try:
                    if plan.duration_s is None:
                        await asyncio.get_running_loop().create_future()
                    else:
                        await asyncio.sleep(plan.duration_s)
                except asyncio.CancelledError:
                    interrupted = True
                    _uncancel()
                self._stop.set()
                await generator
                seconds = time.monotonic() - began
                await self._read_back_from_last(js)
                # Stopped by hand: a short drain, so that what is in flight is not counted lost.
                drain_s = min(self._plan.drain_s, INTERRUPTED_DRAIN_S) if interrupted else self._plan.drain_s
                interrupted = not await self._drain(drain_s, nc, js) or interrupted
                self._finished.set()
                await reporter
                await _end_watcher(watcher, reader)
        except asyncio.CancelledError:  # a second Ctrl-C while draining: the summary as it is
            interrupted = True
            _uncancel()
            seconds = time.monotonic() - began
        finally:  # also when NATS failed the run: no watcher process or consumer left behind
            await _end_watcher(watcher, None)
            with contextlib.suppress(Exception):
                for sub in [
                    sampled,
                    *commands,
                    *facts,
                    *([self._read_back] if self._read_back is not None else []),
                ]:
                    await sub.unsubscribe()
        return self._summary(seconds=seconds, connect_s=connect_s, interrupted=interrupted)

    async def _start_watcher(self) -> asyncio.subprocess.Process | None:
        """The command watcher (`nerve.runtime.fleet.watch`), subscribed; None (said in a line) if not."""
        request = {
            "mqtt": self._settings.mqtt.model_dump(mode="json"),
            "client_id": f"nerve-sim-{self._run}-watch",
            "filter": f"{self._prefix}/+/{Kind.COMMANDS}/+",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *WATCH_ARGV,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None  # noqa: S101 - piped above
        assert process.stdout is not None  # noqa: S101 - piped above
        process.stdin.write(json.dumps(request).encode() + b"\n")
        line = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(WATCH_READY_S):
                await process.stdin.drain()
                line = await process.stdout.readline()
        if line.strip() == READY.encode():
            return process
        await _stop_process(process)
        reason = b""
        if process.stderr is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    reason = await process.stderr.read()
        log.warning(
            "simulate: no command watcher (%s): commands are timed as the simulated devices handle them",
            reason.decode(errors="replace").strip() or "it did not subscribe in time",
        )
        return None

    async def _read_watcher(self, watcher: asyncio.subprocess.Process) -> None:
        assert watcher.stdout is not None  # noqa: S101 - piped in _start_watcher
        async for raw in watcher.stdout:
            arrived, _, spike = raw.decode(errors="replace").strip().partition(" ")
            with contextlib.suppress(ValueError):
                self._delivered.setdefault(spike, float(arrived))
            checkpoint()

    def _sampled_filters(self) -> list[str]:
        """The live sample's subject filters: every telemetry subject, or every k-th device's."""
        every = math.ceil(self._plan.devices * self._plan.rate / LIVE_SAMPLE_PER_S)
        if every <= 1:
            return [kind_filter(Kind.TELEMETRY, self._prefix)]
        root = subject_root(self._prefix)
        return [f"{root}.{device.name}.{Kind.TELEMETRY}.*" for device in self._devices[::every]]

    async def _read_stored(
        self,
        js: JetStreamContext,
        start_seq: int,
        filters: list[str],
        cb: Callable[[Msg], Awaitable[None]],
        kind: Kind = Kind.TELEMETRY,
    ) -> JetStreamContext.PushSubscription:
        """An ordered, headers-only consumer of `kind`'s stream from `start_seq` on `filters`.

        NATS too busy to answer (an overload): asked again for up to `CONSUMER_PATIENCE_S`, then
        `BrokerUnavailable`.
        """
        one = len(filters) == 1
        stream = STREAM_OF_KIND[kind]
        patience = time.monotonic() + CONSUMER_PATIENCE_S
        while True:
            try:
                return await js.subscribe(
                    filters[0],
                    stream=stream,
                    cb=cb,
                    ordered_consumer=True,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=start_seq,
                        headers_only=True,
                        filter_subjects=None if one else filters,
                    ),
                )
            except TimeoutError:  # nats-py's too
                if time.monotonic() > patience:
                    raise BrokerUnavailable(
                        self._settings.nats.url,
                        f"no consumer of {stream} made in {CONSUMER_PATIENCE_S:g}s (every request timed "
                        "out): what was stored cannot be counted",
                    ) from None
                log.warning("simulate: NATS is too busy to make a consumer of %s now; asking again", stream)
                await asyncio.sleep(1.0)

    async def _read_commands_stored(self, nc: NatsClient) -> list[JetStreamContext.PushSubscription]:
        """The consumer of the commands stored from now on (`_on_command_stored`); none without the stream."""
        js = nc.jetstream()
        stream = STREAM_OF_KIND[Kind.COMMANDS]
        try:
            start = (await js.stream_info(stream)).state.last_seq + 1
        except NotFoundError:
            log.warning("simulate: no stream %s: commands are timed without their stored time", stream)
            return []
        filters = [kind_filter(Kind.COMMANDS, self._prefix)]
        return [await self._read_stored(js, start, filters, self._on_command_stored, Kind.COMMANDS)]

    async def _read_back_from_last(self, js: JetStreamContext) -> None:
        """Read back what was stored, from the last stored reading seen on (from the start at first).

        A consumer already reading back is unsubscribed first, so that nothing is counted twice.
        """
        if self._read_back is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._read_back.unsubscribe()
            self._read_back = None
        start = max(self._read_back_from, self._read_back_seq + 1)
        self._read_back = await self._read_stored(
            js, start, [kind_filter(Kind.TELEMETRY, self._prefix)], self._on_stored
        )

    async def _drain(self, drain_s: float, nc: NatsClient, js: JetStreamContext) -> bool:
        """Wait up to `drain_s` for what was sent to be stored and answered; False if cancelled.

        Then, however long it takes, for the read-back to reach what is stored by now; when it stalls
        (`READ_BACK_STALL_S`) it reads on on a new consumer, up to `READ_BACK_RESTARTS` times.
        """
        deadline = time.monotonic() + drain_s
        try:
            while time.monotonic() < deadline:
                pending = any(link.in_flight or link.queue for link in self._links)
                closed = len(self._resolved) + len(self._failed) >= len(self._command_latencies)
                if not pending and not self._spikes and closed and self._stored_ours >= self._acked:
                    return True
                await asyncio.sleep(0.05)
            # Whatever is stored by now is read back, however long that takes, unless it stalls.
            end = await self._how_far(nc)
            self._read_back_at = max(self._read_back_at, time.monotonic())
            restarts = 0
            while end is not None and self._stored_ours < self._acked and self._read_back_seq < end:
                if time.monotonic() - self._read_back_at > READ_BACK_STALL_S:
                    if restarts == READ_BACK_RESTARTS:
                        break
                    restarts += 1
                    log.warning(
                        "simulate: reading back what was stored stalled at stream sequence %d of %d; "
                        "reading on from there on a new consumer (%d of %d)",
                        self._read_back_seq,
                        end,
                        restarts,
                        READ_BACK_RESTARTS,
                    )
                    await self._read_back_from_last(js)
                    self._read_back_at = time.monotonic()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            _uncancel()
            return False
        return True

    def _summary(self, *, seconds: float, connect_s: float, interrupted: bool) -> Summary:
        lost = unacknowledged = 0
        for device in self._devices:
            for state in device.state:  # stored, lost or unacknowledged: each reading is one of them
                if state & 2:
                    continue
                if state & 1:
                    lost += 1
                else:
                    unacknowledged += 1
        span = max(seconds, 1e-9)
        lags = self._lags
        uplink, central, downlink, delivered, stored_at, sent_down = [], [], [], [], [], []
        for spike, command_id, made, came in self._command_paths:
            reached = self._delivered.get(spike)
            if reached is not None:
                delivered.append(reached - self._spike_sent[spike])
            arrived = came if reached is None else reached  # at the watcher, else at the simulated device
            stored = self._spike_stored.get(spike)
            if stored is not None:
                uplink.append(stored - self._spike_sent[spike])
                central.append(made - stored)
                downlink.append(arrived - made)
            command_stored = self._command_stored.get(command_id)
            if command_stored is not None:
                stored_at.append(command_stored - made)
                sent_down.append(arrived - command_stored)
        return Summary(
            devices=self._plan.devices,
            connections=len(self._links),
            rate=self._plan.rate,
            spikes_per_s=self._plan.spikes,
            seconds=round(seconds, 2),
            connect_s=round(connect_s, 2),
            offered=self._offered,
            offered_per_s=round(self._offered / span, 1),
            stored=self._stored_ours,
            stored_per_s=round(self._stored_ours / span, 1),
            lost=lost,
            unacknowledged=unacknowledged,
            duplicates=self._duplicates,
            lag_p50_ms=_ms(percentile(lags, 0.5)),
            lag_p99_ms=_ms(percentile(lags, 0.99)),
            lag_max_ms=_ms(max(lags) if lags else None),
            spikes=self._spike_count,
            commands=len(self._command_latencies),
            spikes_without_command=len(self._spikes),
            command_p50_ms=_ms(percentile(self._command_latencies, 0.5)),
            command_p99_ms=_ms(percentile(self._command_latencies, 0.99)),
            duplicate_commands=self._duplicate_commands,
            incidents_resolved=len(self._resolved),
            incidents_failed=len(self._failed),
            connections_lost=self._connections_lost,
            skipped=self._skipped,
            behind=self._behind,
            interrupted=interrupted,
            delivered_p50_ms=_ms(percentile(delivered, 0.5)),
            delivered_p99_ms=_ms(percentile(delivered, 0.99)),
            spike_stored_p50_ms=_ms(percentile(uplink, 0.5)),
            spike_stored_p99_ms=_ms(percentile(uplink, 0.99)),
            central_p50_ms=_ms(percentile(central, 0.5)),
            central_p99_ms=_ms(percentile(central, 0.99)),
            downlink_p50_ms=_ms(percentile(downlink, 0.5)),
            downlink_p99_ms=_ms(percentile(downlink, 0.99)),
            command_stored_p50_ms=_ms(percentile(stored_at, 0.5)),
            command_stored_p99_ms=_ms(percentile(stored_at, 0.99)),
            sent_down_p50_ms=_ms(percentile(sent_down, 0.5)),
            sent_down_p99_ms=_ms(percentile(sent_down, 0.99)),
        )


async def _end_watcher(watcher: asyncio.subprocess.Process | None, reader: asyncio.Task[None] | None) -> None:
    """Stop the command watcher; what it printed is still read to its end (within `WATCH_READY_S`)."""
    if watcher is not None:
        await _stop_process(watcher)
    if reader is not None:
        await asyncio.wait([reader], timeout=WATCH_READY_S)
        reader.cancel()


async def _stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after a second."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(1.0):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (a socket each); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


@contextlib.asynccontextmanager
async def _unwrapped(kind: type[Exception]) -> AsyncIterator[None]:
    """Within it, a `kind` coming out of a task group comes out alone (one line from the CLI)."""
    try:
        yield
    except* kind as group:
        raise group.exceptions[0] from None
