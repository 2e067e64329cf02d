"""`AgentHarness`: durable agents run in one process, on the in-memory JetStream or a real nats-server.

```python
async with AgentHarness(agents=[payment_recovery], binding="memory") as h:
    event = await h.publish_event("payment_failed", {"order": "o-1"})
    run_id = payment_recovery.run_id(event.id)
    await h.wait_for_run(run_id, state="waiting")
    await h.advance(3600)  # the wait times out: the run compensates
    assert await h.run_state(run_id) == "compensated"
```

A command step's device answers through `answer`, signed by the device's key (made on first use, in
the harness's own device registry):

```python
(command,) = await h.commands("clear_temp")
await h.answer(command, status="ok", data={"files_deleted": 3})
```

The same test runs on both bindings (`binding="nats"` starts a nats-server of its own, or uses
`nats_url`). On "memory" the engine's clock is a `FakeClock` that `advance` moves; on "nats" time is
real and `advance` waits that long (keep sleeps and timeouts short in a test that runs on both).
docs/testing-agents.md says how to use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Self, TypeVar, cast

from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from nerve.runtime.config.settings import NatsSettings
from nerve.runtime.engine.clock import SYSTEM_CLOCK
from nerve.runtime.engine.engine import Engine, ensure_engine_storage, wait_for_run
from nerve.runtime.engine.journal import DECODER, RunRecord
from nerve.runtime.engine.names import RUN_KEY_PREFIX, RUNS_BUCKET, RUNS_STREAM
from nerve.runtime.engine.settings import EngineSettings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, Envelope, Event, Fact, ResultStatus, new_id
from nerve.runtime.errors import DecodeError, NerveError
from nerve.runtime.harness.crash import CrashWhen, Gate, GatedNats
from nerve.runtime.harness.memory import FakeClock, MemoryJetStream
from nerve.runtime.jetstream.client import connect, publish_envelope
from nerve.runtime.jetstream.streams import FACTS_STREAM, STREAM_OF_KIND, ensure_streams
from nerve.runtime.stack.brokers import NatsServer, free_port
from nerve.runtime.subjects import DEFAULT_PREFIX, Address, Kind, is_token
from nerve.runtime.testing import StoredMessage, provision_device
from nerve.runtime.trust.devices import DeviceKeys

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType
    from typing import Any

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.agent import DurableAgent
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Envelope)

Binding = Literal["memory", "nats"]
BINDINGS: Final[tuple[Binding, ...]] = ("memory", "nats")
#: Leases in the harness: a crashed engine's runs are resumed after 1.5 of them.
HARNESS_SETTINGS: Final = EngineSettings(lease_s=1.0)
WAIT_TIMEOUT_S: Final = 10.0
_SETTLE_ROUNDS: Final = 20
_POLL_S: Final = 0.01
RESTART_TIMEOUT_S: Final = 60.0


class HarnessError(NerveError):
    """The harness was used wrong, or what it waited for did not happen; the message says which."""


class AgentHarness:
    """Runs `agents` in one engine on `binding`; crashes and restarts it; says what happened.

    - `crash_at` (1-based) kills the engine at that journal write of any run (`crash_when`: "before"
      it is stored or "after"), then starts a new engine, as a restarted central process would;
      `journal_writes` counts the writes so far, so a test can enumerate every boundary.
    - `deliver_twice`: every message the engine is given (triggers, timers, waited-for events) comes
      twice.
    - `signer` signs (and chains) the facts the agents keep, and the commands they send; without one
      facts are kept unsigned (and a command step cannot send).
    - The engine believes the results of the devices of the harness's own registry (`device`, `answer`).

    Raises `HarnessError` if the engine or the broker cannot start.
    """

    def __init__(
        self,
        *,
        agents: Sequence[DurableAgent],
        binding: Binding = "memory",
        settings: EngineSettings = HARNESS_SETTINGS,
        prefix: str = DEFAULT_PREFIX,
        signer: Signer | None = None,
        deliver_twice: bool = False,
        crash_at: int | None = None,
        crash_when: CrashWhen = "after",
        nats_url: str | None = None,
    ) -> None:
        if binding not in BINDINGS:
            raise HarnessError(f"binding {binding!r}: use one of {', '.join(BINDINGS)}")
        if crash_at is not None and crash_at < 1:
            raise HarnessError(f"crash_at {crash_at!r}: journal writes are counted from 1")
        if crash_when not in ("before", "after"):
            raise HarnessError(f"crash_when {crash_when!r}: use 'before' or 'after'")
        self.agents = tuple(agents)
        self.binding: Binding = binding
        self.settings = settings
        self.prefix = prefix
        self.deliver_twice = deliver_twice
        self.crash_at = crash_at
        self.crash_when: CrashWhen = crash_when
        self._signer = signer
        self._nats_url = nats_url
        #: The fake clock (binding "memory"), or None (real time).
        self.clock: FakeClock | None = None
        self._server: MemoryJetStream | None = None
        self._stack = contextlib.AsyncExitStack()
        self._nc: NatsClient | None = None
        self._kv: KeyValue | None = None
        self._engine: Engine | None = None
        self._engine_nc: NatsClient | None = None
        self._gate: Gate | None = None
        self._crashed = asyncio.Event()
        self._restarting = asyncio.Lock()
        self._restarted = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        #: Journal writes (runs' KV writes) by every engine so far.
        self.journal_writes = 0
        #: How many times an engine was killed.
        self.crashes = 0
        self._engines = 0
        #: The harness's device registry (a temporary directory) and its devices' signers.
        self._registry: Path | None = None
        self._devices: dict[str, Signer] = {}

    # --- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the broker (or the in-memory one) and an engine."""
        try:
            if self.binding == "memory":
                self.clock = FakeClock()
                self._server = MemoryJetStream(self.clock)
            elif self._nats_url is None:
                self._nats_url = await self._start_nats_server()
            self._registry = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="nerve-harness-devices-"))
            )
            self._nc = await self._connect()
            js = self._nc.jetstream()
            await ensure_streams(js, self.prefix)
            self._kv = await ensure_engine_storage(js, self.prefix, self.settings)
            await self._start_engine()
        except BaseException:
            await self._close()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="harness-supervisor")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the engine and the broker."""
        await self._close()

    async def _close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._stop_engine()
        if self._nc is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._nc.close()
            self._nc = None
        await self._stack.aclose()
        self._registry = None
        self._devices.clear()

    async def _start_nats_server(self) -> str:
        data_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="nerve-harness-")))
        try:
            server = await self._stack.enter_async_context(
                NatsServer(port=free_port(), data_dir=data_dir / "nats-server")
            )
        except NerveError as exc:
            raise HarnessError(f"cannot start nats-server: {exc}") from None
        return server.url

    async def _connect(self) -> NatsClient:
        if self._server is not None:
            return cast("NatsClient", self._server.connect())
        try:
            return await connect(NatsSettings(url=self._nats_url or ""), name="nerve-harness")
        except NerveError as exc:
            raise HarnessError(f"cannot connect to {self._nats_url}: {exc}") from None

    async def _start_engine(self) -> None:
        self._engines += 1
        self._engine_nc = await self._connect()
        self._gate = Gate(
            on_write=self._on_write, on_crash=self._crashed.set, deliver_twice=self.deliver_twice
        )
        self._engine = Engine(
            nc=cast("NatsClient", GatedNats(self._engine_nc, self._gate)),
            agents=self.agents,
            prefix=self.prefix,
            settings=self.settings,
            signer=self._signer,
            instance=f"harness-engine-{self._engines}",
            clock=self.clock or SYSTEM_CLOCK,
            # Read again at every result: a device the test adds is known at once.
            device_keys=None
            if self._registry is None
            else DeviceKeys(self._registry / "registry", recheck_s=0),
        )
        await self._engine.__aenter__()
        await self._settle()

    async def _stop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.__aexit__(None, None, None)
        nc, self._engine_nc = self._engine_nc, None
        if nc is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await nc.close()

    def _on_write(self) -> CrashWhen | None:
        self.journal_writes += 1
        return self.crash_when if self.journal_writes == self.crash_at else None

    async def _supervise(self) -> None:
        """Restart the engine whenever a planned crash killed it."""
        while True:
            await self._crashed.wait()
            await self._restart()

    async def _restart(self) -> None:
        async with self._restarting:
            self._crashed.clear()
            self.crashes += 1
            log.info("harness: engine %d crashed; starting another", self._engines)
            await self._stop_engine()
            await self._start_engine()
            # The dead engine's leases run out (1.5 leases: the new engine's watchdog looks twice).
            for _ in range(3):
                await self.advance(self.settings.lease_s / 2)
            self._restarted.set()

    async def crash_and_restart(self) -> None:
        """Kill the engine now (as `kill -9`: its leases are not given back) and start another.

        Returns once the new engine runs and the dead one's leases have run out (1.5 leases of time:
        instant on "memory", real seconds on "nats").
        """
        if self._gate is None or self._supervisor is None:
            raise HarnessError("the harness has not started")
        self._restarted.clear()
        self._gate.crash()  # the supervisor restarts it
        try:
            async with asyncio.timeout(RESTART_TIMEOUT_S):
                await self._restarted.wait()
        except TimeoutError:
            raise HarnessError(f"no engine started again within {RESTART_TIMEOUT_S:g}s") from None

    # --- time ----------------------------------------------------------------------------------------

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass: the fake clock jumps ("memory"), or the test waits that long ("nats").

        Timers that came due fire, and messages not acknowledged within their ack wait come again.
        """
        if seconds < 0:
            raise HarnessError(f"advance({seconds!r}): time does not go back")
        if self.clock is None:
            await asyncio.sleep(seconds)
            return
        await self._settle()
        self.clock.advance(seconds)
        await self._settle()

    async def _settle(self) -> None:
        """Let what is ready to run (deliveries, callbacks) run before the clock moves again."""
        for _ in range(_SETTLE_ROUNDS):
            await asyncio.sleep(0)

    # --- input ---------------------------------------------------------------------------------------

    async def publish(self, envelope: Envelope, *, kind: Kind = Kind.EVENTS) -> Envelope:
        """Store `envelope` as a `kind` message of its subject (the device or service) named its type.

        An event `Event(type="payment_failed", subject="shop", ...)` lands on
        `nerve.shop.events.payment_failed`. Raises `HarnessError` if its subject or type is not a token.
        """
        if not is_token(envelope.subject or ""):
            raise HarnessError(
                f"envelope {envelope.id}: its subject {envelope.subject!r} names no device or service"
            )
        if not is_token(envelope.type):
            raise HarnessError(f"envelope {envelope.id}: its type {envelope.type!r} is not a token")
        subject = Address(device=envelope.subject or "", kind=kind, name=envelope.type).subject(self.prefix)
        await publish_envelope(self._js, subject, envelope)
        return envelope

    async def publish_event(
        self,
        event_type: str,
        data: dict[str, object],
        *,
        source: str = "shop",
        event_id: str | None = None,
        kind: Kind = Kind.EVENTS,
    ) -> Event:
        """Publish an event of `event_type` from `source` (`nerve.<source>.<kind>.<event_type>`)."""
        event = Event(
            id=event_id or new_id(), source=f"nerve://{source}", type=event_type, subject=source, data=data
        )
        await self.publish(event, kind=kind)
        return event

    def device(self, name: str) -> Signer:
        """The signer of device `name`'s results, registered in the harness's device registry on first use.

        Raises `HarnessError` if `name` is not a token or the harness has not started.
        """
        if not is_token(name):
            raise HarnessError(f"device {name!r}: not a token (A-Z a-z 0-9 _ -)")
        if self._registry is None:
            raise HarnessError("the harness has not started")
        if name not in self._devices:
            self._devices[name] = provision_device(
                self._registry / "registry", name, keys=self._registry / "keys"
            )
        return self._devices[name]

    async def answer(
        self,
        command: Command,
        *,
        status: ResultStatus = "ok",
        data: dict[str, Any] | None = None,
        reason: str = "",
    ) -> CommandResult:
        """Store the result of `command` as its device would: signed by the device's key (`device`).

        A command step waiting for it returns it.
        """
        result = CommandResult.for_command(
            command, source=f"nerve://{command.subject}", status=status, reason=reason, data=data
        )
        signed = self.device(command.subject).sign(result)
        subject = Address(device=command.subject, kind=Kind.RESULTS, name=command.action).subject(self.prefix)
        await publish_envelope(self._js, subject, signed)
        return signed

    # --- what happened -------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine running now."""
        if self._engine is None:
            raise HarnessError("the harness has not started")
        return self._engine

    @property
    def _js(self) -> JetStreamContext:
        if self._nc is None:
            raise HarnessError("the harness has not started")
        return self._nc.jetstream()

    @property
    def js(self) -> JetStreamContext:
        """JetStream on the harness's broker, for what a test stores or reads itself (raises before start)."""
        return self._js

    @property
    def kv(self) -> KeyValue:
        """The runs bucket, read by the harness (never crashed)."""
        if self._kv is None:
            raise HarnessError("the harness has not started")
        return self._kv

    async def run(self, run_id: str) -> RunRecord | None:
        """The journal of run `run_id`, or None if there is none (yet)."""
        try:
            entry = await self.kv.get(f"{RUN_KEY_PREFIX}{run_id}")
        except NotFoundError:
            return None
        return None if not entry.value else DECODER.decode(entry.value)

    async def run_state(self, run_id: str) -> str | None:
        """`open`, `waiting`, `done`, `failed` or `compensated`; None if there is no such run."""
        record = await self.run(run_id)
        return None if record is None else record.state

    async def runs(self) -> list[RunRecord]:
        """Every run's journal, oldest first."""
        prefix = f"$KV.{RUNS_BUCKET}.{RUN_KEY_PREFIX}"
        return [
            DECODER.decode(message.data)
            for message in await self.messages(RUNS_STREAM)
            if message.subject.startswith(prefix) and message.data
        ]

    async def wait_for_run(
        self, run_id: str, *, state: str | None = None, timeout: float = WAIT_TIMEOUT_S
    ) -> RunRecord:
        """The journal of `run_id` once it ended (or, with `state`, once it is in that state).

        The timeout is real seconds on both bindings. Raises `HarnessError` if it did not come to be.
        """
        try:
            async with asyncio.timeout(timeout):
                if state is None:
                    return await wait_for_run(self.kv, run_id, timeout=timeout)
                while True:
                    record = await self.run(run_id)
                    if record is not None and record.state == state:
                        return record
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            last = await self.run(run_id)
            now = "no journal" if last is None else f"it is {last.state}"
            raise HarnessError(f"run {run_id}: not {state or 'ended'} within {timeout:g}s ({now})") from None

    async def wait_for_step(
        self, run_id: str, name: str, *, status: str | None = None, timeout: float = WAIT_TIMEOUT_S
    ) -> RunRecord:
        """The journal of `run_id` once it holds step `name` (with `status`, if given: "done", "waiting"…).

        For instance, to publish the event a `wait_for_event` step waits for once it waits. The timeout is
        real seconds. Raises `HarnessError` if it did not come to be.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    record = await self.run(run_id)
                    step = None if record is None else record.steps.get(name)
                    if record is not None and step is not None and status in (None, step.status):
                        return record
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            raise HarnessError(f"run {run_id}: no step {name!r} {status or ''} within {timeout:g}s") from None

    async def messages(self, stream: str) -> list[StoredMessage]:
        """Every message `stream` holds, in order."""
        try:
            info = await self._js.stream_info(stream)
        except NotFoundError:
            return []
        found = []
        # An empty stream says first 0 (or last+1); nats-server refuses to get sequence 0.
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await self._js.get_msg(stream, seq=seq)
            except NotFoundError:
                continue
            found.append(
                StoredMessage(
                    seq=seq, subject=msg.subject or "", data=msg.data or b"", headers=dict(msg.headers or {})
                )
            )
        return found

    async def facts(self, kind: str | None = None) -> list[Fact]:
        """The facts kept so far (of `kind`, if given), in order."""
        facts = [_decode(message, Fact) for message in await self.messages(FACTS_STREAM)]
        return [fact for fact in facts if kind is None or fact.kind == kind]

    async def commands(self, action: str | None = None) -> list[Command]:
        """The commands sent so far (of `action`, if given), in order."""
        commands = [
            _decode(message, Command) for message in await self.messages(STREAM_OF_KIND[Kind.COMMANDS])
        ]
        return [command for command in commands if action is None or command.action == action]


def _decode(message: StoredMessage, model: type[E]) -> E:
    try:
        return decode(message.data, model)
    except DecodeError as exc:
        raise HarnessError(f"message {message.seq} on {message.subject}: {exc}") from None


__all__ = ["BINDINGS", "HARNESS_SETTINGS", "AgentHarness", "Binding", "HarnessError"]
