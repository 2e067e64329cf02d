"""The payment-recovery saga, a durable agent: a failed payment gets another chance, or is wound up cleanly.

A `payment_failed` event from the shop (`nerve.shop.events.payment_failed`, `data.order_id`) starts one run
per event, keyed by the order:

1. `initiate`: emits `recovery_flow_initiated` (`nerve.central.events.recovery_flow_initiated`) and keeps
   a fact of it. Its undo: the command `notify_customer` (the order could not be paid).
2. `offer`: the command `offer_alternative_payment` to the shop
   (`nerve.shop.commands.offer_alternative_payment`, signed by central like every command). Its undo: the
   command `release_reservation`. Should the offer fail for good (the command cannot be stored, after
   its retries), its declared fallbacks take over, each a step of its own and a `fallback_taken` fact:
   the same command to each of `central.payment.fallback_sources` (other gateways, `offer_via_<service>`),
   then a person (`offer_by_hand`, an approval routed to `central.payment.person_route`: approve once
   the customer was offered another way by hand; a rejection, or nobody within `person_expires_s`, fails
   the run, which compensates as in 4).
3. `paid`: waits up to `central.payment.wait_s` for a `payment_succeeded` of that order (any stored
   since the `payment_failed` counts, even one that came before the offer was made). Then:
   `recovery_flow_completed`, a `payment_recovered` fact, done.
4. Otherwise the run fails and compensates: its undos run in reverse (release the reservation, then
   notify the customer; each a `compensated` fact), then it escalates to a person: an `escalated` fact
   and a `recovery_escalated` event. A cancelled run (`nerve runs cancel`) compensates the same way but
   does not escalate: a person cancelled it.

Every id derives from the trigger event (so from the run): the same `payment_failed` twice starts one run,
and a step or undo run again after a crash publishes the same ids, which JetStream keeps once (the shop
should treat a command id it has seen as done). Commands go to the shop through JetStream, never MQTT.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.engine import Fallback, Person, RetryPolicy, Terminal, Trigger, durable_agent
from nerve.runtime.envelope.model import Event, derived_id, utcnow
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.subjects import CENTRAL_SOURCE, Address, Kind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nerve.runtime.central.agent import AgentContext
    from nerve.runtime.config.settings import PaymentRecoverySettings
    from nerve.runtime.engine import DurableAgent, RunFailure, Step
    from nerve.runtime.envelope.model import Envelope

log = logging.getLogger(__name__)

AGENT: Final = "payment_recovery"
OFFER: Final = "offer_alternative_payment"
RELEASE: Final = "release_reservation"
NOTIFY: Final = "notify_customer"
RETRY: Final = RetryPolicy(attempts=5, initial_s=0.5, maximum_s=10.0)
#: The step (an approval) in which a person offers another way to pay when no service could.
OFFER_BY_HAND: Final = "offer_by_hand"


def order_of(event: Envelope) -> str:
    """The order an event is about: `data.order_id` (or `data.order`). Raises `ValueError` if it has none."""
    data = event.data if isinstance(event.data, dict) else {}
    order = data.get("order_id", data.get("order"))
    if isinstance(order, bool) or not isinstance(order, str | int) or order == "":
        msg = f"{event.type} {event.id} names no order (data.order_id)"
        raise ValueError(msg)
    return str(order)


def _same_order(order: str) -> Any:  # noqa: ANN401 - a predicate on an envelope
    def match(event: Envelope) -> bool:
        try:
            return order_of(event) == order
        except ValueError:
            return False

    return match


class PaymentRecovery:
    """The saga's effects: its own events, its signed commands to the shop, the escalation; and its steps."""

    def __init__(
        self, ctx: AgentContext, settings: PaymentRecoverySettings, *, retry: RetryPolicy = RETRY
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self.retry = retry

    async def emit(self, trigger: Envelope, event_type: str, event_id: str, data: dict[str, Any]) -> str:
        """Store one of its own events, `<prefix>.central.events.<event_type>`, with id `event_id` (once)."""
        order = order_of(trigger)
        event = Event(
            id=event_id,
            source=self._ctx.source,
            type=event_type,
            subject=order,
            time=utcnow(),
            data={"order_id": order, **data},
            **trigger.caused(),
        )
        subject = Address(device=CENTRAL_SOURCE, kind=Kind.EVENTS, name=event_type).subject(self._ctx.prefix)
        await publish_envelope(self._ctx.js, subject, event, codec=self._ctx.settings.nats.codec)
        return event.id

    def _offer_fallbacks(
        self, order: str, offer: Callable[[str], Callable[[], Awaitable[str]]]
    ) -> list[Fallback | Person]:
        """When the offer to the shop cannot be made: each of `fallback_sources` in turn, then a person."""
        settings = self._settings
        ways: list[Fallback | Person] = [
            Fallback(f"offer_via_{service}", offer(service)) for service in settings.fallback_sources
        ]
        if settings.person_route is not None:
            summary = f"offer order {order} another way to pay, by hand: no service could (approve once done)"
            ways.append(
                Person(
                    OFFER_BY_HAND,
                    route=settings.person_route,
                    expires=settings.person_expires_s,
                    summary=summary,
                )
            )
        return ways

    async def command(
        self, trigger: Envelope, action: str, args: dict[str, Any], *, service: str | None = None
    ) -> str:
        """Sign and send `action` to `service` (default: the shop); its id derives from the trigger and both.

        The same run sends the same id.
        """
        sent = await self._ctx.command(
            trigger,
            device=service or self._settings.source,
            action=action,
            args={"order_id": order_of(trigger), **args},
            ttl=timedelta(seconds=self._settings.command_ttl_s),
        )
        return sent.id

    async def escalate(self, trigger: Envelope, failure: RunFailure) -> None:
        """After the undos: a person must look (an event and a fact), unless a person cancelled the run.

        Tried as a step is (`RETRY`): the engine calls a failure handler once and does not retry it. Its
        ids derive from the run, so a try again (or a resumed run) publishes nothing twice.
        """
        if failure.cancelled:
            return
        backoff = self.retry.backoff()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                await self._escalate(trigger, failure)
            except Exception as exc:
                if attempt == self.retry.attempts:
                    raise
                log.warning(
                    "payment_recovery: escalating run %s failed (%s); trying again", failure.run_id, exc
                )
                await asyncio.sleep(backoff.next_delay())
            else:
                return

    async def _escalate(self, trigger: Envelope, failure: RunFailure) -> None:
        order = order_of(trigger)
        event_id = derived_id(failure.run_id, "event", "escalated")
        await self.emit(trigger, "recovery_escalated", event_id, {"reason": failure.error})
        await self._ctx.fact(
            trigger,
            kind="escalated",
            summary=f"order {order}: payment not recovered ({failure.error}); reservation released, customer "
            "told; a person must look",
            data={"run": failure.run_id, "order_id": order, "compensated": failure.compensated},
        )

    async def recover(self, event: Envelope, step: Step) -> dict[str, Any]:
        """The agent function: see the module's docstring."""
        order = order_of(event)
        wait_s = self._settings.wait_s
        data = event.data if isinstance(event.data, dict) else {}
        customer = data.get("customer_id", data.get("customer"))

        async def initiate() -> str:
            reason = {"reason": data.get("reason")}
            return await self.emit(event, "recovery_flow_initiated", step.id("initiate"), reason)

        async def notify() -> str:
            return await self.command(
                event, NOTIFY, {"customer_id": customer, "message": "payment_not_recovered"}
            )

        def offer(service: str) -> Callable[[], Awaitable[str]]:
            async def send() -> str:
                args = {"customer_id": customer, "within_s": wait_s}
                return await self.command(event, OFFER, args, service=service)

            return send

        async def release() -> str:
            return await self.command(event, RELEASE, {})

        await step.run("initiate", initiate, undo=notify)
        await step.fact(
            "initiated",
            kind="recovery_flow_initiated",
            summary=f"order {order}: payment failed; offering another way to pay for {wait_s:g}s",
            data={"order_id": order},
        )
        offered = await step.run(
            "offer", offer(self._settings.source), undo=release, fallbacks=self._offer_fallbacks(order, offer)
        )
        paid = await step.wait_for_event(
            "paid",
            "payment_succeeded",
            source=self._settings.source,
            match=_same_order(order),
            timeout=wait_s,
            since_trigger=True,  # a payment that succeeded while the offer was being made counts too
        )
        if paid is None:
            msg = f"not paid within {wait_s:g}s"
            raise Terminal(msg)

        async def completed() -> str:
            payment = {"payment_event": paid.id}
            return await self.emit(event, "recovery_flow_completed", step.id("completed"), payment)

        await step.run("completed", completed)
        await step.fact(
            "recovered",
            kind="payment_recovered",
            summary=f"order {order}: paid another way after the failed payment",
            data={"order_id": order, "payment_event": paid.id},
        )
        return {"order_id": order, "outcome": "recovered", "offer": offered, "payment_event": paid.id}


def payment_recovery(
    ctx: AgentContext, settings: PaymentRecoverySettings, *, retry: RetryPolicy = RETRY
) -> DurableAgent:
    """The saga as a durable agent; `ctx` signs its commands (central's key) and reaches JetStream.

    `retry`: how its steps (and its escalation) are tried.
    """
    saga = PaymentRecovery(ctx, settings, retry=retry)
    return durable_agent(
        AGENT,
        trigger=Trigger(Kind.EVENTS, "payment_failed", source=settings.source),
        key=order_of,
        waits_on=(Kind.EVENTS,),
        retry=retry,
        on_failure=saga.escalate,
    )(saga.recover)
