"""What stands between one engine and its NATS connection in the harness: crashes and duplicate deliveries.

A `Gate` wraps a nats-py client (real or in memory) as the engine sees it. It counts the engine's
journal writes (KV `create`/`update` of a `run.<id>` key) and can kill the engine at one of them, as
`kill -9` would: either just **before** the write is stored (the step's effect happened, its record did
not) or just **after** (the record is stored, the engine never learns it was). The write that crashes
never returns; every later call from that engine fails (`ConnectionClosedError`), and a message that
arrives for it is left unacknowledged, as for a dead process. With `deliver_twice`, every message
delivered to the engine is delivered again at once (`num_delivered` one higher; its acks are no-ops).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError

from nerve.runtime.engine.names import RUN_KEY_PREFIX

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

#: Where a crash happens relative to the journal write it is planned at.
CrashWhen = Literal["before", "after"]


class Duplicate(Msg):
    """A second delivery of a message the engine was given already (its acks do nothing)."""

    def __init__(self, original: Msg) -> None:
        super().__init__(
            _client=None,  # type: ignore[arg-type]
            subject=original.subject,
            data=original.data,
            headers=dict(original.headers or {}),
        )
        meta = original.metadata
        self._duplicate_meta = dataclasses.replace(meta, num_delivered=meta.num_delivered + 1)

    @property
    def metadata(self) -> Msg.Metadata:
        """The original's, delivered once more."""
        return self._duplicate_meta

    async def ack(self) -> None:
        """Nothing: the original was acknowledged (or not) already."""

    async def nak(self, delay: float | None = None) -> None:
        """Nothing (see `ack`)."""

    async def term(self, reason: str = "") -> None:
        """Nothing (see `ack`)."""

    async def in_progress(self) -> None:
        """Nothing (see `ack`)."""


class Gate:
    """One engine's view of NATS in the harness; `crash()` kills it there and then.

    `on_write()` is called at each journal write and says whether to crash there ("before", "after")
    or not (None); `on_crash()` is called once, when the engine dies.
    """

    def __init__(
        self,
        *,
        on_write: Callable[[], CrashWhen | None],
        on_crash: Callable[[], None],
        deliver_twice: bool,
    ) -> None:
        self._on_write = on_write
        self._on_crash = on_crash
        self.deliver_twice = deliver_twice
        self.dead = False

    def check(self) -> None:
        """Raise `ConnectionClosedError` if this engine has crashed."""
        if self.dead:
            raise ConnectionClosedError

    def crash(self) -> None:
        """Kill the engine: nothing it calls from now on reaches NATS."""
        if not self.dead:
            self.dead = True
            self._on_crash()

    async def journal_write(self, write: Callable[[], Awaitable[int]]) -> int:
        """Do one journal write, or crash before or after it as planned."""
        self.check()
        when = self._on_write()
        if when == "before":
            self.crash()
            await asyncio.get_running_loop().create_future()  # never returns
        revision = await write()
        if when == "after":
            self.crash()
            await asyncio.get_running_loop().create_future()  # never returns
        return revision

    def callback(self, cb: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        """`cb` as a dead engine runs it (not at all), delivering each message twice if asked."""

        async def gated(msg: Msg) -> None:
            if self.dead:
                return
            await cb(msg)
            if self.deliver_twice and not self.dead:
                await cb(Duplicate(msg))

        return gated


class GatedNats:
    """A nats-py client as the engine sees it through its `Gate` (only `jetstream()` is used)."""

    def __init__(self, nc: Any, gate: Gate) -> None:  # noqa: ANN401 - a nats-py client or its double
        self._nc = nc
        self._gate = gate

    def jetstream(self, **options: object) -> GatedJetStream:
        """JetStream through the gate."""
        return GatedJetStream(self._nc.jetstream(**options), self._gate)


class GatedJetStream:
    """Every call goes through the gate; subscriptions' messages too; KV buckets count journal writes."""

    def __init__(self, js: Any, gate: Gate) -> None:  # noqa: ANN401 - a JetStreamContext or its double
        self._js = js
        self._gate = gate

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever nats-py has
        attr = getattr(self._js, name)
        if not callable(attr):
            return attr

        async def gated(*args: object, **kwargs: object) -> object:
            self._gate.check()
            return await attr(*args, **kwargs)

        return gated

    async def subscribe(self, subject: str, *args: object, **kwargs: Any) -> object:  # noqa: ANN401
        """Subscribe; a dead engine's callbacks do nothing, and each message may come twice."""
        self._gate.check()
        cb = kwargs.get("cb")
        if cb is not None:
            kwargs["cb"] = self._gate.callback(cb)
            return await self._js.subscribe(subject, *args, **kwargs)
        return GatedSubscription(await self._js.subscribe(subject, *args, **kwargs), self._gate)

    async def key_value(self, bucket: str) -> GatedKeyValue:
        """A bucket whose journal writes go through the gate."""
        self._gate.check()
        return GatedKeyValue(await self._js.key_value(bucket), self._gate)

    async def create_key_value(self, *args: object, **kwargs: object) -> GatedKeyValue:
        """As `key_value`, creating the bucket."""
        self._gate.check()
        return GatedKeyValue(await self._js.create_key_value(*args, **kwargs), self._gate)


class GatedSubscription:
    """A subscription read through `messages`: nothing for a dead engine, each message twice if asked."""

    def __init__(self, sub: Any, gate: Gate) -> None:  # noqa: ANN401
        self._sub = sub
        self._gate = gate

    @property
    def messages(self) -> AsyncIterator[Msg]:
        """The messages, as the gate lets them through."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Msg]:
        async for msg in self._sub.messages:
            if self._gate.dead:
                continue
            yield msg
            if self._gate.deliver_twice and not self._gate.dead:
                yield Duplicate(msg)

    async def unsubscribe(self) -> None:
        """Unsubscribe the subscription underneath."""
        await self._sub.unsubscribe()


class GatedKeyValue:
    """A bucket: writes of a run's journal are counted (and may crash); every call checks the gate."""

    def __init__(self, kv: Any, gate: Gate) -> None:  # noqa: ANN401
        self._kv = kv
        self._gate = gate

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        attr = getattr(self._kv, name)
        if not callable(attr):
            return attr

        async def gated(*args: object, **kwargs: object) -> object:
            self._gate.check()
            return await attr(*args, **kwargs)

        return gated

    async def create(self, key: str, value: bytes, **kwargs: object) -> int:
        """A write: counted when it is a run's journal."""
        if not key.startswith(RUN_KEY_PREFIX):
            self._gate.check()
            return int(await self._kv.create(key, value, **kwargs))
        return await self._gate.journal_write(lambda: self._kv.create(key, value, **kwargs))

    async def update(self, key: str, value: bytes, last: int | None = None, **kwargs: object) -> int:
        """A write: counted when it is a run's journal."""
        if not key.startswith(RUN_KEY_PREFIX):
            self._gate.check()
            return int(await self._kv.update(key, value, last=last, **kwargs))
        return await self._gate.journal_write(lambda: self._kv.update(key, value, last=last, **kwargs))


__all__ = ["CrashWhen", "Duplicate", "Gate", "GatedJetStream", "GatedKeyValue", "GatedNats"]
