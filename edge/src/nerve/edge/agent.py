"""The edge daemon: presence, readings and commands of one device over MQTT.

One persistent MQTT session (`nerve-edge-<device>`), kept up forever with jittered backoff:

- presence: `online` (retained) on `<prefix>/<device>/status` once connected, `offline` (retained)
  when stopped, and the same `offline` as the broker-published will if the device dies;
- readings: each sensor at its interval (see `nerve.edge.sampling`: deadband and heartbeat), one
  Event per reading worth publishing on `<prefix>/<device>/telemetry/<metric>`;
- commands: each message on `<prefix>/<device>/commands/+` goes through the `Executor` (in a worker
  thread: it fsyncs and runs the action) and its result is sent on `<prefix>/<device>/results/<action>`.

Nothing is published straight away: readings, events and results are written to the `Outbox`
first, and a publisher task sends what it holds, in order, while connected, deleting each entry on
its PUBACK. Sensors keep reading while the broker is away; what they read goes out when it is back.

A command message is acknowledged to mosquitto only after its result is in the outbox. A device that
dies before that gets the command again from its persistent session, and the journal answers it with
the recorded result (or "unknown" if it was still running): delivered at least once, run at most once.
MQTT goes through `nerve.runtime.wire.mqtt` (a lean asyncio client), and messages are the one envelope
model (`nerve.runtime.envelope`, msgspec Structs, encoded as msgpack): this module imports neither
nats-py (an edge-only install has none), nor paho/aiomqtt, nor pydantic, which keeps the edge process
small (see `nerve.edge.main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Final

from nerve.edge.outbox import Outbox, OutboxKind, outbox_path
from nerve.edge.sampling import Sampler, build_sensors
from nerve.runtime.backoff import Backoff
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.envelope.codec import to_msgpack
from nerve.runtime.envelope.model import Event, utcnow
from nerve.runtime.errors import ConfigError, shown_url
from nerve.runtime.subjects import Address, Kind, is_token, status_topic
from nerve.runtime.wire.mqtt import Incoming, MqttWire, MqttWireError, Will, open_mqtt

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from nerve.edge.executor import Executor
    from nerve.edge.sampling import ScheduledSensor
    from nerve.edge.sensors import Reading
    from nerve.edge.settings import SettingsView
    from nerve.runtime.envelope.model import CommandResult

__all__ = ["OFFLINE", "ONLINE", "EdgeAgent", "default_device_id"]

_log: Final = logging.getLogger(__name__)

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"

_GOODBYE_TIMEOUT_S: Final = 2.0
# How long a stop waits for a command already running in its thread, so its result still goes out.
_DRAIN_TIMEOUT_S: Final = 10.0
# A connection that held this long was a working one: the next outage starts from short delays.
_HELD_S: Final = 10.0
# Entries taken from the outbox per query while publishing.
_BATCH: Final = 64
# A QoS1 publish that gets no PUBACK this long means a broken connection (keep-alive finds it too).
_PUBACK_TIMEOUT_S: Final = 30.0
# How many unacknowledged commands mosquitto may send at once: they run one at a time anyway.
_RECEIVE_MAXIMUM: Final = 16
DROPPED_EVENT: Final = "outbox_dropped"


def default_device_id() -> str:
    """This host's name up to the first dot, as a device id.

    Raises:
        ConfigError: that label is not a valid device id (1-64 of A-Z a-z 0-9 _ -); the message
            says to pass --device.
    """
    host = socket.gethostname()
    label = host.split(".", 1)[0]
    if is_token(label):
        return label
    raise ConfigError(
        f"the host name {host!r} is not a valid device id (1-64 of A-Z a-z 0-9 _ -): pass --device",
        key="edge.device",
    )


class EdgeAgent:
    """The daemon of one device: call `run()` and cancel it to stop.

    `ready` is set while connected and subscribed (cleared when the connection drops). `dropped`
    counts command messages that got no answer (see `Executor.handle` and `Executor.unanswered`).
    `clock` stamps the readings. `outbox` is where messages wait for the broker; without one, `run()`
    opens the configured one (`edge.outbox`) and closes it when it ends. `sensors` default to what
    `edge.sensors` asks for (built-ins and plugins, loaded here; see `nerve.edge.sampling.build_sensors`).
    """

    def __init__(
        self,
        *,
        settings: SettingsView,
        device: str,
        executor: Executor,
        clock: Callable[[], datetime] = utcnow,
        outbox: Outbox | None = None,
        sensors: list[ScheduledSensor] | None = None,
    ) -> None:
        if not is_token(device):
            raise ConfigError(
                f"{device!r} is not a valid device id (1-64 of A-Z a-z 0-9 _ -)", key="edge.device"
            )
        if executor.device != device:
            raise ConfigError(
                f"the executor is for device {executor.device!r}, not {device!r}", key="edge.device"
            )
        self._settings = settings
        self._device = device
        self._executor = executor
        self._clock = clock
        self._prefix = settings.prefix
        self._source = f"nerve://edge/{device}"
        self._status_topic = status_topic(device, self._prefix)
        self._commands = f"{self._prefix}/{device}/{Kind.COMMANDS}/+"
        self._telemetry_topics: dict[str, str] = {}
        self._sampler = Sampler(build_sensors(settings.edge) if sensors is None else sensors)
        self._outbox = outbox
        self._waiting = asyncio.Event()  # set when the outbox may hold something to publish
        self._dropped = 0
        self.ready = asyncio.Event()

    @property
    def device(self) -> str:
        """The device this agent speaks for."""
        return self._device

    @property
    def dropped(self) -> int:
        """How many command messages got no answer (why, by kind: `Executor.unanswered`)."""
        return self._dropped

    @property
    def outbox(self) -> Outbox | None:
        """The outbox in use (None before `run()` opened the configured one, and after it closed it)."""
        return self._outbox

    async def run(self) -> None:
        """Read the sensors; connect, serve and reconnect forever (backoff, warning logged) until cancelled.

        Sensors keep reading into the outbox while the broker is away. On cancellation it lets a
        command already running finish and answer (up to 10 s), publishes `offline` (retained, best
        effort, 2 s), disconnects and re-raises `CancelledError`; what the outbox holds stays there
        for the next run.
        """
        with contextlib.ExitStack() as stack:
            if self._outbox is None:
                opened = Outbox(
                    outbox_path(self._settings, self._device),
                    device=self._device,
                    max_bytes=self._settings.edge.outbox.max_bytes,
                )
                self._outbox = stack.enter_context(opened)
                stack.callback(setattr, self, "_outbox", None)
            self._waiting.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._sensor_loop(), name=f"nerve-edge-{self._device}-sensors")
                tasks.create_task(self._connection_loop(), name=f"nerve-edge-{self._device}-connection")
                # Park in the body, not in the TaskGroup's exit (see `_serve`).
                await asyncio.get_running_loop().create_future()

    async def _connection_loop(self) -> None:
        backoff = Backoff()
        while True:
            began = time.monotonic()
            problem: BaseException | None = None
            try:
                await self._session()
            except* MqttWireError as group:
                problem = group.exceptions[0]
            # A stop that came while the connection failed must not turn into a reconnect.
            checkpoint()
            if time.monotonic() - began >= _HELD_S:
                backoff.reset()
            delay = backoff.next_delay()
            _log.warning(
                "MQTT connection to %s failed: %s; reconnecting in %.1f s",
                shown_url(self._settings.mqtt.url),
                problem,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()  # bounded by the Receive Maximum

        def receive(batch: list[Incoming]) -> None:
            for message in batch:
                inbox.put_nowait(message)

        wire = await open_mqtt(
            self._settings.mqtt,
            client_id=self._settings.edge.client_id or f"nerve-edge-{self._device}",
            on_messages=receive,
            clean_start=False,
            session_expiry_s=self._settings.mqtt.session_expiry_s,
            receive_maximum=_RECEIVE_MAXIMUM,
            will=Will(topic=self._status_topic, payload=OFFLINE, qos=1, retain=True),
        )
        try:
            try:
                await self._serve(wire, inbox)
            except asyncio.CancelledError:
                await self._say_offline(wire)
                raise
        finally:
            wire.close()
            self.ready.clear()

    async def _serve(self, wire: MqttWire, inbox: asyncio.Queue[Incoming]) -> None:
        await wire.subscribe([self._commands])
        await self._publish(wire, self._status_topic, ONLINE, retain=True)
        checkpoint()
        self.ready.set()
        _log.info("device %s online at %s", self._device, shown_url(self._settings.mqtt.url))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._publish_loop(wire), name=f"nerve-edge-{self._device}-publisher")
            tasks.create_task(self._command_loop(wire, inbox), name=f"nerve-edge-{self._device}-commands")
            # The connection's end (its reason as MqttWireError) ends the session.
            tasks.create_task(_closed(wire), name=f"nerve-edge-{self._device}-connection-watch")
            # Wait in the body, not in the TaskGroup's exit: on Python 3.11 a child that fails while
            # the parent waits in __aexit__ leaves the parent's cancel count raised for good (fixed in
            # 3.12), and every later `cancelling()` check, ours or the caller's, would then see a stop
            # that was never asked for. The loops never return: this ends by an error or a stop.
            await asyncio.get_running_loop().create_future()

    async def _publish(self, wire: MqttWire, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            async with asyncio.timeout(_PUBACK_TIMEOUT_S):
                await wire.publish(topic, payload, qos=1, retain=retain)
        except TimeoutError:
            raise MqttWireError(f"no PUBACK for {topic} within {_PUBACK_TIMEOUT_S:g} s") from None

    async def _say_offline(self, wire: MqttWire) -> None:
        try:
            async with asyncio.timeout(_GOODBYE_TIMEOUT_S):
                await wire.publish(self._status_topic, OFFLINE, qos=1, retain=True)
        except (TimeoutError, MqttWireError) as exc:
            _log.warning("device %s: could not publish its offline status: %r", self._device, exc)
        else:
            _log.info("device %s offline", self._device)

    async def _sensor_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Built-in reads are cheap and non-blocking (see nerve.edge.sensors): no thread needed.
            for _, reading in self._sampler.poll(loop.time()):
                self._write_reading(reading)
            checkpoint()
            due = self._sampler.next_due()
            if due is None:
                _log.warning("device %s: no sensor is enabled; it publishes no readings", self._device)
                await loop.create_future()
                continue  # never reached: the future is only ever cancelled
            await asyncio.sleep(max(0.0, due - loop.time()))

    def _write_reading(self, reading: Reading) -> None:
        topic = self._telemetry_topics.get(reading.metric)
        if topic is None:
            topic = Address(self._device, Kind.TELEMETRY, reading.metric).topic(self._prefix)
            self._telemetry_topics[reading.metric] = topic
        when = self._clock()

        def encode(event_id: str) -> bytes:
            return to_msgpack(
                Event(
                    id=event_id,
                    source=self._source,
                    type=f"nerve.telemetry.{reading.metric}",
                    subject=self._device,
                    time=when,
                    # Labels first: a label can never shadow the value or its unit.
                    data={**reading.labels, "value": reading.value, "unit": reading.unit},
                )
            )

        self._write(OutboxKind.TELEMETRY, topic, encode)
        _log.debug("queued %s = %s %s", topic, reading.value, reading.unit)

    def _write(self, kind: OutboxKind, topic: str, encode: Callable[[str], bytes]) -> None:
        outbox = self._outbox
        if outbox is None:  # only outside run(): nothing would ever send it
            raise RuntimeError("the edge agent writes messages only while it runs")
        _, dropped = outbox.add(kind, topic, encode)
        self._waiting.set()
        if dropped:
            # Events are never dropped: this report reaches central even if more readings go.
            topic = Address(self._device, Kind.EVENTS, DROPPED_EVENT).topic(self._prefix)
            cap = self._settings.edge.outbox.max_bytes
            data = {"dropped": dropped, "total": outbox.dropped, "max_bytes": cap}
            self._write(
                OutboxKind.EVENTS,
                topic,
                lambda event_id: to_msgpack(
                    Event(
                        id=event_id,
                        source=self._source,
                        type=f"nerve.events.{DROPPED_EVENT}",
                        subject=self._device,
                        time=self._clock(),
                        data=data,
                    )
                ),
            )

    async def _publish_loop(self, wire: MqttWire) -> None:
        outbox = self._outbox
        assert outbox is not None  # noqa: S101 - run() opened it before connecting
        while True:
            batch = outbox.peek(_BATCH)
            if not batch:
                self._waiting.clear()
                await self._waiting.wait()
                checkpoint()
                continue
            for entry in batch:
                # One at a time, each waiting for its PUBACK: the order on the wire is the order
                # of the outbox, and an entry is deleted only once the broker has it.
                await self._publish(wire, entry.topic, entry.payload)
                outbox.ack(entry)
                checkpoint()
            _log.debug("published %d message(s) from the outbox", len(batch))

    async def _command_loop(self, wire: MqttWire, inbox: asyncio.Queue[Incoming]) -> None:
        while True:
            message = await inbox.get()
            await self._answer(wire, message)
            checkpoint()

    async def _answer(self, wire: MqttWire, message: Incoming) -> None:
        topic = message.topic
        work = asyncio.ensure_future(asyncio.to_thread(self._handle, topic, message.payload))
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            # Stopping while a command runs in its thread: it cannot be interrupted, so let it finish
            # and answer before going (a stop never leaves a command that ran without its result).
            try:
                async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                    await self._reply(wire, message, topic, await work)
            except (TimeoutError, MqttWireError) as exc:
                _log.warning("stopping without answering the command on %s: %r", topic, exc)
            raise
        await self._reply(wire, message, topic, result)

    def _handle(self, topic: str, payload: bytes) -> CommandResult | None:
        try:
            return self._executor.handle(topic, payload, prefix=self._prefix)
        except Exception:  # noqa: BLE001 - logged with its traceback; see below
            # Executor.handle never raises by contract; a bug must not stop the daemon, nor come back
            # forever as a redelivered message.
            _log.exception("message on %s could not be handled", topic)
            return None

    async def _reply(
        self, wire: MqttWire, message: Incoming, topic: str, result: CommandResult | None
    ) -> None:
        if result is None:
            self._dropped += 1
        else:
            action = topic.rsplit("/", 1)[-1]
            if not is_token(action):
                action = result.action
            results = Address(self._device, Kind.RESULTS, action).topic(self._prefix)
            encoded = to_msgpack(result)
            # A result keeps the id its journal recorded: a repeated command gets the same message.
            self._write(OutboxKind.RESULTS, results, lambda _event_id: encoded)
            _log.debug("queued %s: %s", results, result.status)
        # Only now: a device that dies before this gets the command again, and the journal answers it.
        if message.packet_id:
            wire.puback([message.packet_id])


async def _closed(wire: MqttWire) -> None:
    """Wait for the connection to end; raise its reason (`MqttWireError`)."""
    # Shielded: cancelling this watcher (a stop) must not cancel the connection's own future.
    await asyncio.shield(wire.closed)
