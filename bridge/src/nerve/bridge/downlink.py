"""The downlink: commands from NERVE_COMMANDS to mosquitto, on MQTT connections of its own, pipelined.

Why its own connections: mosquitto sends a PUBACK on the connection the PUBLISH came in on. On the
uplink's, it queued behind every reading mosquitto had for the bridge (and the bridge stops reading that
socket at `bridge.max_in_flight` unacknowledged readings): at 7,500 devices a command waited ~3 s for its
PUBACK, one command at a time, and commands outlived their ack wait. Here (client ids `<client_id>-down`,
`<that>-1`, ...; clean sessions, no subscription: nothing comes in but PUBACKs) a command waits for
nothing the uplink does. Why several (`bridge.downlink_connections`, 4): mosquitto reads one packet per
connection per pass over its sockets, and a pass takes tens of milliseconds under load (`_Lanes`).

What holds:
- a command is acknowledged to JetStream only after mosquitto acknowledged its QoS1 publish (PUBACK);
- a device's commands always go on the same connection (`lane_of`), in the order JetStream delivered
  them; each connection has up to min(`bridge.downlink_in_flight`, the broker's Receive Maximum from
  CONNACK) on their way at once (`window`: all connections' together);
- a command held here (waiting for a slot, or for its PUBACK) is kept from its ack wait: `in_progress`
  (+WPI) every third of the consumer's ack wait, so load never makes JetStream deliver it again;
- an expired command is not sent (checked just before sending): a CommandResult `expired` says so, or
  `unknown` if JetStream delivered it before (an earlier attempt may have reached mosquitto, so the
  bridge cannot say it was never sent; central believes an unsigned `expired`, never an `unknown`);
- a command that cannot be read is dead-lettered with the reason, and terminated;
- when a connection fails (all are made again) or the bridge stops, what was not acknowledged is handed
  back (`nak`):
  JetStream delivers it again at once, here or to another bridge of the group, and a device's journal
  drops a command it has run already.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from nerve.bridge.natsclient import connect_nats
from nerve.runtime.backoff import Backoff
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, derived_id, utcnow
from nerve.runtime.errors import DecodeError, TopicError, shown_url
from nerve.runtime.jetstream.client import publish_dead_letter, publish_envelope, shared_durable
from nerve.runtime.jetstream.streams import STREAM_OF_KIND
from nerve.runtime.subjects import Address, Kind, kind_filter, parse_subject
from nerve.runtime.trust.expiry import COMMAND_SEQ_HEADER
from nerve.runtime.wire.mqtt import MqttWire, MqttWireError, SessionTakenOver, open_mqtt

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.bridge.stats import BridgeStats
    from nerve.runtime.config.settings import MqttSettings, Settings
    from nerve.runtime.envelope.model import ResultStatus
    from nerve.runtime.wire.mqtt import Incoming

__all__ = ["Downlink", "downlink_mqtt"]

log = logging.getLogger(__name__)

SOURCE: Final = "nerve://bridge"
PART: Final = "bridge"
#: How many commands JetStream hands the downlink before it has acknowledged any (per consumer: the
#: bridges of a group share it). Those beyond the window wait here, kept alive with +WPI.
DOWNLINK_MAX_ACK_PENDING: Final = 256
#: The ack wait of a consumer the bridge creates; one that exists keeps its own (read at each bind).
DOWNLINK_ACK_WAIT_S: Final = 30.0
#: No PUBACK for this long: the connection is stuck, and is made again.
MQTT_PUBLISH_TIMEOUT_S: Final = 10.0
# The downlink subscribes to nothing; the smallest Receive Maximum MQTT allows.
RECEIVE_MAXIMUM: Final = 1
#: At a stop, how long commands already sent may take to get their PUBACK (then they are handed back).
DRAIN_TIMEOUT_S: Final = 5.0


def downlink_mqtt(settings: Settings, lane: int = 0) -> MqttSettings:
    """The MQTT settings of the downlink's connection `lane`: the bridge's, or the lane's own login.

    The lane's login, if `bridge.downlink_username` is set: that name, `<it>-1`, ...
    (`BridgeSettings.downlink_usernames`), with `bridge.downlink_password_file`.
    """
    bridge = settings.bridge
    usernames = bridge.downlink_usernames
    if usernames is None:
        return settings.mqtt
    return settings.mqtt.model_copy(
        update={"username": usernames[lane], "password_file": bridge.downlink_password_file}
    )


@dataclass(slots=True, eq=False)
class _Held:
    """A command JetStream delivered and the downlink has not settled yet, and when it last said so."""

    msg: Msg
    since: float


class Downlink:
    """Sends stored commands down until cancelled; reconnects forever, waits NATS trouble out.

    `ready` is set while it has its MQTT connection and its consumer; `on_ready` is called at each change.
    `max_in_flight` is the most commands ever seen waiting for their PUBACK at once (for tests and benches).
    """

    def __init__(self, *, settings: Settings, stats: BridgeStats, on_ready: Callable[[], None]) -> None:
        self._settings = settings
        self._prefix = settings.prefix
        self._stats = stats
        self._on_ready = on_ready
        self._lanes = [
            (downlink_mqtt(settings, lane), client_id)
            for lane, client_id in enumerate(settings.bridge.downlink_client_ids)
        ]
        self._js: JetStreamContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = threading.Event()
        self._draining = asyncio.Event()
        self._piping = False
        self.ready = threading.Event()
        self.window = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def run_in_thread(self) -> None:
        """`run` with a NATS connection of its own, in the loop of the calling thread, until `stop`."""
        self._draining = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        if self._stopping.is_set():
            return
        nc = await connect_nats(self._settings.nats, name="nerve-bridge-downlink")
        try:
            self._js = nc.jetstream()
            await self.run()
        finally:
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()

    def stop(self, *, drain: bool = True) -> None:
        """End `run_in_thread`, from any thread; drained unless `drain=False`.

        Drained: take nothing new, let what is in flight get its PUBACK and be acknowledged (for up to
        `DRAIN_TIMEOUT_S`), hand back the rest. At once: everything held is handed back.
        """
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed already
                loop.call_soon_threadsafe(self._stop_now if not drain else self._stop_drained)

    def _stop_drained(self) -> None:
        if self._piping:
            self._draining.set()  # the pipeline drains, then the session ends, and `run` with it
        else:
            self._stop_now()

    def _stop_now(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def prefix(self) -> str:
        """The topic and subject prefix (`prefix`)."""
        return self._prefix

    @property
    def in_flight_per_connection(self) -> int:
        """`bridge.downlink_in_flight`: commands one connection has on their way at most."""
        return self._settings.bridge.downlink_in_flight

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the downlink's own connection."""
        if self._js is None:
            raise RuntimeError("the downlink has no NATS connection yet (run_in_thread)")
        return self._js

    async def run(self) -> None:
        """Run sessions until cancelled; a failed one is logged and made again with jittered backoff."""
        backoff = Backoff()
        while True:
            try:
                await self._session(backoff)
            except* (MqttWireError, NatsError) as group:
                failure: BaseException = group.exceptions[0]
            else:
                return  # drained: stopped
            finally:
                self._set_ready(ready=False)
            checkpoint()
            self._stats.downlink_reconnects += 1
            delay = backoff.next_delay()
            log.warning("bridge: downlink: %s%s; reconnecting in %.1fs", failure, self._hint(failure), delay)
            await asyncio.sleep(delay)

    def _hint(self, failure: BaseException) -> str:
        """What a session taken over means when the downlink shares the uplink's login."""
        bridge = self._settings.bridge
        shared = bridge.downlink_username is None and self._settings.mqtt.username is not None
        taken = isinstance(failure, SessionTakenOver) or "without a reason" in str(failure)
        if not taken:
            return ""
        if shared:
            return (
                " (the downlink logs in as the uplink does: a broker that makes the login the client id, "
                "as the site broker does, gives both one session; set bridge.downlink_username and "
                "bridge.downlink_password_file, which `nerve devices site` makes)"
            )
        # Two processes running a downlink with the same settings take each other's sessions over.
        twin = (
            "another bridge process runs a downlink with these client ids (of two processes that split "
            "a bridge, one has bridge.part: uplink, the other bridge.part: downlink)"
        )
        if bridge.downlink_connections > 1:
            logins = f" ({', '.join(bridge.downlink_usernames)})" if bridge.downlink_usernames else ""
            return (
                f" (each of the downlink's {bridge.downlink_connections} connections needs a session of its "
                f"own: on a broker that makes the login the client id, each needs its own login{logins}, "
                f"which `nerve devices site` makes, or set bridge.downlink_connections: 1; or {twin})"
            )
        return f" ({twin})"

    def _set_ready(self, *, ready: bool) -> None:
        if ready != self.ready.is_set():
            if ready:
                self.ready.set()
            else:
                self.ready.clear()
            self._on_ready()

    async def _session(self, backoff: Backoff) -> None:
        """The MQTT connections (`bridge.downlink_connections`), and the consumer bound while they hold."""
        wires: list[MqttWire] = []
        try:
            for mqtt, client_id in self._lanes:
                wires.append(
                    await open_mqtt(
                        mqtt,
                        client_id=client_id,
                        on_messages=_unexpected,
                        clean_start=True,
                        session_expiry_s=0,
                        receive_maximum=RECEIVE_MAXIMUM,
                    )
                )
            subscription, ack_wait_s = await self._bind(wires)
            in_flight = self._settings.bridge.downlink_in_flight
            self.window = sum(min(in_flight, wire.receive_maximum) for wire in wires)
            log.info(
                "bridge: downlink connected to %s as %s, up to %d commands in flight",
                shown_url(self._settings.mqtt.url),
                ", ".join(client_id for _, client_id in self._lanes),
                self.window,
            )
            backoff.reset()
            self._set_ready(ready=True)
            try:
                await self._pipeline(wires, subscription, ack_wait_s)
            finally:
                with contextlib.suppress(NatsError, TimeoutError):
                    await subscription.unsubscribe()
        finally:
            for wire in wires:
                wire.close()
            for wire in wires:
                await wire.wait_closed()  # its loop may end next: over TLS, the socket closes a moment later

    async def _bind(self, wires: list[MqttWire]) -> tuple[JetStreamContext.PushSubscription, float]:
        """Bind the shared durable consumer (NATS trouble is retried); its ack wait too."""
        backoff = Backoff()
        stream = STREAM_OF_KIND[Kind.COMMANDS]
        name = self._settings.bridge.downlink_durable
        while True:
            for wire in wires:
                if wire.closed.done():
                    wire.closed.result()  # raises: the MQTT side went meanwhile
            try:
                subscription = await shared_durable(
                    self.js,
                    subject=kind_filter(Kind.COMMANDS, self._prefix),
                    stream=stream,
                    name=name,
                    ack_wait_s=DOWNLINK_ACK_WAIT_S,
                    max_ack_pending=DOWNLINK_MAX_ACK_PENDING,
                )
                info = await self.js.consumer_info(stream, name)
            except (NatsError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("bridge: downlink: cannot bind its consumer (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            return subscription, info.config.ack_wait or DOWNLINK_ACK_WAIT_S

    async def _pipeline(
        self, wires: list[MqttWire], subscription: JetStreamContext.PushSubscription, ack_wait_s: float
    ) -> None:
        """Take commands as JetStream delivers them; keep up to `window` on their way to mosquitto.

        Returns once drained (`stop`); raises why the session failed otherwise.
        """
        pipeline: _Lanes | None = None
        self._piping = True
        try:
            async with asyncio.TaskGroup() as tasks:
                pipeline = _Lanes(self, wires, tasks)
                tasks.create_task(self._progress(pipeline, ack_wait_s), name="downlink-progress")
                tasks.create_task(self._watch(wires), name="downlink-watch")
                taking = tasks.create_task(self._take(subscription, pipeline), name="downlink-take")
                await self._draining.wait()
                taking.cancel()
                with contextlib.suppress(NatsError, TimeoutError):
                    await subscription.unsubscribe()  # nothing new: the group's other bridges take it
                await pipeline.hand_back_waiting()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_TIMEOUT_S):
                        await pipeline.settled()
                raise _Drained  # noqa: TRY301 - how a drained pipeline ends its TaskGroup
        except* _Drained:
            pass
        finally:
            self._piping = False
            # Not acknowledged (the connection failed, or the bridge stops): JetStream's again, at once.
            for held in pipeline.unsettled() if pipeline is not None else []:
                with contextlib.suppress(NatsError, TimeoutError):
                    await held.msg.nak()
            self.in_flight = 0

    async def _take(self, subscription: JetStreamContext.PushSubscription, pipeline: _Lanes) -> None:
        # Taken out of nats-py's queue at once: a command waiting here is one `_progress` sees.
        async for msg in subscription.messages:
            pipeline.take(msg)
            checkpoint()
        raise NatsError("the commands subscription ended")

    async def _progress(self, pipeline: _Lanes, ack_wait_s: float) -> None:
        """+WPI for every command held a third of the ack wait: load never makes it pass."""
        every = ack_wait_s / 3
        while True:
            await asyncio.sleep(every / 2)
            now = time.monotonic()
            for held in pipeline.unsettled():
                if now - held.since >= every:
                    held.since = now
                    with contextlib.suppress(NatsError, TimeoutError):
                        await held.msg.in_progress()
            checkpoint()

    async def _watch(self, wires: list[MqttWire]) -> None:
        """Raise the reason as soon as a connection ends, even with nothing in flight."""
        done, _ = await asyncio.wait([wire.closed for wire in wires], return_when=asyncio.FIRST_COMPLETED)
        done.pop().result()

    def read_command(self, msg: Msg) -> tuple[Command, str] | str:
        """The command in `msg` and its topic, or why it cannot be sent (a reason to dead-letter it)."""
        try:
            address = parse_subject(msg.subject, self._prefix)
            command = decode(msg.data, Command, max_size=self._settings.bridge.max_payload)
        except (TopicError, DecodeError) as exc:
            return str(exc)
        if command.subject != address.device or command.action != address.name:
            return f"command for {command.subject}/{command.action} stored under {msg.subject}"
        return command, address.topic(self._prefix)

    async def settle(self, held: _Held, puback: asyncio.Future[None]) -> None:
        """Wait for the PUBACK, then acknowledge to JetStream; a missing PUBACK ends the session."""
        try:
            async with asyncio.timeout(MQTT_PUBLISH_TIMEOUT_S):
                await puback
        except TimeoutError:
            raise MqttWireError(f"no PUBACK within {MQTT_PUBLISH_TIMEOUT_S:g}s") from None
        finally:
            self.in_flight -= 1
        # mosquitto has it (PUBACK): only now may JetStream forget it.
        try:
            await held.msg.ack()
        except (NatsError, TimeoutError) as exc:
            log.warning("bridge: downlink: %s; the command will come again", exc or type(exc).__name__)
        else:
            self._stats.commands_sent += 1

    async def refuse(self, held: _Held, outcome: Command | str) -> None:
        """Dead-letter a command that cannot be read (and terminate it), or answer an expired one."""
        msg = held.msg
        try:
            if isinstance(outcome, str):
                await self._dead_letter(reason=outcome, origin=msg.subject, payload=msg.data)
                await msg.term()
            else:
                await self._expire(outcome, msg.metadata.sequence.stream, msg.metadata.num_delivered or 1)
                await msg.ack()
        except (NatsError, TimeoutError) as exc:
            log.warning("bridge: downlink: %s; the command will come again", exc or type(exc).__name__)

    async def _dead_letter(self, *, reason: str, origin: str, payload: bytes) -> None:
        backoff = Backoff(maximum=2.0)
        while True:
            try:
                await publish_dead_letter(
                    self.js, prefix=self._prefix, part=PART, reason=reason, origin=origin, payload=payload
                )
            except (NatsError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("bridge: dead-lettering failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            else:
                self._stats.commands_deadlettered += 1
                log.warning("bridge: dead-lettered a message from %s: %s", origin, reason)
                return

    async def _expire(self, command: Command, seq: int, delivered: int) -> None:
        status: ResultStatus = "expired"
        reason = f"expired at {command.expires.isoformat()} before the bridge could send it"
        if delivered > 1:
            # Handed back before (a connection lost, a bridge stopped): it may have been written to
            # mosquitto then, and run. Central believes the bridge's `expired` (it cannot hide a run after
            # the command expired), so it is said only when the bridge knows it never sent the command.
            status = "unknown"
            reason += f" again (delivery {delivered}: an earlier attempt may have reached the device)"
        result = CommandResult.for_command(
            command,
            source=SOURCE,
            status=status,
            reason=reason,
            result_id=derived_id(command.id, "expired"),
        )
        result_subject = Address(command.subject, Kind.RESULTS, command.action).subject(self._prefix)
        # The result is the record; central's command audit keeps the fact (signed and chained by central,
        # as every fact: the bridge holds no key, so a fact of its own would not verify). Unsigned, it is
        # believed only once the command expired (nerve.runtime.trust.expiry); the header says where the
        # command is, for central's runner, which did not send it itself.
        await publish_envelope(
            self.js,
            result_subject,
            result,
            codec=self._settings.nats.codec,
            headers={COMMAND_SEQ_HEADER: str(seq)},
        )
        self._stats.commands_expired += 1
        log.warning("bridge: command %s to %s %s", command.id, command.subject, reason)


class _Lanes:
    """One session's pipelines, one per MQTT connection; a device's commands always take the same one.

    Why several: mosquitto 2.0 reads one packet from each ready connection per pass over its sockets.
    Under load a pass takes tens of milliseconds, so commands queued on one connection went in one per
    pass: measured with 12,000 devices overloading a 2-core box (`bench/fleet.py --devices 12000 --rate
    3 --simulators 2`), a burst of commands came out of mosquitto 20-70 ms apart, the 8th ~240 ms after
    it was written. Per device the order stays JetStream's (one connection, in order).
    """

    def __init__(self, downlink: Downlink, wires: list[MqttWire], tasks: asyncio.TaskGroup) -> None:
        self._prefix = downlink.prefix
        self._lanes = [_Pipeline(downlink, wire, tasks) for wire in wires]

    def take(self, msg: Msg) -> None:
        """A command from JetStream, to the pipeline of its device (`lane_of`)."""
        self._lanes[lane_of(msg.subject, self._prefix, len(self._lanes))].take(msg)

    def unsettled(self) -> list[_Held]:
        """Every command taken and not yet acknowledged, terminated or handed back."""
        return [held for lane in self._lanes for held in lane.unsettled()]

    async def hand_back_waiting(self) -> None:
        """Give the commands not yet sent back to JetStream (`nak`): delivered again at once."""
        for lane in self._lanes:
            await lane.hand_back_waiting()

    async def settled(self) -> None:
        """Until every command sent is settled (acknowledged after its PUBACK, or given up)."""
        for lane in self._lanes:
            await lane.settled()


def lane_of(subject: str, prefix: str, lanes: int) -> int:
    """The connection a command on `subject` goes on: by its device (CRC-32), so in order per device.

    A subject that names no device (it will be dead-lettered) takes the first.
    """
    if lanes == 1:
        return 0
    try:
        device = parse_subject(subject, prefix).device
    except TopicError:
        return 0
    return zlib.crc32(device.encode()) % lanes


class _Pipeline:
    """One connection's commands: those waiting for a slot, and those on their way (up to `window`).

    A command is written to mosquitto from the very step that takes it from JetStream (or frees its
    slot), not a loop iteration later: on a bridge busy with the uplink, each iteration can cost a batch
    of readings' worth of CPU. Commands are started in the order JetStream delivered them.
    """

    def __init__(self, downlink: Downlink, wire: MqttWire, tasks: asyncio.TaskGroup) -> None:
        self._downlink = downlink
        self._wire = wire
        self._tasks = tasks
        self._window = min(downlink.in_flight_per_connection, wire.receive_maximum)
        self._waiting: collections.deque[_Held] = collections.deque()
        self._active: set[_Held] = set()
        self._idle = asyncio.Event()

    def unsettled(self) -> list[_Held]:
        """Every command taken and not yet acknowledged, terminated or handed back."""
        return [*self._active, *self._waiting]

    async def hand_back_waiting(self) -> None:
        """Give the commands not yet sent back to JetStream (`nak`): delivered again at once."""
        while self._waiting:
            held = self._waiting.popleft()
            with contextlib.suppress(NatsError, TimeoutError):
                await held.msg.nak()

    async def settled(self) -> None:
        """Until every command sent is settled (acknowledged after its PUBACK, or given up)."""
        while self._active:
            self._idle.clear()
            await self._idle.wait()

    def take(self, msg: Msg) -> None:
        """A command from JetStream: started now if a slot is free, else queued behind the others."""
        held = _Held(msg, time.monotonic())
        if self._waiting or len(self._active) >= self._window:
            self._waiting.append(held)
        else:
            self._start(held)

    def _start(self, held: _Held) -> None:
        downlink = self._downlink
        self._active.add(held)
        outcome = downlink.read_command(held.msg)
        if isinstance(outcome, str) or outcome[0].expires <= utcnow():
            refused = outcome if isinstance(outcome, str) else outcome[0]
            self._tasks.create_task(
                self._finish(held, functools.partial(downlink.refuse, held, refused)), name="downlink-refuse"
            )
            return
        command, topic = outcome
        puback = self._wire.publish_nowait(topic, held.msg.data)  # raises MqttWireError: the session ends
        downlink.in_flight += 1
        downlink.max_in_flight = max(downlink.max_in_flight, downlink.in_flight)
        log.debug("bridge: sent command %s to %s", command.id, topic)
        settle = functools.partial(downlink.settle, held, puback)
        self._tasks.create_task(self._finish(held, settle), name="downlink-settle")

    async def _finish(self, held: _Held, settle: Callable[[], Awaitable[None]]) -> None:
        """Settle one command, then give its slot to the next one waiting (an MQTT failure ends all)."""
        await settle()
        self._active.discard(held)
        while self._waiting and len(self._active) < self._window:
            self._start(self._waiting.popleft())
        if not self._active:
            self._idle.set()


class _Drained(Exception):  # not an error: how a drained pipeline ends its TaskGroup
    """The pipeline drained for `stop`."""


def _unexpected(batch: list[Incoming]) -> None:
    # Nothing is subscribed on this connection (a clean session): a broker that sends anything anyway
    # is ignored, not obeyed.
    log.debug("bridge: downlink: ignored %d messages the broker sent unasked", len(batch))
