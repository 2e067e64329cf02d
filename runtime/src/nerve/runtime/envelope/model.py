"""The envelope: CloudEvents 1.0 attributes on every message nerve moves or keeps.

`Event` (a reading or a discrete happening), `Command` (a request to a device, signed), `CommandResult`
(what the device did about it) and `Fact` (an audit record, kept forever). Each has `specversion, id,
source, type, subject (the device), time, data` plus the extensions `correlationid` (the chain it belongs
to), `causationid` (the message that caused it) and `hops` (how many reactions deep it is).

Models are frozen and forbid unknown attributes: a signed command must not smuggle fields its signature
does not cover.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from nerve.runtime.fields import DeviceId, Token
from nerve.runtime.plain_envelope import MAX_HOPS, new_id, to_int, to_utc_time, utcnow

UtcTime = Annotated[datetime, BeforeValidator(to_utc_time)]
MessageId = Annotated[str, Field(min_length=1, max_length=128)]


_MAX_HOPS = MAX_HOPS

_DERIVED_NAMESPACE = uuid.UUID("6f1c1f1e-5e7a-4f43-9a35-8f2f3b9a6a10")


def derived_id(*parts: str) -> str:
    """A message id determined by `parts` (UUID5): the same reaction to the same cause gets the same id.

    This is what makes reactions idempotent: a handler that runs twice for one event publishes messages
    with the same ids, and JetStream's dedup stores them once.
    """
    return uuid.uuid5(_DERIVED_NAMESPACE, "\x1f".join(parts)).hex


class Envelope(BaseModel):
    """Attributes shared by every nerve message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: MessageId = Field(default_factory=new_id)
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=128)
    subject: DeviceId
    time: UtcTime = Field(default_factory=utcnow)
    data: dict[str, Any] = Field(default_factory=dict)
    correlationid: MessageId | None = None
    causationid: MessageId | None = None
    # Time attributes and hops are read by the coercions the lean edge's parser uses too
    # (nerve.runtime.plain_envelope), so the two accept the same documents.
    hops: Annotated[int, BeforeValidator(to_int)] = Field(default=0, ge=0, le=_MAX_HOPS)

    def caused(self) -> dict[str, Any]:
        """Attributes for a message caused by this one: same chain, one hop further."""
        return {
            "correlationid": self.correlationid or self.id,
            "causationid": self.id,
            # Capped: an answer to a message at the limit must still be a valid message.
            "hops": min(self.hops + 1, _MAX_HOPS),
        }


class Event(Envelope):
    """Something that happened on a device: a reading (`nerve.telemetry.<metric>`) or an event."""


class Command(Envelope):
    """A request for a device to run an allow-listed `action` with `data` as its arguments.

    Valid only until `expires`, and only with a signature (`keyid`, `sig`) by a key the device trusts.
    """

    action: Token
    expires: UtcTime
    keyid: str = ""
    sig: str = ""

    @classmethod
    def create(
        cls,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        source: str,
        ttl: timedelta,
        cause: Envelope | None = None,
        command_id: str | None = None,
    ) -> Self:
        """A new unsigned command that expires `ttl` from now, chained to `cause` if given."""
        now = utcnow()
        chain = cause.caused() if cause is not None else {}
        return cls(
            id=command_id or new_id(),
            source=source,
            type=f"nerve.command.{action}",
            subject=device,
            time=now,
            data=args,
            action=action,
            expires=now + ttl,
            **chain,
        )


ResultStatus = Literal["ok", "failed", "rejected", "expired", "unknown"]


class CommandResult(Envelope):
    """What a device did with a command: `causationid` is the command's id."""

    action: Token
    status: ResultStatus
    reason: str = ""

    @classmethod
    def for_command(
        cls,
        command: Command,
        *,
        source: str,
        status: ResultStatus,
        reason: str = "",
        data: dict[str, Any] | None = None,
        result_id: str | None = None,
    ) -> Self:
        """The result of `command`, chained to it."""
        return cls(
            id=result_id or new_id(),
            source=source,
            type=f"nerve.result.{command.action}",
            subject=command.subject,
            action=command.action,
            status=status,
            reason=reason,
            data=data or {},
            **command.caused(),
        )


class Fact(Envelope):
    """An audit record: what nerve saw, decided and did. Kept forever in NERVE_FACTS.

    `kind` (a token) is the last level of its subject; `summary` is one line a person can read.
    """

    kind: Token
    summary: str = ""
