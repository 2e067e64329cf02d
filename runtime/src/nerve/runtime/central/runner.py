"""Central: runs agents on durable JetStream consumers.

Each agent subscription gets a durable push consumer with a deliver group (`nerve-agent-<name>-<kind>`),
so several central processes share the work and a restarted one carries on where the last left off.
A message is acknowledged after its handler returned. Undecodable messages and messages that failed
`MAX_DELIVER` times go to the dead-letter stream with the reason. Messages more than `max_hops`
reactions deep are dropped, and a fact says so (the loop guard). Anyone may send a message with a large
`hops`, so those facts are sampled (`RefusalSampler`, `streams.sample_window_s`): the first per device
and agent at once, the rest counted into one fact per window.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.central.agent import DEFAULT_MAX_HOPS, NO_SUBJECT, Agent, AgentContext, Reject, Retry
from nerve.runtime.envelope.codec import MODEL_OF_KIND, decode
from nerve.runtime.envelope.model import Event, derived_id
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream.client import connect_forever, publish_dead_letter, shared_durable
from nerve.runtime.jetstream.sampling import RefusalSampler
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, ready_streams

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.central.agent import Subscription
    from nerve.runtime.config.settings import Settings
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.jetstream.sampling import Sample
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)

PART: Final = "central"
MAX_DELIVER: Final = 5
ACK_WAIT_S: Final = 30.0
MAX_ACK_PENDING: Final = 1000
TICK_S: Final = 0.5
RETRY_DELAY_S: Final = 1.0


def consumer_name(agent: Agent, subscription: Subscription) -> str:
    """The durable consumer (and deliver group) of one agent subscription."""
    return f"nerve-agent-{agent.name}-{subscription.kind.value}-{subscription.name.replace('*', 'all')}"


class Central:
    """Runs `agents` until cancelled."""

    def __init__(
        self,
        *,
        settings: Settings,
        signer: Signer,
        agents: Sequence[Agent],
        max_hops: int = DEFAULT_MAX_HOPS,
    ) -> None:
        self._settings = settings
        self._signer = signer
        self._agents = list(agents)
        self._max_hops = max_hops
        self.ready = asyncio.Event()
        self.handled = 0
        self.deadlettered = 0
        self._instance = uuid.uuid4().hex  # tells this process's sampled facts from another's
        self._loop_guard = RefusalSampler(
            window_s=settings.streams.sample_window_s, max_keys=settings.streams.sample_max_keys
        )

    async def run(self) -> None:
        """Run every agent until cancelled."""
        nc = await connect_forever(self._settings.nats, name="nerve-central")
        try:
            js = nc.jetstream()
            await ready_streams(
                js,
                self._settings.prefix,
                self._settings.streams,
                configure=self._settings.nats.nkey_file is None,
            )
            async with asyncio.TaskGroup() as tasks:
                own = AgentContext(js=js, settings=self._settings, signer=self._signer, agent=PART)
                tasks.create_task(self._sampled_facts(own), name="central-sampled-facts")
                for agent in self._agents:
                    ctx = AgentContext(js=js, settings=self._settings, signer=self._signer, agent=agent.name)
                    await agent.start(ctx)
                    for subscription in agent.subscriptions:
                        sub = await self._subscribe(js, agent, subscription)
                        tasks.create_task(
                            self._consume(agent, ctx, subscription, sub),
                            name=f"central-{consumer_name(agent, subscription)}",
                        )
                    tasks.create_task(self._ticks(agent, ctx), name=f"central-{agent.name}-tick")
                self.ready.set()
                log.info("central: running %s", ", ".join(agent.name for agent in self._agents))
        finally:
            self.ready.clear()
            await nc.close()

    async def _subscribe(
        self, js: JetStreamContext, agent: Agent, subscription: Subscription
    ) -> JetStreamContext.PushSubscription:
        return await shared_durable(
            js,
            subject=subscription.subject(self._settings.prefix),
            stream=STREAM_OF_KIND[subscription.kind],
            name=consumer_name(agent, subscription),
            ack_wait_s=ACK_WAIT_S,
            max_ack_pending=MAX_ACK_PENDING,
            max_deliver=MAX_DELIVER,
        )

    async def _sampled_facts(self, ctx: AgentContext) -> None:
        """Keep one loop-guard fact per device and agent whose window ended with drops counted."""
        while True:
            await asyncio.sleep(TICK_S)
            for sample in self._loop_guard.due():
                try:
                    await self._counted_fact(ctx, sample, first=False)
                except (NatsError, TimeoutError) as exc:
                    log.warning("central: %d loop-guard drops not kept: %s", sample.count, exc)
            checkpoint()

    async def _counted_fact(self, ctx: AgentContext, sample: Sample, *, first: bool) -> None:
        """A loop-guard fact for `sample.count` drops under one key (or many devices)."""
        window = self._settings.streams.sample_window_s
        device = "many-devices" if sample.overflow else sample.device
        cause = Event(
            id=derived_id(ctx.source, self._instance, device, sample.reason, repr(sample.since), str(first)),
            source=ctx.source,
            type="nerve.central.loop_guard",
            subject=device,
        )
        await ctx.fact(
            cause,
            kind="loop_guard",
            summary=(
                f"{sample.reason} dropped {sample.count} message(s) from {device} within {window:g}s: "
                f"past the limit of {self._max_hops} hops (counted, not kept one by one; the last: "
                f"{sample.last})"
            ),
            data={"count": sample.count, "window_s": window, "agent": sample.reason},
        )

    async def _ticks(self, agent: Agent, ctx: AgentContext) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await agent.tick(ctx)
            except (NatsError, TimeoutError) as exc:
                log.warning("central: %s tick failed: %s", agent.name, exc)
            checkpoint()

    async def _consume(
        self,
        agent: Agent,
        ctx: AgentContext,
        subscription: Subscription,
        sub: JetStreamContext.PushSubscription,
    ) -> None:
        model = MODEL_OF_KIND[subscription.kind]
        async for msg in sub.messages:
            await self._deliver(agent, ctx, model, msg)
            checkpoint()

    async def _dead_letter(self, ctx: AgentContext, msg: Msg, reason: str) -> None:
        await publish_dead_letter(
            ctx.js, prefix=ctx.prefix, part=PART, reason=reason, origin=msg.subject, payload=msg.data
        )
        await msg.term()
        self.deadlettered += 1
        log.warning("central: dead-lettered %s: %s", msg.subject, reason)

    async def _deliver(self, agent: Agent, ctx: AgentContext, model: type[Envelope], msg: Msg) -> None:
        try:
            envelope = decode(msg.data, model)
        except DecodeError as exc:
            await self._dead_letter(ctx, msg, f"{agent.name}: {exc.reason}")
            return
        if envelope.hops > self._max_hops:
            device = envelope.subject or NO_SUBJECT
            sample = self._loop_guard.offer(device, agent.name, envelope.id)
            if sample is not None and sample.overflow:  # beyond the devices told apart: about them all
                await self._counted_fact(ctx, sample, first=True)
            elif sample is not None:
                await ctx.fact(
                    envelope,
                    kind="loop_guard",
                    summary=(
                        f"{agent.name} dropped {envelope.type} {envelope.id}: {envelope.hops} hops deep, "
                        f"past the limit of {self._max_hops}"
                    ),
                    data={"count": 1},
                    key=agent.name,
                )
            await msg.ack()
            return
        try:
            await agent.handle(envelope, ctx)
        except Reject as exc:
            await self._dead_letter(ctx, msg, f"{agent.name}: {exc.reason}")
        except Exception as exc:  # noqa: BLE001 - a handler's bug must not stop the agent
            # A handler's failure must not stop the agent: redeliver, and give up after MAX_DELIVER.
            delivered = msg.metadata.num_delivered
            if delivered >= MAX_DELIVER:
                await self._dead_letter(
                    ctx, msg, f"{agent.name}: failed {delivered} times, last: {type(exc).__name__}: {exc}"
                )
            else:
                level = logging.INFO if isinstance(exc, Retry) else logging.ERROR
                log.log(
                    level, "central: %s failed on %s (try %d): %s", agent.name, msg.subject, delivered, exc
                )
                await msg.nak(delay=RETRY_DELAY_S)
        else:
            await msg.ack()
            self.handled += 1
