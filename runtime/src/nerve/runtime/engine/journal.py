"""A run's journal: one KV entry per run, written only with compare-and-set on its revision.

The entry holds everything about the run: its trigger, its state, its lease (owner, fencing token, until
when) and each step's record, and the undos registered so far. Every write names the revision it read
(`KeyValue.update(last=...)`), so a write succeeds only if nothing was written since: a claim by another
process bumps the fencing token and the revision, and from then on every write of the former owner fails
with `LeaseLost`. That is how two processes never both advance one run.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from nerve.runtime.engine.clock import SYSTEM_CLOCK
from nerve.runtime.engine.errors import EngineError, LeaseLost
from nerve.runtime.engine.names import run_key

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.js.kv import KeyValue

    from nerve.runtime.engine.clock import Clock

RunState = Literal["open", "waiting", "done", "failed", "compensated"]
StepStatus = Literal["started", "done", "failed", "sleeping", "waiting"]
UndoStatus = Literal["registered", "done", "failed"]
TERMINAL: Final = frozenset({"done", "failed", "compensated"})


class StepRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the journal knows of one step."""

    status: StepStatus
    result: Any = None
    attempts: int = 0
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    #: Timers (sleeps, wait timeouts): when due, and the timer's id.
    due: float = 0.0
    timer: str = ""
    #: wait_for_event: the stream and the sequence after which events are read.
    stream: str = ""
    from_seq: int = 0


class UndoRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An undo registered before its step ran, and whether it ran."""

    step: str
    status: UndoStatus = "registered"
    error: str = ""
    attempts: int = 0


class RunRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A run's journal: trigger, state, lease and steps."""

    run_id: str
    agent: str
    key: str
    trigger: msgspec.Raw  # the trigger envelope, JSON
    trigger_stream: str
    trigger_seq: int
    state: RunState = "open"
    owner: str = ""
    token: int = 0
    lease_until: float = 0.0
    steps: dict[str, StepRecord] = msgspec.field(default_factory=dict)
    undos: list[UndoRecord] = msgspec.field(default_factory=list)
    #: Stream positions (last sequence) when the run last completed a step: where a wait reads from.
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    #: A NERVE_RESULTS sequence reached before this record was last written (None: not known): a command
    #: step reads its result from there, so its send need not wait for the step's own entry.
    results_from: int | None = None
    result: Any = None
    error: str = ""
    cancelled: bool = False
    #: The run failed (or was cancelled) and its undos are running.
    compensating: bool = False
    failure_handled: bool = False
    #: A parked run: when its timer is due (the engine's watchdog wakes it a lease after, if no timer did).
    wake_at: float = 0.0
    #: Flow control: the gate (debounce, throttle, concurrency, blast) a run waits at before its first
    #: step; "" once it passed them all (`nerve.runtime.engine.flow`).
    gate: str = ""
    created: float = 0.0
    updated: float = 0.0

    @property
    def terminal(self) -> bool:
        """Whether the run has ended (done, failed or compensated)."""
        return self.state in TERMINAL


#: The longest error text a journal keeps (a step's, an undo's, the run's): the rest is cut.
MAX_ERROR_CHARS: Final = 1000
ENCODER: Final = msgspec.json.Encoder()


def error_text(exc: BaseException) -> str:
    """`Type: message` of `exc`, cut to `MAX_ERROR_CHARS`."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


DECODER: Final = msgspec.json.Decoder(RunRecord)


class RecordTooLarge(EngineError):
    """A run's journal would exceed `limit` bytes (`EngineSettings.max_record_bytes`)."""

    def __init__(self, run_id: str, size: int, limit: int) -> None:
        self.run_id = run_id
        self.size = size
        self.limit = limit
        super().__init__(f"run {run_id}: its journal would be {size} bytes, over the limit of {limit}")


def encode_record(record: RunRecord, limit: int) -> bytes:
    """The bytes of `record`; raises `RecordTooLarge` past `limit`."""
    data = ENCODER.encode(record)
    if len(data) > limit:
        raise RecordTooLarge(record.run_id, len(data), limit)
    return data


async def read_record(kv: KeyValue, run_id: str) -> tuple[RunRecord, int] | None:
    """The journal of `run_id` and its revision, or None if there is none."""
    try:
        entry = await kv.get(run_key(run_id))
    except KeyNotFoundError:
        return None
    if entry.value is None:  # a delete marker
        return None
    return DECODER.decode(entry.value), entry.revision or 0


async def create_record(kv: KeyValue, run_id: str, data: bytes) -> int | None:
    """Store a new run's journal (`encode_record`); its revision, or None if it exists already."""
    try:
        return await kv.create(run_key(run_id), data)
    except KeyWrongLastSequenceError:
        return None


async def try_claim(
    kv: KeyValue, run_id: str, *, owner: str, lease_s: float, limit: int, clock: Clock = SYSTEM_CLOCK
) -> tuple[RunRecord, int] | None:
    """Claim run `run_id` for `owner` if nobody holds it (or the holder's lease ran out).

    Returns the claimed record and its revision, or None: no such run, it has ended, someone else holds
    it, or another process claimed it in the same instant. A claim bumps the fencing token.
    """
    found = await read_record(kv, run_id)
    if found is None:
        return None
    record, revision = found
    now = clock.time()
    if record.terminal or (record.owner and record.owner != owner and record.lease_until > now):
        return None
    record.owner = owner
    record.token += 1
    record.lease_until = now + lease_s
    if record.state == "waiting":
        record.state = "open"
        record.wake_at = 0.0
    record.updated = now
    try:
        revision = await kv.update(run_key(run_id), encode_record(record, limit), last=revision)
    except KeyWrongLastSequenceError:
        return None
    return record, revision


class RunHandle:
    """A claimed run: its record as this process last wrote it, and the one way to write it again.

    Writes are serialised (the lease renewal and the steps share one revision) and each is a
    compare-and-set: if another process wrote in between, the write raises `LeaseLost` and the handle is
    `lost` for good.
    """

    def __init__(
        self,
        *,
        kv: KeyValue,
        record: RunRecord,
        revision: int,
        lease_s: float,
        limit: int,
        clock: Clock = SYSTEM_CLOCK,
        creating: asyncio.Future[int | None] | None = None,
    ) -> None:
        self.kv = kv
        self.clock = clock
        self.record = record
        self.revision = revision
        self.lease_s = lease_s
        self.limit = limit
        self.lost = False
        #: The lease was given back (the run ended or parked): renewing it would claim the run again.
        self.released = False
        self._lock = asyncio.Lock()
        #: Changes that go with the next write, and what to do once it landed (`defer`).
        self._deferred: list[tuple[Callable[[RunRecord], None], Callable[[], Awaitable[None]] | None]] = []
        #: A new run's journal on its way (`confirm`): its revision, or None if the run existed already.
        self._creating = creating
        #: The run's journal was not created by this handle: it existed already (the same trigger).
        self.existed = False

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.record.run_id

    def defer(
        self, change: Callable[[RunRecord], None], *, then: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Have `change` go with the next write instead of a write of its own, and `then()` run after it.

        Only for what a crash before that write may repeat: an effect kept once by its id (a fact), or a
        wait's answer read again from its stream. A step that blocks (waits, sleeps, runs a function)
        writes first (`flush`), so nothing stays deferred for long. `then` (best effort, in the
        background: deleting a fired timer, say) must wait until the journal no longer needs what it
        removes.
        """
        self._deferred.append((change, then))

    async def confirm(self) -> None:
        """Wait until the run's journal is stored, if it is on its way; `LeaseLost` if the run existed.

        Before that only what is kept once by its id may leave (a command, a fact): a run that existed
        already sent it under the same id.
        """
        if self._creating is None:
            return
        revision = await self._creating
        self._creating = None
        if revision is None:
            self.lost = self.existed = True
        else:
            self.revision = revision
        if self.lost:
            raise LeaseLost(self.run_id)

    async def flush(self) -> None:
        """Write what is deferred, if anything is (first waiting until the journal is stored)."""
        await self.confirm()
        if self._deferred:
            await self.write(unchanged)

    async def write(
        self, change: Callable[[RunRecord], None], *, release: bool = False, carry: bool = True
    ) -> None:
        """Apply the deferred changes (unless not `carry`) and `change` to the record, and store it.

        The lease is renewed, or with `release` given up.

        Raises `LeaseLost` if another process wrote since (the change is not applied), `RecordTooLarge`
        if the record would exceed its limit (nothing is written).
        """
        async with self._lock:
            await self.confirm()
            if self.lost:
                raise LeaseLost(self.run_id)
            updated = msgspec.structs.replace(
                self.record,
                steps=dict(self.record.steps),
                undos=list(self.record.undos),
                positions=dict(self.record.positions),
            )
            deferred = self._deferred[:] if carry else []
            for earlier, _then in deferred:
                earlier(updated)
            change(updated)
            now = self.clock.time()
            updated.updated = now
            if release:
                updated.owner = ""
                updated.lease_until = 0.0
            else:
                updated.lease_until = now + self.lease_s
            data = encode_record(updated, self.limit)
            try:
                self.revision = await self.kv.update(run_key(self.run_id), data, last=self.revision)
            except KeyWrongLastSequenceError:
                self.lost = True
                raise LeaseLost(self.run_id) from None
            self.record = updated
            self.released = release
            del self._deferred[: len(deferred)]
        for _change, then in deferred:
            if then is not None:
                task = asyncio.ensure_future(then())
                _AFTER_WRITES.add(task)
                task.add_done_callback(_AFTER_WRITES.discard)

    async def renew(self) -> None:
        """Extend the lease, unless it was given back (raises `LeaseLost` like `write`)."""
        if not self.released:
            try:
                await self.write(unchanged)
            except RecordTooLarge:
                # What is deferred makes the journal too large: the next step's own write says so (the
                # step fails with the reason); the lease is renewed all the same.
                await self.write(unchanged, carry=False)


#: `RunHandle.defer`'s `then`s under way (asyncio keeps only weak references to tasks).
_AFTER_WRITES: Final[set[asyncio.Future[None]]] = set()


async def after_writes(timeout: float) -> None:
    """Wait up to `timeout` seconds for what `RunHandle.defer`'s `then`s started (an engine stopping)."""
    pending = set(_AFTER_WRITES)
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def unchanged(_record: RunRecord) -> None:
    """A change that changes nothing: a write that renews the lease, carries deferred entries, or releases."""
