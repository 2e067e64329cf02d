"""The bridge: MQTT ⇄ JetStream, uplink and downlink, on one persistent MQTT session.

Uplink: every message from devices is stored in JetStream (or dead-lettered with the reason) before
its PUBACK goes back to mosquitto, so a bridge killed at any moment loses nothing: mosquitto redelivers
what was not acknowledged, and JetStream's dedup (by event id) stores an envelope once.

Downlink: a durable JetStream consumer on NERVE_COMMANDS; a command is acknowledged to JetStream only
after mosquitto acknowledged the QoS1 publish. An expired command is not sent: a CommandResult
`expired` and a fact say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from nerve.bridge.metrics import MetricsServer
from nerve.bridge.natswire import NatsWire, NatsWireError, open_nats, shown
from nerve.bridge.pump import Pump
from nerve.bridge.stats import BridgeStats
from nerve.bridge.uplink import uplink_filters
from nerve.runtime.backoff import Backoff
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, derived_id, utcnow
from nerve.runtime.errors import ConfigError, DecodeError, TopicError, shown_url
from nerve.runtime.jetstream.client import (
    connect_forever,
    publish_dead_letter,
    publish_envelope,
    shared_durable,
)
from nerve.runtime.jetstream.identities import load_nkey
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, ready_streams
from nerve.runtime.subjects import Address, Kind, kind_filter, parse_subject
from nerve.runtime.wire.mqtt import MqttWire, MqttWireError, open_mqtt

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings

log = logging.getLogger(__name__)

SOURCE: Final = "nerve://bridge"
PART: Final = "bridge"
STORE_TIMEOUT_S: Final = 5.0
WATCH_INTERVAL_S: Final = 1.0
DRAIN_TIMEOUT_S: Final = 5.0
SUBSCRIBE_TIMEOUT_S: Final = 30.0
MQTT_PUBLISH_TIMEOUT_S: Final = 10.0
# How many commands may be on their way to mosquitto at once; the rest wait in JetStream.
DOWNLINK_MAX_ACK_PENDING: Final = 256
DOWNLINK_ACK_WAIT_S: Final = 30.0


class Bridge:
    """Runs uplink and downlink until cancelled; reconnects to either broker forever."""

    def __init__(self, *, settings: Settings) -> None:
        self._settings = settings
        self._prefix = settings.prefix
        self._metrics = frozenset(settings.bridge.metrics)
        self.stats = BridgeStats()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Bridge until cancelled. Cancelling loses nothing: unacknowledged messages are redelivered."""
        metrics = None
        if self._settings.bridge.metrics_port is not None:
            metrics = MetricsServer(
                self.stats,
                address=self._settings.bridge.metrics_address,
                port=self._settings.bridge.metrics_port,
            )
            log.info(
                "bridge: metrics on http://%s:%d/metrics", self._settings.bridge.metrics_address, metrics.port
            )
        try:
            await self._bridge()
        finally:
            if metrics is not None:
                metrics.close()

    async def _bridge(self) -> None:
        nc = await self._connect_nats()
        try:
            js = nc.jetstream()
            await ready_streams(js, self._prefix, configure=self._settings.nats.nkey_file is None)
            await self._run_mqtt(js)
        finally:
            self.ready.clear()
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()

    async def _connect_nats(self) -> NatsClient:
        """nats-py's connection (streams, downlink), retried with backoff whatever the server sends.

        `connect_forever` waits out an absent server; but nats-py lets a hostile INFO raise what it likes
        (`AttributeError` on `INFO []`, `RecursionError` on deep nesting), which would end the bridge.
        """
        backoff = Backoff()
        while True:
            try:
                return await connect_forever(self._settings.nats, name="nerve-bridge")
            except ConfigError:
                raise  # a bad seed file: one clear line, and no retry would mend it
            except Exception as exc:  # noqa: BLE001 - anything nats-py raises on a bad server is retried
                delay = backoff.next_delay()
                log.warning(
                    "bridge: cannot connect to %s: the server sent what nats-py cannot read (%s: %s); "
                    "retrying in %.1fs",
                    shown_url(self._settings.nats.url),
                    type(exc).__name__,
                    shown(str(exc).encode(), 120),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _run_mqtt(self, js: JetStreamContext) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._session(js, backoff)
            except* (MqttWireError, NatsWireError) as group:
                failure: BaseException = group.exceptions[0]
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            self.stats.reconnects += 1
            delay = backoff.next_delay()
            log.warning("bridge: %s; reconnecting in %.1fs", failure, delay)
            await asyncio.sleep(delay)

    async def _session(self, js: JetStreamContext, backoff: Backoff) -> None:
        """One MQTT session and one NATS publishing connection, until either fails (or cancelled)."""
        settings = self._settings
        pump = Pump(
            loop=asyncio.get_running_loop(),
            stats=self.stats,
            prefix=self._prefix,
            metrics=self._metrics,
            max_payload=settings.bridge.max_payload,
            mappings=settings.bridge.mappings,
            ranges=settings.bridge.effective_ranges,
            store_timeout_s=STORE_TIMEOUT_S,
            max_in_flight=settings.bridge.max_in_flight,
            codec=settings.nats.codec,
        )
        # Read at every session: a rotated seed is picked up at the next reconnect.
        nkey = load_nkey(settings.nats.nkey_file) if settings.nats.nkey_file is not None else None
        nats_wire = await open_nats(
            settings.nats.url, name="nerve-bridge-uplink", on_acks=pump.on_acks, nkey=nkey
        )
        pump.attach_nats(nats_wire)
        mqtt_wire: MqttWire | None = None
        try:
            mqtt_wire = await open_mqtt(
                settings.mqtt,
                client_id=settings.bridge.client_id,
                on_messages=pump.on_messages,
                clean_start=False,
                session_expiry_s=settings.mqtt.session_expiry_s,
                receive_maximum=settings.bridge.max_in_flight,
            )
            pump.attach_mqtt(mqtt_wire)
            filters = uplink_filters(
                self._prefix, settings.bridge.mappings, shared_group=settings.bridge.shared_group
            )
            try:
                async with asyncio.TaskGroup() as tasks:
                    # Watched from the start: a resumed session floods in before the SUBACK (the pump may
                    # pause reading at max_in_flight until stores come back), and NATS may go meanwhile.
                    tasks.create_task(self._watch(pump, mqtt_wire, nats_wire), name="bridge-watch")
                    tasks.create_task(
                        self._subscribed(mqtt_wire, js, filters, backoff), name="bridge-downlink"
                    )
                    # Park in the body: on 3.11 a TaskGroup whose child fails while the parent waits in
                    # __aexit__ leaves the parent's cancel count raised for good.
                    await asyncio.Future()
            finally:
                self.ready.clear()
        finally:
            if mqtt_wire is not None:
                await self._drain(pump, mqtt_wire, nats_wire)
                mqtt_wire.close()
            nats_wire.close()
            self.stats.in_flight = 0  # what was not acknowledged is mosquitto's again

    async def _subscribed(
        self, mqtt_wire: MqttWire, js: JetStreamContext, filters: list[str], backoff: Backoff
    ) -> None:
        """Subscribe the uplink, then run the downlink until the session ends.

        Retain Handling 2: the retained messages under the prefix (every device's `status`) are not sent
        at each subscribe, only what is published from now on. No Local (not allowed in a shared group):
        the commands this bridge publishes down are not sent back up to it.
        """
        await mqtt_wire.subscribe(
            filters,
            timeout_s=SUBSCRIBE_TIMEOUT_S,
            retain_handling=2,
            no_local=self._settings.bridge.shared_group is None,
        )
        backoff.reset()
        log.info(
            "bridge: connected to %s and %s",
            shown_url(self._settings.mqtt.url),
            shown_url(self._settings.nats.url),
        )
        await self._downlink(mqtt_wire, js)

    async def _drain(self, pump: Pump, mqtt_wire: MqttWire, nats_wire: NatsWire) -> None:
        """Take nothing new, and give what is in flight a moment to be stored and acknowledged."""
        drained = pump.stop_accepting()
        if pump.in_flight and not (mqtt_wire.closed.done() or nats_wire.closed.done()):
            log.info("bridge: draining %d in-flight messages", pump.in_flight)
            with contextlib.suppress(TimeoutError, MqttWireError, NatsWireError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await asyncio.wait(
                        [drained, mqtt_wire.closed, nats_wire.closed], return_when=asyncio.FIRST_COMPLETED
                    )

    async def _watch(self, pump: Pump, mqtt_wire: MqttWire, nats_wire: NatsWire) -> None:
        """Raise the reason as soon as either connection ends; meanwhile re-send stores left unanswered."""
        closed = [mqtt_wire.closed, nats_wire.closed]
        while True:
            done, _ = await asyncio.wait(
                closed, timeout=WATCH_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                future.result()  # raises MqttWireError / NatsWireError
            pump.check_timeouts()
            checkpoint()

    async def _dead_letter(self, js: JetStreamContext, *, reason: str, origin: str, payload: bytes) -> None:
        backoff = Backoff(maximum=2.0)
        while True:
            try:
                await publish_dead_letter(
                    js, prefix=self._prefix, part=PART, reason=reason, origin=origin, payload=payload
                )
            except (NatsError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("bridge: dead-lettering failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            else:
                self.stats.deadlettered += 1
                log.warning("bridge: dead-lettered a message from %s: %s", origin, reason)
                return

    async def _subscribe_downlink(self, js: JetStreamContext) -> JetStreamContext.PushSubscription:
        return await shared_durable(
            js,
            subject=kind_filter(Kind.COMMANDS, self._prefix),
            stream=STREAM_OF_KIND[Kind.COMMANDS],
            name=self._settings.bridge.downlink_durable,
            ack_wait_s=DOWNLINK_ACK_WAIT_S,
            max_ack_pending=DOWNLINK_MAX_ACK_PENDING,
        )

    async def _downlink(self, mqtt_wire: MqttWire, js: JetStreamContext) -> None:
        """Send stored commands down until the session ends; NATS trouble is waited out, not fatal."""
        backoff = Backoff()
        while True:
            try:
                subscription = await self._subscribe_downlink(js)
            except (NatsError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("bridge: downlink: cannot bind its consumer (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.ready.set()
            try:
                async for msg in subscription.messages:
                    try:
                        await self._send_command(mqtt_wire, js, msg)
                    except (NatsError, TimeoutError) as exc:
                        # Not acknowledged: JetStream delivers it again after the ack wait.
                        log.warning(
                            "bridge: downlink: %s; the command will come again", exc or type(exc).__name__
                        )
                    checkpoint()
            finally:
                with contextlib.suppress(NatsError, TimeoutError):
                    await subscription.unsubscribe()

    async def _send_command(self, mqtt_wire: MqttWire, js: JetStreamContext, msg: Msg) -> None:
        try:
            address = parse_subject(msg.subject, self._prefix)
            command = decode(msg.data, Command, max_size=self._settings.bridge.max_payload)
            if command.subject != address.device or command.action != address.name:
                raise DecodeError(  # noqa: TRY301 - one place turns bad commands into dead letters
                    f"command for {command.subject}/{command.action} stored under {msg.subject}"
                )
        except (TopicError, DecodeError) as exc:
            await self._dead_letter(js, reason=str(exc), origin=msg.subject, payload=msg.data)
            await msg.term()
            return
        if command.expires <= utcnow():
            await self._expire(js, command)
            await msg.ack()
            return
        topic = address.topic(self._prefix)
        async with asyncio.timeout(MQTT_PUBLISH_TIMEOUT_S):
            await mqtt_wire.publish(topic, msg.data)
        # mosquitto has it (PUBACK): only now may JetStream forget it.
        await msg.ack()
        self.stats.commands_sent += 1
        log.debug("bridge: sent command %s to %s", command.id, topic)

    async def _expire(self, js: JetStreamContext, command: Command) -> None:
        reason = f"expired at {command.expires.isoformat()} before the bridge could send it"
        result = CommandResult.for_command(
            command,
            source=SOURCE,
            status="expired",
            reason=reason,
            result_id=derived_id(command.id, "expired"),
        )
        result_subject = Address(command.subject, Kind.RESULTS, command.action).subject(self._prefix)
        # The result is the record; central's command audit keeps the fact (signed and chained by central,
        # as every fact: the bridge holds no key, so a fact of its own would not verify).
        await publish_envelope(js, result_subject, result, codec=self._settings.nats.codec)
        self.stats.commands_expired += 1
        log.warning("bridge: command %s to %s %s", command.id, command.subject, reason)
