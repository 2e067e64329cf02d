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
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiomqtt
from nats.errors import Error as NatsError

from nerve.bridge.metrics import MetricsServer
from nerve.bridge.uplink import Forward, Reject, translate, uplink_filters
from nerve.runtime.backoff import Backoff
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.codec import decode
from nerve.runtime.envelope import Command, CommandResult, Fact, derived_id, utcnow
from nerve.runtime.errors import DecodeError, TopicError
from nerve.runtime.jetstream import (
    MSG_ID_HEADER,
    connect_forever,
    publish_dead_letter,
    publish_envelope,
    publish_fact,
    shared_durable,
)
from nerve.runtime.mqtt import ack, make_client
from nerve.runtime.streams import STREAM_OF_KIND, ensure_streams
from nerve.runtime.subjects import Address, Kind, kind_filter, parse_subject

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.config import Settings

log = logging.getLogger(__name__)

SOURCE: Final = "nerve://bridge"
PART: Final = "bridge"
STORE_TIMEOUT_S: Final = 5.0
MQTT_PUBLISH_TIMEOUT_S: Final = 10.0
# How many commands may be on their way to mosquitto at once; the rest wait in JetStream.
DOWNLINK_MAX_ACK_PENDING: Final = 256
DOWNLINK_ACK_WAIT_S: Final = 30.0


@dataclass(slots=True)
class BridgeStats:
    """Counters since start; served as Prometheus metrics when `bridge.metrics_port` is set."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    in_flight: int = 0
    commands_sent: int = 0
    commands_expired: int = 0
    reconnects: int = 0


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
        nc = await connect_forever(self._settings.nats, name="nerve-bridge")
        try:
            js = nc.jetstream()
            await ensure_streams(js, self._prefix)
            await self._run_mqtt(js)
        finally:
            self.ready.clear()
            await nc.close()

    async def _run_mqtt(self, js: JetStreamContext) -> None:
        backoff = Backoff()
        while True:
            client = make_client(
                self._settings.mqtt,
                identifier=self._settings.bridge.client_id,
                persistent=True,
                # No PUBACK before JetStream stored it. That also bounds what waits here: mosquitto sends
                # at most its in-flight window (max_inflight_messages) of unacknowledged QoS1 messages.
                # (aiomqtt's own bound would discard messages when full, so it is left unset.)
                manual_ack=True,
            )
            try:
                async with client:
                    backoff.reset()
                    await client.subscribe(
                        [
                            (topic, 1)
                            for topic in uplink_filters(
                                self._prefix,
                                self._settings.bridge.mappings,
                                shared_group=self._settings.bridge.shared_group,
                            )
                        ]
                    )
                    downlink = await self._subscribe_downlink(js)
                    try:
                        async with asyncio.TaskGroup() as tasks:
                            tasks.create_task(self._uplink(client, js), name="bridge-uplink")
                            tasks.create_task(self._downlink(client, js, downlink), name="bridge-downlink")
                            self.ready.set()
                            log.info(
                                "bridge: connected to %s and %s",
                                self._settings.mqtt.url,
                                self._settings.nats.url,
                            )
                            # Park in the body: on 3.11 a TaskGroup whose child fails while the parent
                            # waits in __aexit__ leaves the parent's cancel count raised for good.
                            await asyncio.Future()
                    finally:
                        self.ready.clear()
                        await downlink.unsubscribe()
            except* aiomqtt.MqttError as group:
                failure: BaseException = group.exceptions[0]
            else:  # pragma: no cover - the body only ends by an exception
                continue
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # We were cancelled and the disconnect surfaced as an MqttError: stop, don't reconnect.
                raise asyncio.CancelledError
            self.stats.reconnects += 1
            delay = backoff.next_delay()
            log.warning("bridge: mqtt %s; reconnecting in %.1fs", failure, delay)
            await asyncio.sleep(delay)

    async def _store(self, js: JetStreamContext, forward: Forward) -> None:
        """Store until JetStream says so: retry (in order, holding back the rest) while NATS is away."""
        backoff = Backoff(maximum=2.0)
        while True:
            try:
                ack = await js.publish(
                    forward.subject,
                    forward.body,
                    timeout=STORE_TIMEOUT_S,
                    headers={MSG_ID_HEADER: forward.msg_id},
                )
            except (NatsError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("bridge: storing %s failed (%s); retrying in %.1fs", forward.subject, exc, delay)
                await asyncio.sleep(delay)
            else:
                if ack.duplicate:
                    self.stats.duplicates += 1
                return

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

    async def _uplink(self, client: aiomqtt.Client, js: JetStreamContext) -> None:
        max_payload = self._settings.bridge.max_payload
        async for message in client.messages:
            self.stats.received += 1
            self.stats.in_flight += 1
            payload = (
                message.payload
                if isinstance(message.payload, bytes)
                else bytes(str(message.payload), "utf-8")
            )
            topic = message.topic.value
            try:
                outcome = translate(
                    topic,
                    payload,
                    prefix=self._prefix,
                    metrics=self._metrics,
                    max_payload=max_payload,
                    mappings=self._settings.bridge.mappings,
                )
            except Exception as exc:
                log.exception("bridge: translating a message from %s failed", topic)
                outcome = Reject(f"internal error while translating: {type(exc).__name__}: {exc}")
            if isinstance(outcome, Forward):
                await self._store(js, outcome)
                self.stats.stored += 1
                log.debug("bridge: stored %s id=%s", outcome.subject, outcome.msg_id)
            else:
                await self._dead_letter(js, reason=outcome.reason, origin=topic, payload=payload)
            # Only now, with the message safe in JetStream, may mosquitto forget it.
            ack(client, message)
            self.stats.in_flight -= 1
            checkpoint()

    async def _subscribe_downlink(self, js: JetStreamContext) -> JetStreamContext.PushSubscription:
        return await shared_durable(
            js,
            subject=kind_filter(Kind.COMMANDS, self._prefix),
            stream=STREAM_OF_KIND[Kind.COMMANDS],
            name=self._settings.bridge.downlink_durable,
            ack_wait_s=DOWNLINK_ACK_WAIT_S,
            max_ack_pending=DOWNLINK_MAX_ACK_PENDING,
        )

    async def _downlink(
        self, client: aiomqtt.Client, js: JetStreamContext, subscription: JetStreamContext.PushSubscription
    ) -> None:
        async for msg in subscription.messages:
            await self._send_command(client, js, msg)
            checkpoint()

    async def _send_command(self, client: aiomqtt.Client, js: JetStreamContext, msg: Msg) -> None:
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
            await client.publish(topic, msg.data, qos=1)
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
        await publish_envelope(js, result_subject, result)
        fact = Fact(
            id=derived_id(command.id, "fact", "command_expired"),
            source=SOURCE,
            type="nerve.fact.command_expired",
            subject=command.subject,
            kind="command_expired",
            summary=f"command {command.action} ({command.id}) not sent: {reason}",
            data={"command_id": command.id, "action": command.action},
            **command.caused(),
        )
        await publish_fact(js, fact, prefix=self._prefix)
        self.stats.commands_expired += 1
        log.warning("bridge: command %s to %s %s", command.id, command.subject, reason)
