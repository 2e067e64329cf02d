"""The Agent API: what a central agent declares, and what it may do.

An agent names the messages it reacts to (`Subscription`s: a kind and a name filter) and handles each
one in `handle`. Everything it does goes through its `AgentContext`: facts, signed commands, key-value
state. Handlers must be safe to run twice for one message (every message can arrive twice): derive the
ids of what a reaction publishes from the cause's id (`derived_id`), and JetStream stores it once.

A handler's outcome is its return or its exception: returning acknowledges the message; raising
`Retry` (or any other exception) has it delivered again, up to the consumer's limit, after which it is
dead-lettered with the reason; raising `Reject` dead-letters it at once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

from nerve.runtime.envelope.model import Command, Envelope, Fact, derived_id
from nerve.runtime.errors import NerveError
from nerve.runtime.jetstream.client import publish_envelope, publish_fact
from nerve.runtime.subjects import Address, Kind, subject_root

if TYPE_CHECKING:
    from datetime import timedelta

    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.trust.signing import Signer

DEFAULT_MAX_HOPS: Final = 8
# The subject of a fact about a message that names no device (CloudEvents makes `subject` optional).
NO_SUBJECT: Final = "unknown"


class Retry(NerveError):
    """Raised by a handler: this message could not be handled now; deliver it again later."""


class Reject(NerveError):
    """Raised by a handler: this message can never be handled; dead-letter it with `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Subscription:
    """Messages of `kind` whose name (metric, event type, action) is `name` (`*` for all)."""

    kind: Kind
    name: str = "*"

    def subject(self, prefix: str) -> str:
        """The NATS subject filter."""
        return f"{subject_root(prefix)}.*.{self.kind.value}.{self.name}"


class AgentContext:
    """What an agent may do: keep facts, send signed commands, reach JetStream."""

    def __init__(self, *, js: JetStreamContext, settings: Settings, signer: Signer, agent: str) -> None:
        self.js = js
        self.settings = settings
        self.prefix = settings.prefix
        self.source = f"nerve://central/{agent}"
        self._signer = signer

    async def fact(
        self,
        cause: Envelope,
        *,
        kind: str,
        summary: str,
        data: dict[str, Any] | None = None,
        key: str = "",
    ) -> Fact:
        """Keep a fact about `cause` (once: its id derives from the cause, the kind and `key`)."""
        fact = Fact(
            id=derived_id(cause.id, "fact", kind, key),
            source=self.source,
            type=f"nerve.fact.{kind}",
            subject=cause.subject or NO_SUBJECT,
            kind=kind,
            summary=summary,
            data=data or {},
            correlationid=cause.correlationid or cause.id,
            causationid=cause.id,
            hops=cause.hops,
        )
        await publish_fact(
            self.js, fact, prefix=self.prefix, signer=self._signer, codec=self.settings.nats.codec
        )
        return fact

    async def command(
        self,
        cause: Envelope,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        ttl: timedelta,
    ) -> Command:
        """Sign and send `action` to `device` because of `cause` (once: its id derives from the cause)."""
        command = Command.create(
            device=device,
            action=action,
            args=args,
            source=self.source,
            ttl=ttl,
            cause=cause,
            command_id=derived_id(cause.id, "command", device, action),
        )
        signed = self._signer.sign(command)
        subject = Address(device=device, kind=Kind.COMMANDS, name=action).subject(self.prefix)
        await publish_envelope(self.js, subject, signed, codec=self.settings.nats.codec)
        return signed


class Agent(abc.ABC):
    """A central agent: declares its subscriptions and handles what they deliver."""

    #: Unique per agent; names its durable consumers (`nerve-agent-<name>-<kind>`).
    name: ClassVar[str]
    subscriptions: ClassVar[tuple[Subscription, ...]]

    async def start(self, ctx: AgentContext) -> None:  # noqa: B027 - optional hook
        """Prepare (create KV buckets, …) before the first message. Default: nothing."""

    async def tick(self, ctx: AgentContext) -> None:  # noqa: B027 - optional hook
        """Called about once a second: time-based work (timeouts). Default: nothing."""

    @abc.abstractmethod
    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """React to one message. Must be idempotent; see the module docstring for outcomes."""
