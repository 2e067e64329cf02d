"""Durable timers: nats-server message schedules (2.12+), never a polling loop.

A timer is one schedule message `Nats-Schedule: @at <RFC3339>` on `...timers.at.<timer id>` in
NERVE_TIMERS; when due, the server stores one message on `...timers.fired.<timer id>` (the schedule's body
and headers, so it names its run and step) and removes the schedule. A timer that came due while no engine
ran has fired all the same: its message waits in the stream for the durable consumer `nerve-engine-timers`.
Scheduling a timer again before it fires replaces it (same subject); its id is also its `Nats-Msg-Id`.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy

from nerve.runtime.engine.names import TIMERS_STREAM, timer_fired_subject, timer_schedule_subject
from nerve.runtime.jetstream.client import MSG_ID_HEADER, PUBLISH_TIMEOUT_S, last_stored_seq
from nerve.runtime.jetstream.streams import timers_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

SCHEDULE_HEADER: Final = "Nats-Schedule"
SCHEDULE_TARGET_HEADER: Final = "Nats-Schedule-Target"
RUN_HEADER: Final = "Nerve-Run"
STEP_HEADER: Final = "Nerve-Step"


def at_expression(due: float) -> str:
    """`@at <RFC3339>` for the epoch time `due` (fractions kept: a timer never fires early)."""
    return "@at " + datetime.fromtimestamp(due, UTC).isoformat().replace("+00:00", "Z")


async def schedule(
    js: JetStreamContext, *, prefix: str, timer_id: str, due: float, run_id: str, step_id: str
) -> None:
    """Have the server fire timer `timer_id` at `due` (epoch seconds); safe to call again."""
    await js.publish(
        timer_schedule_subject(prefix, timer_id),
        b"",
        timeout=PUBLISH_TIMEOUT_S,
        headers={
            SCHEDULE_HEADER: at_expression(due),
            SCHEDULE_TARGET_HEADER: timer_fired_subject(prefix, timer_id),
            MSG_ID_HEADER: timer_id,
            RUN_HEADER: run_id,
            STEP_HEADER: step_id,
        },
    )


async def fired_seq(js: JetStreamContext, *, prefix: str, timer_id: str) -> int | None:
    """The sequence of timer `timer_id`'s fired message in NERVE_TIMERS, or None if it has not fired."""
    return await last_stored_seq(js, TIMERS_STREAM, timer_fired_subject(prefix, timer_id))


async def has_fired(js: JetStreamContext, *, prefix: str, timer_id: str) -> bool:
    """Whether timer `timer_id` fired (its message is in NERVE_TIMERS)."""
    return await fired_seq(js, prefix=prefix, timer_id=timer_id) is not None


async def forget(js: JetStreamContext, *, prefix: str, timer_id: str) -> None:
    """Delete timer `timer_id`'s fired message (its step is journalled): best effort, never raises."""
    try:
        seq = await fired_seq(js, prefix=prefix, timer_id=timer_id)
        if seq is not None:
            await js.delete_msg(TIMERS_STREAM, seq)
    except (NatsError, TimeoutError) as exc:
        log.debug("timers: fired message of %s not deleted: %s", timer_id, exc)


class TimerBell:
    """Tells the steps of one engine waiting on a timer that it fired.

    One subscription to every timer's fired subject, from when the engine started, instead of a consumer
    of its own per waiting step.

    A step listens first (`listening`), then looks whether its timer fired already (`has_fired`): a timer
    that fired before is found there, one that fires after rings here. Each engine process hears every
    timer of the site fire (a message of headers), and makes no consumer per wait.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._root = timer_fired_subject(prefix, "")
        self._listeners: dict[str, list[Callable[[], None]]] = {}

    async def start(self, js: JetStreamContext) -> JetStreamContext.PushSubscription:
        """Subscribe (the caller unsubscribes the subscription returned when the engine stops)."""
        return await js.subscribe(
            timer_fired_subject(self._prefix),
            stream=TIMERS_STREAM,
            cb=self._ring,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def _ring(self, msg: Msg) -> None:
        for listener in list(self._listeners.get(msg.subject.removeprefix(self._root), ())):
            listener()

    @contextlib.contextmanager
    def listening(self, timer_id: str, listener: Callable[[], None]) -> Iterator[None]:
        """Within it, `listener()` is called each time timer `timer_id` fires."""
        listeners = self._listeners.setdefault(timer_id, [])
        listeners.append(listener)
        try:
            yield
        finally:
            listeners.remove(listener)
            if not listeners:
                del self._listeners[timer_id]


__all__ = ["TimerBell", "at_expression", "fired_seq", "forget", "has_fired", "schedule", "timers_config"]
