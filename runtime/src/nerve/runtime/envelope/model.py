"""The envelope: CloudEvents 1.0 attributes on every message nerve moves or keeps, as msgspec Structs.

`Event` (a reading or a discrete happening), `Command` (a request to a device, signed), `CommandResult`
(what the device did about it) and `Fact` (an audit record, kept forever). Each has the CloudEvents
attributes `specversion, id, source, type, subject, time, data` plus nerve's extensions `correlationid`
(the chain it belongs to), `causationid` (the message that caused it) and `hops` (how many reactions
deep it is).

An `Event` is any valid CloudEvent: the optional `datacontenttype`, `dataschema`, `subject` and `time`,
`data` of any JSON type or `data_base64`, and extension attributes, which it keeps as they came in
`extensions`. `Command`, `CommandResult` and `Fact` forbid anything they do not define: a signed command
must not carry attributes its signature does not cover.

Every constraint is checked while msgspec decodes (`nerve.runtime.envelope.codec`), and by
`Command.create`, which validates as a decoder does. A message built in code by its constructor gets the
checks of `__post_init__` (data, extensions, a command's times) but not the lengths and patterns: msgspec
checks those only when it decodes. The limits are in docs/envelope.md.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Self

import msgspec
from msgspec import Meta, Struct, field

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "EXTENSIONS_FIELD",
    "LATEST_COMMAND_TIME",
    "MAX_DATA_DEPTH",
    "MAX_HOPS",
    "MAX_ID_CHARS",
    "Command",
    "CommandResult",
    "Envelope",
    "Event",
    "ExtensionValue",
    "Fact",
    "ResultStatus",
    "check_extensions",
    "derived_id",
    "new_id",
    "utcnow",
]

MAX_ID_CHARS: Final = 128
MAX_HOPS: Final = 1_000_000
#: How deep `data` may nest (a map or list inside a map counts 2): deeper is refused, never a RecursionError.
MAX_DATA_DEPTH: Final = 32
_MAX_SOURCE_CHARS: Final = 256
_MAX_TYPE_CHARS: Final = 128
_MAX_SUBJECT_CHARS: Final = 256
_MAX_URI_CHARS: Final = 1024
_MAX_EXTENSION_NAME_CHARS: Final = 64
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_EXTENSION_NAME: Final = re.compile(r"[a-z0-9]+", re.ASCII)
#: A command's times must be before this (UTC): later ones leave no room for clock arithmetic.
LATEST_COMMAND_TIME: Final = datetime(9000, 1, 1, tzinfo=UTC)
_DERIVED_NAMESPACE: Final = uuid.UUID("6f1c1f1e-5e7a-4f43-9a35-8f2f3b9a6a10")
_IDS_PER_READ: Final = 256
_ids: Final[deque[str]] = deque()
os.register_at_fork(after_in_child=_ids.clear)

#: Where `Event.extensions` sits in a struct's own encoding: a name no CloudEvents attribute can have, so
#: a document can never fill it by accident. The codec writes extensions as top-level attributes instead.
EXTENSIONS_FIELD: Final = "__extensions__"

MessageId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Source = Annotated[str, Meta(min_length=1, max_length=_MAX_SOURCE_CHARS)]
TypeName = Annotated[str, Meta(min_length=1, max_length=_MAX_TYPE_CHARS)]
Subject = Annotated[str, Meta(min_length=1, max_length=_MAX_SUBJECT_CHARS)]
Uri = Annotated[str, Meta(min_length=1, max_length=_MAX_URI_CHARS)]
#: A device id, metric or action: what `nerve.runtime.subjects.is_token` accepts.
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Time = Annotated[datetime, Meta(tz=True)]
Hops = Annotated[int, Meta(ge=0, le=MAX_HOPS)]
ExtensionValue = str | bool | int | float
ResultStatus = Literal["ok", "failed", "rejected", "expired", "unknown"]


def new_id() -> str:
    """A fresh message id: 32 hex digits of 128 random bits from `os.urandom` (unguessable, like a UUID4).

    The bits are read for `_IDS_PER_READ` ids at a time: one system call per id was a fifth of the
    bridge's time wrapping raw readings. `deque.popleft` is atomic, so two threads never get the same
    id, and a forked child starts with an empty pool, so it never repeats its parent's.
    """
    try:
        return _ids.popleft()
    except IndexError:
        digits = os.urandom(16 * _IDS_PER_READ).hex()
        _ids.extend(digits[start : start + 32] for start in range(32, len(digits), 32))
        return digits[:32]


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def derived_id(*parts: str) -> str:
    """A message id determined by `parts` (UUID5): the same reaction to the same cause gets the same id.

    This is what makes reactions idempotent: a handler that runs twice for one event publishes messages
    with the same ids, and JetStream's dedup stores them once.
    """
    return _uuid5_hex("\x1f".join(parts))


@functools.lru_cache(maxsize=4096)
def _uuid5_hex(name: str) -> str:
    """`uuid.uuid5(_DERIVED_NAMESPACE, name).hex`, without building a UUID.

    A run derives the same ids over and over: 7 % of central's CPU per disk incident went to `uuid.UUID`.
    """
    digest = bytearray(
        hashlib.sha1(_DERIVED_NAMESPACE.bytes + name.encode(), usedforsecurity=False).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


def _spec_version() -> Literal["1.0"]:
    # A factory, not a plain default: with `omit_defaults` a plain default would be left out of the
    # encoding, and CloudEvents requires `specversion` in every event.
    return "1.0"


def _check_scalar(item: object, where: str) -> None:
    if isinstance(item, float):
        if not math.isfinite(item):
            raise ValueError(f"{where}: {item!r} is not a number JSON can carry")
    elif isinstance(item, int) and not isinstance(item, bool):
        if not _INT64_MIN <= item <= _UINT64_MAX:
            raise ValueError(f"{where}: integer {item} does not fit in 64 bits")
    elif item is not None and not isinstance(item, str | bool):
        raise ValueError(f"{where}: a {type(item).__name__} is not JSON data")


def _is_flat_json(value: object) -> bool:
    """Tell whether `value` is a map of string keys to common scalars only (a reading): JSON for sure."""
    if type(value) is not dict:
        return False
    for key, inner in value.items():
        inner_kind = type(inner)
        if type(key) is not str:
            return False
        if inner_kind is str or inner_kind is bool or inner is None:
            continue
        if inner_kind is float:
            if inner - inner:  # nan for inf and nan, 0.0 otherwise
                return False
            continue
        if inner_kind is not int or not _INT64_MIN <= inner <= _UINT64_MAX:
            return False
    return True


def _check_json(value: object, where: str) -> None:  # noqa: C901 - one loop, kept flat for speed
    """Raise `ValueError` unless `value` is JSON data: finite, 64-bit, string keys, MAX_DATA_DEPTH deep.

    Iterative, so a document nested thousands deep is refused, never a RecursionError. On every decode:
    common scalars (str, bool, None, finite floats, small ints) are passed over inline, and a flat map
    of them (a reading) is done in one pass (`_is_flat_json`) before the general walk is set up.
    """
    if _is_flat_json(value):
        return
    stack: list[tuple[object, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        kind = type(item)
        pairs: Iterable[tuple[object, object]]
        if type(item) is dict:
            pairs = item.items()
        elif type(item) is list:
            pairs = enumerate(item)
        else:
            _check_scalar(item, where)
            continue
        if depth > MAX_DATA_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DATA_DEPTH} levels")
        for key, inner in pairs:
            if kind is dict and type(key) is not str:
                raise ValueError(f"{where}: map keys must be strings, not {type(key).__name__}")
            inner_kind = type(inner)
            if inner_kind is str or inner_kind is bool or inner is None:
                continue
            if type(inner) is float:
                if inner - inner:  # nan for inf and nan, 0.0 otherwise
                    raise ValueError(f"{where}: {inner!r} is not a number JSON can carry")
                continue
            if type(inner) is int and _INT64_MIN <= inner <= _UINT64_MAX:
                continue
            push((inner, depth + 1))


@functools.lru_cache(maxsize=1024)
def _extension_name(name: object) -> bool:
    """Whether `name` may name an extension (cached: a producer uses the same few names again and again)."""
    return (
        isinstance(name, str)
        and len(name) <= _MAX_EXTENSION_NAME_CHARS
        and _EXTENSION_NAME.fullmatch(name) is not None
        and name not in _EVENT_ATTRIBUTES
    )


def check_extensions(extensions: Mapping[str, object]) -> None:
    """Raise `ValueError` naming the first extension attribute that CloudEvents 1.0 does not allow.

    Names are 1-64 of a-z and 0-9 and not one of the attributes nerve defines; values are strings,
    booleans or finite numbers (integers within 64 bits).
    """
    for name, value in extensions.items():
        if not _extension_name(name):
            if name in _EVENT_ATTRIBUTES:
                raise ValueError(f"extension {name!r} is an attribute of its own, not an extension")
            raise ValueError(
                f"attribute name {name!r} is not valid: CloudEvents attribute names are 1 to "
                f"{_MAX_EXTENSION_NAME_CHARS} of the characters a-z and 0-9"
            )
        if type(value) is str or type(value) is bool:
            continue
        if type(value) is int:
            if not _INT64_MIN <= value <= _UINT64_MAX:
                raise ValueError(f"extension {name!r}: integer {value} does not fit in 64 bits")
            continue
        if type(value) is float:
            if value - value:  # nan for inf and nan
                raise ValueError(f"extension {name!r}: {value!r} is not a number JSON can carry")
            continue
        raise ValueError(
            f"extension {name!r}: a value must be a string, a number or a boolean, got {type(value).__name__}"
        )


class Envelope(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Attributes shared by every nerve message (attributes at their default are left out when encoded).

    `time` is each model's own: optional on an `Event` (CloudEvents), now by default on the others.
    """

    specversion: Literal["1.0"] = field(default_factory=_spec_version)
    id: MessageId = field(default_factory=new_id)
    source: Source
    type: TypeName
    subject: Subject | None = None
    data: Any = None
    correlationid: MessageId | None = None
    causationid: MessageId | None = None
    hops: Hops = 0

    def __post_init__(self) -> None:
        """Check what constraints on one field cannot say (raises `ValueError`)."""
        if self.data is not None:
            _check_json(self.data, "data")

    def caused(self) -> dict[str, Any]:
        """Attributes for a message caused by this one: same chain, one hop further."""
        return {
            "correlationid": self.correlationid or self.id,
            "causationid": self.id,
            # Capped: an answer to a message at the limit must still be a valid message.
            "hops": min(self.hops + 1, MAX_HOPS),
        }


class Event(Envelope, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Something that happened: a reading (`nerve.telemetry.<metric>`), a device's or a service's event.

    Any CloudEvent 1.0: `subject`, `time` (None unless given), `datacontenttype`, `dataschema` are
    optional, `data` is any JSON value (or `data_base64` binary data, never both), and `extensions`
    holds the extension attributes as they came (names of a-z and 0-9; string, number or boolean values).
    """

    # Optional in CloudEvents: an event that came without one is kept without one (pass `time=utcnow()`).
    time: Time | None = None
    datacontenttype: Subject | None = None
    dataschema: Uri | None = None
    data_base64: bytes | None = None
    extensions: dict[str, ExtensionValue] = field(default_factory=dict, name=EXTENSIONS_FIELD)

    def __post_init__(self) -> None:
        """Check data, data_base64 and extensions together (raises `ValueError`)."""
        if self.data is not None:
            _check_json(self.data, "data")
            if self.data_base64 is not None:
                raise ValueError("data and data_base64: an event carries one or the other, not both")
        if self.extensions:
            check_extensions(self.extensions)


class Command(Envelope, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A request for device `subject` to run an allow-listed `action` with `data` as its arguments.

    Valid only until `expires`, and only with a signature (`keyid`, `sig`) by a key the device trusts;
    the signature covers every attribute but `sig` (`nerve.runtime.trust.signing.canonical_bytes`).
    """

    subject: Token
    time: Time = field(default_factory=utcnow)
    data: dict[str, Any] = field(default_factory=dict)
    action: Token
    expires: Time
    keyid: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        """Check data, and that `time` and `expires` are times a device can compute with."""
        super().__post_init__()
        for name, moment in (("time", self.time), ("expires", self.expires)):
            try:
                in_utc = moment.astimezone(UTC)
            except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
                raise ValueError(f"{name}: out of range once converted to UTC") from None
            if in_utc >= LATEST_COMMAND_TIME:
                raise ValueError(f"{name}: must be before {LATEST_COMMAND_TIME.year}-01-01T00:00:00Z")

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
        """A new unsigned command that expires `ttl` from now, chained to `cause` if given.

        Raises `ValueError` (or `msgspec.ValidationError`, a subclass) for attributes that are not valid.
        """
        now = utcnow()
        chain = cause.caused() if cause is not None else {}
        return msgspec.convert(
            {
                "id": command_id or new_id(),
                "source": source,
                "type": f"nerve.command.{action}",
                "subject": device,
                "time": now,
                "data": args,
                "action": action,
                "expires": now + ttl,
                **chain,
            },
            cls,
            from_attributes=False,
            builtin_types=(datetime,),
        )


class CommandResult(Envelope, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """What device `subject` did with a command: `causationid` is the command's id.

    Signed by the device (`keyid`, its device id, and `sig`) over every attribute but `sig`
    (`nerve.runtime.trust.signing.canonical_bytes`): central acts only on a result that verifies against
    the key registered for `subject` (`nerve.runtime.trust.devices`).
    """

    subject: Token
    time: Time = field(default_factory=utcnow)
    data: dict[str, Any] = field(default_factory=dict)
    action: Token
    status: ResultStatus
    reason: str = ""
    keyid: Annotated[str, Meta(max_length=64)] = ""
    sig: Annotated[str, Meta(max_length=128)] = ""

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
        subject: str | None = None,
    ) -> Self:
        """The result of `command`, chained to it; from `subject` (default: the command's device)."""
        return cls(
            id=result_id or new_id(),
            source=source,
            type=f"nerve.result.{command.action}",
            subject=subject or command.subject,
            action=command.action,
            status=status,
            reason=reason,
            data=data or {},
            **command.caused(),
        )


class Fact(Envelope, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """An audit record: what nerve saw, decided and did. Kept forever in NERVE_FACTS.

    `subject` is the device (or service) it is about; `kind` (a token) is the last level of its
    subject; `summary` is one line a person can read. `chainseq`, `prevhash`, `keyid` and `sig` make it
    tamper-evident (`nerve.runtime.trust.chain`): its place in NERVE_FACTS, the SHA-256 of the record
    stored before it, and the Ed25519 signature over every other attribute. A fact without them is a
    legacy (unsigned) one.
    """

    subject: Token
    time: Time = field(default_factory=utcnow)
    data: dict[str, Any] = field(default_factory=dict)
    kind: Token
    summary: str = ""
    chainseq: Annotated[int, Meta(ge=0)] = 0
    prevhash: Annotated[str, Meta(max_length=64)] = ""
    keyid: Annotated[str, Meta(max_length=64)] = ""
    sig: Annotated[str, Meta(max_length=128)] = ""


# The CloudEvents attributes and nerve's own: an extension may not take one of these names.
_EVENT_ATTRIBUTES: Final = frozenset(
    {*Event.__struct_encode_fields__, "data_base64", "data"} - {EXTENSIONS_FIELD}
)
