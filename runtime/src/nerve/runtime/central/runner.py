"""Central: runs agents on durable JetStream consumers.

Each agent subscription gets a durable push consumer with a deliver group (`nerve-agent-<name>-<kind>`),
so several central processes share the work and a restarted one carries on where the last left off.
A message is acknowledged after its handler returned. Undecodable messages and messages that failed
`MAX_DELIVER` times go to the dead-letter stream with the reason; so does one delivered more often than
that without settling (each process that held it died: a poison message), unhandled. JetStream itself
never gives up on a message (it would drop it unseen). Messages more than `max_hops`
reactions deep are dropped, and a fact says so (the loop guard). Anyone may send a message with a large
`hops`, so those facts are sampled (`RefusalSampler`, `streams.sample_window_s`): the first per device
and agent at once, the rest counted into one fact per window.

A command result reaches an agent only if its device signed it: it verifies against the key registered
for its `subject` (`DeviceKeys`, `central.device_keys_dir`). Any other result (unsigned, signed by
another key, by an unknown or revoked device, altered or forged) is acknowledged, changes nothing, and
is kept as a `result_refused` fact, sampled the same way per device and kind of refusal (but for the
bridge's unsigned `expired` for a command central's key signed, stored once it expired:
`nerve.runtime.trust.expiry`; it reaches the agents, the command audit among them); results
claiming to be from devices the registry does not know share one key (`UNREGISTERED`), so made-up
device ids cannot multiply the facts. Every agent subscribed to results gets its own copy of one; each
copy is refused, and the first such agent's copy is the one counted (`refused_results`, the facts).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.central.agent import DEFAULT_MAX_HOPS, NO_SUBJECT, Agent, AgentContext, Reject, Retry
from nerve.runtime.engine.errors import EngineError
from nerve.runtime.envelope.codec import MODEL_OF_KIND, decode
from nerve.runtime.envelope.model import Command, CommandResult, Event, derived_id
from nerve.runtime.errors import DecodeError, SignatureError
from nerve.runtime.jetstream.client import (
    connect_forever,
    dead_letter_delivery,
    num_delivered,
    shared_durable,
)
from nerve.runtime.jetstream.sampling import RefusalSampler
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, ready_streams
from nerve.runtime.subjects import Kind
from nerve.runtime.trust.devices import DeviceKeys, registry_dir
from nerve.runtime.trust.expiry import COMMAND_SEQ_HEADER
from nerve.runtime.trust.signing import Verifier

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.central.agent import Subscription
    from nerve.runtime.config.settings import Settings
    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.jetstream.sampling import Sample
    from nerve.runtime.trust.devices import Refusal
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)

PART: Final = "central"
MAX_DELIVER: Final = 5
ACK_WAIT_S: Final = 30.0
MAX_ACK_PENDING: Final = 1000
TICK_S: Final = 0.5
RETRY_DELAY_S: Final = 1.0
ENGINE_START_S: Final = 30.0
LOOP_GUARD: Final = "loop_guard"
RESULT_REFUSED: Final = "result_refused"
#: The sampling key (and fact subject) of refused results claiming a device the registry does not know.
UNREGISTERED: Final = "unregistered-devices"
#: A stream sequence is a uint64: at most 20 digits (`COMMAND_SEQ_HEADER`).
MAX_SEQ_DIGITS: Final = 20


@dataclass(frozen=True, slots=True)
class DurableAgentFactory:
    """A durable agent that is built once central is connected: `build(ctx)` gets its `AgentContext`.

    For agents whose effects go through central's context (its key signs their commands and facts,
    `ctx.js` stores their events), as the payment-recovery saga's do. `name` names the context
    (`nerve://central/<name>`): the agent's name.
    """

    name: str
    build: Callable[[AgentContext], DurableAgent]


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
        device_keys: DeviceKeys | None = None,
        durable: Sequence[DurableAgent | DurableAgentFactory] = (),
    ) -> None:
        """`device_keys`: whose results to believe (default: the registry the settings name).

        `durable`: durable agents, run by an `Engine` (`central.engine`) on the same connection; a
        `DurableAgentFactory` is built with its `AgentContext` once central is connected.
        """
        self._settings = settings
        self._signer = signer
        self._agents = list(agents)
        self._durable = list(durable)
        self._max_hops = max_hops
        self.ready = asyncio.Event()
        self.handled = 0
        self.deadlettered = 0
        self.refused_results = 0
        self._device_keys = device_keys or DeviceKeys(
            registry_dir(settings.central.device_keys_dir, settings.data_dir)
        )
        self._own: AgentContext | None = None
        #: Central's own key: a command it signed is one it sent (`_expired_command`).
        self._own_key = Verifier.from_config({signer.keyid: signer.public_key})
        self._instance = uuid.uuid4().hex  # tells this process's sampled facts from another's
        self._loop_guard = RefusalSampler(
            window_s=settings.streams.sample_window_s, max_keys=settings.streams.sample_max_keys
        )
        self._result_guard = RefusalSampler(
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
                engine=self._settings.central.engine,
            )
            async with asyncio.TaskGroup() as tasks:
                own = AgentContext(js=js, settings=self._settings, signer=self._signer, agent=PART)
                self._own = own
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
                if self._durable:
                    await self._start_engine(nc, js, tasks)
                self.ready.set()
                log.info("central: running %s", ", ".join(agent.name for agent in self._agents))
        finally:
            self.ready.clear()
            await nc.close()

    async def _start_engine(self, nc: NatsClient, js: JetStreamContext, tasks: asyncio.TaskGroup) -> None:
        """Run the durable agents in an engine beside the agents; return once it took its consumers."""
        from nerve.runtime.engine import Engine  # noqa: PLC0415 - only when there are durable agents

        settings = self._settings
        agents = [
            agent.build(AgentContext(js=js, settings=settings, signer=self._signer, agent=agent.name))
            if isinstance(agent, DurableAgentFactory)
            else agent
            for agent in self._durable
        ]
        engine = Engine(
            nc=nc,
            agents=agents,
            prefix=settings.prefix,
            settings=settings.central.engine,
            signer=self._signer,
            codec=settings.nats.codec,
            configure=False,  # done above (`ready_streams`), or not ours to do
            device_keys=self._device_keys,
            refusals=self,
            # Blast-radius percentages count the registered devices (`central.engine.fleet_size` wins).
            fleet_size=lambda: len(self._device_keys.devices),
        )
        running = tasks.create_task(engine.run(), name="central-engine")
        ready = asyncio.ensure_future(engine.ready.wait())
        try:
            await asyncio.wait({ready, running}, timeout=ENGINE_START_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if running.done():
            running.result()  # raises why it stopped
        if not engine.ready.is_set():
            raise EngineError(f"the engine did not start within {ENGINE_START_S:g}s")

    async def refuse_result(self, result: CommandResult) -> bool:
        """True if `result` is not its device's: the engine's command steps ask (`ResultRefusals`).

        Counted and kept as a sampled `result_refused` fact, unless one of this runner's agents reads
        results of its action (its consumer counts it already: one count per result).
        """
        counted = any(self._records_results(agent, result.action) for agent in self._agents)
        return await self._refuse_result(result, record=not counted)

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
        )

    async def _sampled_facts(self, ctx: AgentContext) -> None:
        """Keep one fact per key whose window ended with drops (loop guard) or refusals (results) counted."""
        while True:
            await asyncio.sleep(TICK_S)
            for kind, sampler in ((LOOP_GUARD, self._loop_guard), (RESULT_REFUSED, self._result_guard)):
                for sample in sampler.due():
                    try:
                        await self._counted_fact(ctx, sample, first=False, kind=kind)
                    except (NatsError, TimeoutError) as exc:
                        log.warning("central: %d %s not kept in a fact: %s", sample.count, kind, exc)
            checkpoint()

    async def _counted_fact(self, ctx: AgentContext, sample: Sample, *, first: bool, kind: str) -> None:
        """A `loop_guard` or `result_refused` fact for `sample.count` under one key (or many devices)."""
        window = self._settings.streams.sample_window_s
        device = "many-devices" if sample.overflow else sample.device
        cause = Event(
            id=derived_id(
                ctx.source, self._instance, kind, device, sample.reason, repr(sample.since), str(first)
            ),
            source=ctx.source,
            type=f"nerve.central.{kind}",
            subject=device,
        )
        if kind == LOOP_GUARD:
            summary = (
                f"{sample.reason} dropped {sample.count} message(s) from {device} within {window:g}s: "
                f"past the limit of {self._max_hops} hops (counted, not kept one by one; the last: "
                f"{sample.last})"
            )
            data: dict[str, object] = {"count": sample.count, "window_s": window, "agent": sample.reason}
        else:
            summary = (
                f"central refused {sample.count} result(s) from {device} within {window:g}s "
                f"({sample.reason}): not acted on (counted, not kept one by one; the last: {sample.last})"
            )
            data = {"count": sample.count, "window_s": window, "reason": sample.reason, "last": sample.last}
        await ctx.fact(cause, kind=kind, summary=summary, data=data)

    def _records_results(self, agent: Agent, action: str) -> bool:
        """Whether `agent` is the first agent subscribed to results of `action`: the one that counts them.

        Each agent's consumer gets its own copy of a result; only one copy is counted and kept as a fact.
        """
        for candidate in self._agents:
            for subscription in candidate.subscriptions:
                if subscription.kind is Kind.RESULTS and subscription.name in {"*", action}:
                    return candidate is agent
        return False

    async def _refuse_result(self, result: CommandResult, *, record: bool, stored: Msg | None = None) -> bool:
        """True if `result` is not its device's (`DeviceKeys`); then, if `record`, count it (sampled fact).

        Or, `stored` being its message, the bridge's unsigned `expired` for a command of central's that it
        names (`_expired_command`), stored once that command expired (`nerve.runtime.trust.expiry`).
        """
        sent = await self._expired_command(result, stored) if stored is not None else None
        arrived = stored.metadata.timestamp if sent is not None and stored is not None else None
        refusal = self._device_keys.refusal(result, sent=sent, arrived=arrived)
        if refusal is None:
            return False
        if not record:
            return True
        self.refused_results += 1
        # Bounded by the fleet: made-up device ids share one key.
        key = result.subject if self._device_keys.knows(result.subject) else UNREGISTERED
        last = f"result {result.id} for command {result.causationid}: {refusal.reason}"
        sample = self._result_guard.offer(key, refusal.kind, last)
        if sample is None:
            log.debug("central: result %s refused: %s", result.id, refusal.reason)
            return True
        log.warning(
            "central: result %s refused, not acted on: %s (more like it are counted for %gs)",
            result.id,
            refusal.reason,
            self._settings.streams.sample_window_s,
        )
        try:
            await self._refusal_fact(result, refusal, sample)
        except (NatsError, TimeoutError) as exc:  # the facts stream full, say: still refused, and said
            log.warning("central: result %s refused; its fact not kept: %s", result.id, exc)
        return True

    async def _expired_command(self, result: CommandResult, stored: Msg) -> Command | None:
        """The command of central's that an unsigned `expired` result names, or None.

        The bridge stores its `expired` with the command's place in NERVE_COMMANDS (`COMMAND_SEQ_HEADER`):
        only a hint, read for an unsigned `expired` alone; the command there must be the one the result
        answers (`expired_claim_refusal` checks) and signed by central's own key.
        """
        place = (stored.headers or {}).get(COMMAND_SEQ_HEADER, "")
        if result.status != "expired" or result.sig or not place.isdecimal() or len(place) > MAX_SEQ_DIGITS:
            return None
        own = self._own
        if own is None:  # cannot happen: set before any consumer starts
            return None
        try:
            raw = await own.js.get_msg(STREAM_OF_KIND[Kind.COMMANDS], int(place))
            command = decode(raw.data or b"", Command)
            self._own_key.verify(command)
        except (NatsError, TimeoutError, DecodeError, SignatureError) as exc:
            log.debug("central: result %s: its command at %s is not central's: %s", result.id, place, exc)
            return None
        return command

    async def _refusal_fact(self, result: CommandResult, refusal: Refusal, sample: Sample) -> None:
        own = self._own
        if own is None:  # cannot happen: set before any consumer starts
            return
        if sample.overflow:
            await self._counted_fact(own, sample, first=True, kind=RESULT_REFUSED)
            return
        await own.fact(
            result,
            kind=RESULT_REFUSED,
            summary=(
                f"central refused result {result.id} ({result.action} {result.status}, command "
                f"{result.causationid}) from {result.subject}: {refusal.reason}; not acted on"
            ),
            data={
                "count": 1,
                "reason": refusal.kind,
                "detail": refusal.reason,
                "result_id": result.id,
                "command_id": result.causationid,
                "status": result.status,
            },
            key="refused",
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
            delivered = num_delivered(msg)
            if delivered > MAX_DELIVER:  # nothing of it is looked at: it may be what stopped those before
                reason = f"{agent.name}: delivered {delivered} times, never settled; not handled again"
                await self._dead_letter(ctx, msg, reason)
            else:
                await self._deliver(agent, ctx, model, msg)
            checkpoint()

    async def _dead_letter(self, ctx: AgentContext, msg: Msg, reason: str) -> None:
        await dead_letter_delivery(ctx.js, msg, prefix=ctx.prefix, part=PART, reason=reason)
        self.deadlettered += 1
        log.warning("central: dead-lettered %s: %s", msg.subject, reason)

    async def _deliver(self, agent: Agent, ctx: AgentContext, model: type[Envelope], msg: Msg) -> None:
        try:
            envelope = decode(msg.data, model)
        except DecodeError as exc:
            await self._dead_letter(ctx, msg, f"{agent.name}: {exc.reason}")
            return
        if isinstance(envelope, CommandResult) and await self._refuse_result(
            envelope, record=self._records_results(agent, envelope.action), stored=msg
        ):
            await msg.ack()
            return
        if envelope.hops > self._max_hops:
            device = envelope.subject or NO_SUBJECT
            sample = self._loop_guard.offer(device, agent.name, envelope.id)
            if sample is not None and sample.overflow:  # beyond the devices told apart: about them all
                await self._counted_fact(ctx, sample, first=True, kind=LOOP_GUARD)
            elif sample is not None:
                await ctx.fact(
                    envelope,
                    kind=LOOP_GUARD,
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
            delivered = num_delivered(msg)
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
