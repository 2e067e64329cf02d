"""An in-memory double of the part of nats-py's JetStream the engine uses, on a fake clock.

It is not a NATS server: it implements, in one process, what `nerve.runtime.engine` and nerve's
JetStream helpers call on a `nats.aio.client.Client` and its `JetStreamContext`, with the same
semantics where the engine relies on them:

- streams with subjects (`*` and `>` wildcards), `Nats-Msg-Id` deduplication within the stream's
  duplicate window, `Nats-Expected-Last-Sequence` (error 10071), `add_stream` of an existing stream
  refused with error 10058, `stream_info`, `get_msg`, `get_last_msg`, `delete_msg`;
- message schedules (`Nats-Schedule: @at <time>`, `Nats-Schedule-Target`): a schedule on a subject
  replaces the previous one; when the fake clock reaches it, one message lands on its target (the
  schedule's body and headers) and the schedule is removed;
- durable push consumers with a deliver group (messages split between the subscriptions bound to it),
  explicit ack, `nak(delay)`, `term`, redelivery after the ack wait, `max_deliver` (`consumer_info`, and
  `add_consumer` to change it on an existing consumer); ordered consumers from a start sequence;
- key-value buckets over streams (`$KV.<bucket>.<key>`, one revision kept per key): `get`, `create`,
  `update(last=)` (compare-and-set on the revision), `put`, `delete`, `watch`, `watchall`.

Every time it keeps (message times, dedup windows, schedules, ack deadlines) is the `FakeClock`'s, which
moves only when `advance` is called. Not modelled: byte, age and message-count limits, `max_ack_pending`,
flow control, clusters, permissions. Anything else nats-py offers raises `AttributeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    PubAck,
    RawStreamMsg,
    StreamConfig,
    StreamInfo,
    StreamState,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from nerve.runtime.engine.timers import SCHEDULE_HEADER, SCHEDULE_TARGET_HEADER
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.trust.chain import EXPECTED_LAST_SEQUENCE_HEADER, WRONG_LAST_SEQUENCE_CODE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


log = logging.getLogger(__name__)

STREAM_NAME_IN_USE: Final = 10058
KV_OPERATION_HEADER: Final = "KV-Operation"
_SCHEDULE_HEADERS: Final = frozenset({SCHEDULE_HEADER, SCHEDULE_TARGET_HEADER, MSG_ID_HEADER})
_DEFAULT_ACK_WAIT_S: Final = 30.0
_AT_RESOLUTION_S: Final = 1e-6


class FakeClock:
    """A clock that stands still until `advance` moves it (starting at the real time it was made).

    Implements `nerve.runtime.engine.clock.Clock`. Whatever is due when it moves (sleepers, message
    schedules, redeliveries) happens then, in the order it came due.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._listeners: list[Callable[[], None]] = []

    def time(self) -> float:
        """Now, on this clock."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has been advanced by `seconds` (at once, for zero or less)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    def on_advance(self, listener: Callable[[], None]) -> None:
        """Call `listener()` each time the clock moves (after it moved)."""
        self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward; wake whatever came due."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds!r} seconds)")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for listener in self._listeners:
            listener()


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject `subject` matches `pattern` (`*`: one token, `>`: one or more at the end)."""
    wanted = pattern.split(".")
    tokens = subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens) or (part not in ("*", tokens[index])):
            return False
    return len(tokens) == len(wanted)


def _at_time(expression: str) -> float:
    """The epoch time of a schedule `@at <RFC3339>`; raises `BadRequestError` for anything else."""
    if not expression.startswith("@at "):
        raise BadRequestError(code=400, description=f"schedule {expression!r}: only @at is modelled")
    try:
        return datetime.fromisoformat(expression.removeprefix("@at ")).timestamp()
    except ValueError:
        raise BadRequestError(code=400, description=f"schedule {expression!r} is not valid") from None


@dataclass(slots=True)
class _Stored:
    subject: str
    data: bytes
    headers: dict[str, str]
    time: float


@dataclass(slots=True)
class _Stream:
    config: StreamConfig
    messages: dict[int, _Stored] = field(default_factory=dict)
    last_seq: int = 0
    dedup: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: subject -> (due, seq of the schedule message)
    schedules: dict[str, tuple[float, int]] = field(default_factory=dict)
    consumers: dict[str, _Consumer] = field(default_factory=dict)
    ordered: list[_Subscription] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name or ""

    def holds(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.config.subjects or ())

    def last_on(self, subject: str) -> int:
        """The sequence of the last message on exactly `subject` (0: none)."""
        for seq in reversed(self.messages):  # kept in sequence order
            if self.messages[seq].subject == subject:
                return seq
        return 0

    def info(self) -> StreamInfo:
        size = sum(len(stored.data) for stored in self.messages.values())
        first = min(self.messages, default=self.last_seq + 1)
        state = StreamState(
            messages=len(self.messages),
            bytes=size,
            first_seq=first,
            last_seq=self.last_seq,
            consumer_count=len(self.consumers),
        )
        return StreamInfo(config=self.config, state=state)


class MemoryMsg(Msg):
    """A delivered message: nats-py's `Msg`, acked through the in-memory consumer that delivered it."""

    def __init__(
        self,
        *,
        stored: _Stored,
        seq: int,
        stream: str,
        consumer: _Consumer | None,
        delivered: int,
        pending: int,
    ) -> None:
        super().__init__(_client=None, subject=stored.subject, data=stored.data, headers=dict(stored.headers))  # type: ignore[arg-type]
        self._seq = seq
        self._consumer = consumer
        self._meta = Msg.Metadata(
            sequence=Msg.Metadata.SequencePair(consumer=seq, stream=seq),
            num_pending=pending,
            num_delivered=delivered,
            timestamp=datetime.fromtimestamp(stored.time, UTC),
            stream=stream,
            consumer=consumer.name if consumer else "",
        )

    @property
    def metadata(self) -> Msg.Metadata:
        """Where it was stored and how often it was delivered."""
        return self._meta

    async def ack(self) -> None:
        """Acknowledge it (it is not delivered again)."""
        if self._consumer is not None:
            self._consumer.settle(self._seq)

    async def nak(self, delay: float | None = None) -> None:
        """Have it delivered again (after `delay` seconds on the fake clock)."""
        if self._consumer is not None:
            self._consumer.again(self._seq, delay or 0.0)

    async def term(self, reason: str = "") -> None:  # noqa: ARG002 - nats-py's signature
        """Never deliver it again."""
        if self._consumer is not None:
            self._consumer.settle(self._seq)

    async def in_progress(self) -> None:
        """Reset its ack deadline."""
        if self._consumer is not None:
            self._consumer.again(self._seq, self._consumer.ack_wait_s, reset=True)


class _Subscription:
    """What `subscribe` returns: a callback or an iterator of messages, until unsubscribed."""

    def __init__(
        self, server: MemoryJetStream, cb: Callable[[Msg], Awaitable[None]] | None, owner: MemoryNats
    ) -> None:
        self._server = server
        self._cb = cb
        self._owner = owner
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.active = True
        self.detach: Callable[[], None] = lambda: None
        #: An ordered consumer's filter and first sequence.
        self.ordered_from: tuple[str, int] = (">", 1)
        if cb is not None:
            self._task = asyncio.get_running_loop().create_task(self._deliver(cb), name="memory-js-cb")
        owner.subscriptions.add(self)

    def put(self, msg: Msg) -> None:
        if self.active:
            self._queue.put_nowait(msg)

    async def _deliver(self, cb: Callable[[Msg], Awaitable[None]]) -> None:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            try:
                await cb(msg)
            except Exception:
                log.exception("memory-js: a subscription's callback raised")

    @property
    def messages(self) -> AsyncIterator[Msg]:
        """Each message as it comes (a subscription without a callback), until unsubscribed."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Msg]:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            yield msg

    async def next_msg(self, timeout: float = 1.0) -> Msg:
        """The next message within `timeout` real seconds; raises `TimeoutError`."""
        async with asyncio.timeout(timeout):
            msg = await self._queue.get()
        if msg is None:
            raise ConnectionClosedError
        return msg

    async def unsubscribe(self) -> None:
        """Stop: a durable consumer keeps what this subscription had not acknowledged (redelivered)."""
        self.close()

    def close(self) -> None:
        if not self.active:
            return
        self.active = False
        self.detach()
        self._owner.subscriptions.discard(self)
        self._queue.put_nowait(None)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


class _Consumer:
    """A durable push consumer with a deliver group: explicit acks, redelivery after the ack wait."""

    def __init__(
        self, *, server: MemoryJetStream, stream: _Stream, name: str, config: ConsumerConfig
    ) -> None:
        self.server = server
        self.stream = stream
        self.name = name
        self.filter = config.filter_subject or ">"
        self.config = config
        self.ack_wait_s = float(config.ack_wait or _DEFAULT_ACK_WAIT_S)
        self.max_deliver = config.max_deliver if config.max_deliver and config.max_deliver > 0 else 0
        self.next_seq = 1
        #: seq -> (deliveries, due again at)
        self.pending: dict[int, tuple[int, float]] = {}
        self.members: list[_Subscription] = []
        self._turn = itertools.count()

    def bind(self, sub: _Subscription) -> None:
        self.members.append(sub)
        sub.detach = lambda: self.members.remove(sub) if sub in self.members else None
        self.pump()

    def settle(self, seq: int) -> None:
        self.pending.pop(seq, None)

    def again(self, seq: int, delay: float, *, reset: bool = False) -> None:
        if seq in self.pending:
            deliveries, _ = self.pending[seq]
            self.pending[seq] = (deliveries, self.server.clock.time() + delay)
            if not reset:
                self.pump()

    def pump(self) -> None:
        """Deliver what is due: redeliveries, then new messages, while a member is bound."""
        if not self.members:
            return
        now = self.server.clock.time()
        for seq, (deliveries, due) in sorted(self.pending.items()):
            if due > now:
                continue
            stored = self.stream.messages.get(seq)
            if stored is None or (self.max_deliver and deliveries >= self.max_deliver):
                self.pending.pop(seq)
                continue
            self._send(seq, stored, deliveries + 1)
        while self.next_seq <= self.stream.last_seq:
            seq = self.next_seq
            self.next_seq += 1
            stored = self.stream.messages.get(seq)
            if stored is not None and subject_matches(self.filter, stored.subject):
                self._send(seq, stored, 1)

    def _send(self, seq: int, stored: _Stored, deliveries: int) -> None:
        self.pending[seq] = (deliveries, self.server.clock.time() + self.ack_wait_s)
        member = self.members[next(self._turn) % len(self.members)]
        left = self.stream.last_seq - seq
        msg = MemoryMsg(
            stored=stored, seq=seq, stream=self.stream.name, consumer=self, delivered=deliveries, pending=left
        )
        member.put(msg)


class MemoryJetStream:
    """The in-memory JetStream every `MemoryNats` connection shares (one per test, like one server)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.streams: dict[str, _Stream] = {}
        self.watchers: list[_KeyWatcher] = []
        self.clock.on_advance(self._tick)

    def connect(self) -> MemoryNats:
        """A new connection (what `nats.connect` returns)."""
        return MemoryNats(self)

    # --- streams -------------------------------------------------------------------------------------

    def stream(self, name: str) -> _Stream:
        """Stream `name`; `NotFoundError` if there is none."""
        found = self.streams.get(name)
        if found is None:
            raise NotFoundError(code=404, err_code=10059, description=f"stream {name} not found")
        return found

    def stream_of(self, subject: str) -> _Stream:
        """The stream that holds `subject`; `NoRespondersError` (as nats-py) if none does."""
        for stream in self.streams.values():
            if stream.holds(subject):
                return stream
        raise NoRespondersError

    def store(self, subject: str, data: bytes, headers: dict[str, str] | None) -> PubAck:
        """What a JetStream publish does: dedup, expected sequence, schedules, then deliveries."""
        stream = self.stream_of(subject)
        headers = dict(headers or {})
        now = self.clock.time()
        msg_id = headers.get(MSG_ID_HEADER)
        window = stream.config.duplicate_window or 120.0
        if msg_id is not None:
            seen = stream.dedup.get(msg_id)
            if seen is not None and now - seen[1] < window:
                return PubAck(stream=stream.name, seq=seen[0], duplicate=True)
        expected = headers.get(EXPECTED_LAST_SEQUENCE_HEADER)
        if expected is not None and int(expected) != stream.last_seq:
            raise APIError(
                code=400,
                err_code=WRONG_LAST_SEQUENCE_CODE,
                description="wrong last sequence",
                stream=stream.name,
            )
        due = _at_time(headers[SCHEDULE_HEADER]) if SCHEDULE_HEADER in headers else None
        seq = self._append(stream, _Stored(subject, data, headers, now))
        if msg_id is not None:
            stream.dedup[msg_id] = (seq, now)
        if due is not None:
            previous = stream.schedules.get(subject)
            if previous is not None:
                stream.messages.pop(previous[1], None)
            stream.schedules[subject] = (due, seq)
            self._fire_due(stream)
        return PubAck(stream=stream.name, seq=seq)

    def _append(self, stream: _Stream, stored: _Stored) -> int:
        stream.last_seq += 1
        seq = stream.last_seq
        history = stream.config.max_msgs_per_subject or 0
        if history > 0:
            kept = [s for s, m in stream.messages.items() if m.subject == stored.subject]
            for old in kept[: max(0, len(kept) - history + 1)]:
                del stream.messages[old]
        stream.messages[seq] = stored
        for consumer in stream.consumers.values():
            consumer.pump()
        for sub in list(stream.ordered):
            sub_filter, start = sub.ordered_from
            if seq >= start and subject_matches(sub_filter, stored.subject):
                sub.put(
                    MemoryMsg(
                        stored=stored, seq=seq, stream=stream.name, consumer=None, delivered=1, pending=0
                    )
                )
        for watcher in list(self.watchers):
            watcher.offer(stream.name, seq, stored)
        return seq

    def _fire_due(self, stream: _Stream) -> None:
        now = self.clock.time()
        for subject, (due, seq) in sorted(stream.schedules.items(), key=lambda item: item[1]):
            if due > now + _AT_RESOLUTION_S:  # `@at` keeps microseconds: `due` may come back a hair later
                continue
            del stream.schedules[subject]
            schedule = stream.messages.pop(seq, None)
            if schedule is None:
                continue
            target = schedule.headers.get(SCHEDULE_TARGET_HEADER, subject)
            headers = {k: v for k, v in schedule.headers.items() if k not in _SCHEDULE_HEADERS}
            self._append(stream, _Stored(target, schedule.data, headers, now))

    def _tick(self) -> None:
        for stream in list(self.streams.values()):
            self._fire_due(stream)
            for consumer in stream.consumers.values():
                consumer.pump()


class MemoryNats:
    """One connection to a `MemoryJetStream`: `jetstream()` and `close()`, as nats-py's `Client`."""

    def __init__(self, server: MemoryJetStream) -> None:
        self.server = server
        self.subscriptions: set[_Subscription] = set()
        self.is_closed = False

    def jetstream(self, **_options: object) -> MemoryJetStreamContext:
        """JetStream on this connection."""
        return MemoryJetStreamContext(self)

    def check(self) -> None:
        """Raise `ConnectionClosedError` once closed."""
        if self.is_closed:
            raise ConnectionClosedError

    async def close(self) -> None:
        """Close: every subscription stops (what a durable consumer delivered unacknowledged comes again)."""
        self.is_closed = True
        for sub in list(self.subscriptions):
            sub.close()

    async def drain(self) -> None:
        """As `close`."""
        await self.close()

    async def flush(self, timeout: float = 1.0) -> None:  # noqa: ARG002 - nats-py's signature
        """Nothing is buffered."""
        self.check()


class MemoryJetStreamContext:
    """The subset of nats-py's `JetStreamContext` the engine and nerve's JetStream helpers use."""

    def __init__(self, nc: MemoryNats) -> None:
        self._nc = nc
        self._server = nc.server

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,  # noqa: ARG002 - nats-py's signature
        stream: str | None = None,  # noqa: ARG002
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """Store a message (see the module docstring for what is modelled)."""
        self._nc.check()
        await asyncio.sleep(0)
        return self._server.store(subject, payload, headers)

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:  # noqa: ANN401
        """Create a stream; an existing one: `BadRequestError` 10058."""
        self._nc.check()
        config = config or StreamConfig.from_response(params)
        if config.name in self._server.streams:
            raise BadRequestError(
                code=400, err_code=STREAM_NAME_IN_USE, description="stream name already in use"
            )
        stream = _Stream(config=config)
        self._server.streams[config.name or ""] = stream
        return stream.info()

    async def update_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:  # noqa: ANN401
        """Replace a stream's configuration (what it holds is kept)."""
        self._nc.check()
        config = config or StreamConfig.from_response(params)
        stream = self._server.stream(config.name or "")
        stream.config = config
        return stream.info()

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> StreamInfo:  # noqa: ARG002
        """A stream's configuration and state; `NotFoundError` if there is none."""
        self._nc.check()
        return self._server.stream(name).info()

    async def get_msg(
        self,
        stream_name: str,
        seq: int | None = None,
        subject: str | None = None,
        *,
        next: bool = False,  # noqa: A002 - nats-py's name
        start_time: datetime | None = None,
        **_options: object,
    ) -> RawStreamMsg:
        """The message at `seq` (or the last on `subject`); `NotFoundError` if there is none.

        With `next`: the first message at or after `seq` on `subject` (a filter). With `start_time` (what
        nats-server's message get takes, and nats-py does not): the first message stored at or after it.
        """
        self._nc.check()
        stream = self._server.stream(stream_name)
        if start_time is not None:
            since, seq = start_time.timestamp(), None
            for stored_seq, candidate in stream.messages.items():  # kept in sequence order
                if candidate.time >= since:
                    seq = stored_seq
                    break
        elif next and subject is not None:
            start, seq = seq or 0, None
            for stored_seq, candidate in stream.messages.items():  # kept in sequence order
                if stored_seq >= start and subject_matches(subject, candidate.subject):
                    seq = stored_seq
                    break
        elif seq is None and subject is not None:
            seq = stream.last_on(subject)
        stored = stream.messages.get(seq or 0)
        if stored is None or seq is None:
            raise NotFoundError(code=404, err_code=10037, description="no message found")
        return RawStreamMsg(
            subject=stored.subject,
            seq=seq,
            data=stored.data,
            headers=dict(stored.headers),
            stream=stream_name,
            time=datetime.fromtimestamp(stored.time, UTC),
        )

    async def get_last_msg(self, stream_name: str, subject: str, **_options: object) -> RawStreamMsg:
        """The last message on `subject`; `NotFoundError` if there is none."""
        self._nc.check()
        stream = self._server.stream(stream_name)
        return await self.get_msg(stream_name, seq=stream.last_on(subject))

    async def delete_msg(self, stream_name: str, seq: int) -> bool:
        """Delete the message at `seq`; `NotFoundError` if there is none."""
        self._nc.check()
        stream = self._server.stream(stream_name)
        if stream.messages.pop(seq, None) is None:
            raise NotFoundError(code=404, err_code=10037, description="no message found")
        return True

    async def subscribe(  # noqa: PLR0917 - nats-py's signature
        self,
        subject: str,
        queue: str | None = None,  # noqa: ARG002 - the deliver group is the durable's name
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        durable: str | None = None,
        stream: str | None = None,
        config: ConsumerConfig | None = None,
        manual_ack: bool = False,  # noqa: ARG002, FBT001, FBT002
        ordered_consumer: bool = False,  # noqa: ARG002, FBT001, FBT002
        deliver_policy: DeliverPolicy | None = None,
        **_options: object,
    ) -> _Subscription:
        """A durable push consumer (shared by every subscription to `durable`) or an ordered one."""
        self._nc.check()
        found = self._server.stream(stream) if stream else self._server.stream_of(subject)
        sub = _Subscription(self._server, cb, self._nc)
        if durable is None:
            policy = deliver_policy or (config.deliver_policy if config else None) or DeliverPolicy.ALL
            start = 1
            if policy == DeliverPolicy.BY_START_SEQUENCE and config is not None:
                start = config.opt_start_seq or 1
            elif policy in (DeliverPolicy.NEW, DeliverPolicy.LAST):
                start = found.last_seq + (policy == DeliverPolicy.NEW)
            sub.ordered_from = (subject, start)
            found.ordered.append(sub)
            sub.detach = lambda: found.ordered.remove(sub) if sub in found.ordered else None
            for seq in sorted(s for s in found.messages if s >= start):
                stored = found.messages[seq]
                if subject_matches(subject, stored.subject):
                    left = sum(1 for s in found.messages if s > seq)
                    sub.put(
                        MemoryMsg(
                            stored=stored,
                            seq=seq,
                            stream=found.name,
                            consumer=None,
                            delivered=1,
                            pending=left,
                        )
                    )
            return sub
        consumer = found.consumers.get(durable)
        if consumer is None:
            consumer_config = config or ConsumerConfig()
            consumer_config.filter_subject = consumer_config.filter_subject or subject
            consumer = _Consumer(server=self._server, stream=found, name=durable, config=consumer_config)
            found.consumers[durable] = consumer
        consumer.bind(sub)
        return sub

    async def consumer_info(self, stream: str, consumer: str, timeout: float | None = None) -> ConsumerInfo:  # noqa: ARG002
        """Durable consumer `consumer` of `stream` (its configuration); `NotFoundError` if there is none."""
        self._nc.check()
        found = self._server.stream(stream).consumers.get(consumer)
        if found is None:
            raise NotFoundError(code=404, err_code=10014, description="consumer not found")
        return ConsumerInfo(name=consumer, stream_name=stream, config=found.config, created=datetime.now(UTC))

    async def add_consumer(
        self,
        stream: str,
        config: ConsumerConfig,
        timeout: float | None = None,  # noqa: ARG002 - nats-py's signature
    ) -> ConsumerInfo:
        """Change an existing durable consumer's `max_deliver` (all `shared_durable` does with this)."""
        self._nc.check()
        found = self._server.stream(stream).consumers.get(config.durable_name or "")
        if found is None:
            raise AttributeError("the in-memory JetStream creates consumers only by subscribing")
        found.config = config
        found.max_deliver = config.max_deliver if config.max_deliver and config.max_deliver > 0 else 0
        return await self.consumer_info(stream, found.name)

    async def create_key_value(self, config: KeyValueConfig | None = None, **params: Any) -> KeyValue:  # noqa: ANN401
        """A new bucket; an existing one: `BadRequestError` (nerve then opens it and updates its limits)."""
        self._nc.check()
        config = config or KeyValueConfig(**params)
        name = f"KV_{config.bucket}"
        if name in self._server.streams:
            raise BadRequestError(
                code=400, err_code=STREAM_NAME_IN_USE, description="stream name already in use"
            )
        await self.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"$KV.{config.bucket}.>"],
                max_msgs_per_subject=config.history,
                max_bytes=config.max_bytes,
                max_age=config.ttl,
                max_msg_size=config.max_value_size,
                allow_rollup_hdrs=True,
                deny_delete=True,
            )
        )
        return await self.key_value(config.bucket)

    async def key_value(self, bucket: str) -> KeyValue:
        """An existing bucket; `BucketNotFoundError` if there is none."""
        self._nc.check()
        if f"KV_{bucket}" not in self._server.streams:
            raise BucketNotFoundError
        return MemoryKeyValue(self._nc, bucket)  # type: ignore[return-value]


class MemoryKeyValue:
    """A bucket (nats-py's `KeyValue` subset): one revision kept per key; revisions are stream sequences."""

    def __init__(self, nc: MemoryNats, bucket: str) -> None:
        self._nc = nc
        self.server = nc.server
        self.bucket = bucket
        self.stream_name = f"KV_{bucket}"

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    def _latest(self, key: str) -> tuple[int, _Stored] | None:
        stream = self.server.stream(self.stream_name)
        seq = stream.last_on(self._subject(key))
        return None if seq == 0 else (seq, stream.messages[seq])

    def entry(self, key: str, seq: int, stored: _Stored) -> KeyValue.Entry:
        """nats-py's entry of `key` at revision `seq`."""
        operation = stored.headers.get(KV_OPERATION_HEADER)
        return KeyValue.Entry(
            bucket=self.bucket,
            key=key,
            value=stored.data,
            revision=seq,
            delta=0,
            created=None,
            operation=operation,
        )

    async def get(self, key: str, revision: int | None = None) -> KeyValue.Entry:  # noqa: ARG002
        """The latest value of `key`; `KeyNotFoundError` if it has none (or was deleted)."""
        self._nc.check()
        await asyncio.sleep(0)
        latest = self._latest(key)
        if latest is None or latest[1].headers.get(KV_OPERATION_HEADER):
            raise KeyNotFoundError
        return self.entry(key, *latest)

    def _write(self, key: str, value: bytes, *, last: int | None, operation: str | None = None) -> int:
        self._nc.check()
        latest = self._latest(key)
        if last is not None:
            current = 0 if latest is None else latest[0]
            deleted = latest is not None and bool(latest[1].headers.get(KV_OPERATION_HEADER))
            if current != last and not (last == 0 and deleted):
                raise KeyWrongLastSequenceError(description=f"wrong last sequence: {current}")
        headers = {KV_OPERATION_HEADER: operation} if operation else {}
        return self.server.store(self._subject(key), value, headers).seq

    async def create(self, key: str, value: bytes, **_options: object) -> int:
        """Store `key` if it has no value; `KeyWrongLastSequenceError` if it has one."""
        await asyncio.sleep(0)
        return self._write(key, value, last=0)

    async def update(self, key: str, value: bytes, last: int | None = None, **_options: object) -> int:
        """Store `key` if its revision is `last`; `KeyWrongLastSequenceError` if it is not."""
        await asyncio.sleep(0)
        return self._write(key, value, last=last or 0)

    async def put(self, key: str, value: bytes, **_options: object) -> int:
        """Store `key`, whatever it held."""
        await asyncio.sleep(0)
        return self._write(key, value, last=None)

    async def delete(self, key: str, last: int | None = None, **_options: object) -> bool:
        """Mark `key` deleted."""
        await asyncio.sleep(0)
        self._write(key, b"", last=last, operation="DEL")
        return True

    async def keys(self, **_options: object) -> list[str]:
        """Every key with a value."""
        self._nc.check()
        stream = self.server.stream(self.stream_name)
        prefix = f"$KV.{self.bucket}."
        return sorted(
            {
                m.subject.removeprefix(prefix)
                for m in stream.messages.values()
                if not m.headers.get(KV_OPERATION_HEADER)
            }
        )

    async def watch(self, keys: str, **_options: object) -> _KeyWatcher:
        """Every current value of the keys matching `keys`, then None, then each change as it comes."""
        self._nc.check()
        watcher = _KeyWatcher(self, self._subject(keys))
        stream = self.server.stream(self.stream_name)
        latest: dict[str, int] = {}
        for seq, stored in sorted(stream.messages.items()):
            if subject_matches(watcher.pattern, stored.subject):
                latest[stored.subject] = seq
        for seq in sorted(latest.values()):
            watcher.offer(self.stream_name, seq, stream.messages[seq])
        watcher.queue.put_nowait(None)
        self.server.watchers.append(watcher)
        return watcher

    async def watchall(self, **options: object) -> _KeyWatcher:
        """`watch(">")`."""
        return await self.watch(">", **options)


class _KeyWatcher:
    """What `watch` returns: entries (None once the current values were given) until stopped."""

    def __init__(self, kv: MemoryKeyValue, pattern: str) -> None:
        self.kv = kv
        self.pattern = pattern
        self.queue: asyncio.Queue[KeyValue.Entry | BaseException | None] = asyncio.Queue()
        self.stopped = False

    def offer(self, stream: str, seq: int, stored: _Stored) -> None:
        if self.stopped or stream != self.kv.stream_name or not subject_matches(self.pattern, stored.subject):
            return
        key = stored.subject.removeprefix(f"$KV.{self.kv.bucket}.")
        self.queue.put_nowait(self.kv.entry(key, seq, stored))

    def __aiter__(self) -> _KeyWatcher:
        return self

    async def __anext__(self) -> KeyValue.Entry | None:
        if self.stopped:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise StopAsyncIteration
        return item

    async def updates(self, timeout: float = 5.0) -> KeyValue.Entry | None:
        """The next entry within `timeout` real seconds."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def stop(self) -> None:
        """Stop watching."""
        self.stopped = True
        with contextlib.suppress(ValueError):
            self.kv.server.watchers.remove(self)
        self.queue.put_nowait(StopAsyncIteration())


__all__ = [
    "FakeClock",
    "MemoryJetStream",
    "MemoryJetStreamContext",
    "MemoryKeyValue",
    "MemoryMsg",
    "MemoryNats",
]
