"""Envelopes as plain data, without pydantic: what the lean edge process (`nerve.edge.main`) reads and writes.

The pydantic models of `nerve.runtime.envelope.model` stay the definition; this module mirrors them for the
edge, which must stay small (pydantic and the models cost ~10 MiB of RSS):

- `parse_command` / `decode_command`: a `Command` document into a `PlainCommand`, with the same checks
  (unknown keys, types, lengths, tokens, times, hops bounds); `DecodeError` names what is wrong;
- `PlainResult` and `event_bytes`: a `CommandResult` or an `Event` as the msgpack bytes the pydantic
  model would encode (same keys, same order, same time format);
- `to_utc_time` and `to_int`: the lax coercions of time attributes and `hops`, shared with the
  pydantic models (as before-validators) so the two parsers cannot drift apart.

tests/runtime/test_plain_envelope.py proves with hypothesis that `parse_command` accepts exactly what
`Command` accepts, with the same values.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Final

import msgpack

from nerve.runtime.errors import DecodeError, PayloadTooLarge
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_MAX_PAYLOAD: Final = 64 * 1024
MAX_ID_CHARS: Final = 128
MAX_HOPS: Final = 1_000_000
RESULT_STATUSES: Final = ("ok", "failed", "rejected", "expired", "unknown")
_MSGPACK_MAP_FIRST_BYTES: Final = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})
_SHOWN_ERRORS: Final = 5
# Timestamps beyond this many seconds are read as milliseconds (as pydantic does).
_MS_WATERSHED: Final = 20_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROS: Final = 1_000_000
_TIME_PATTERN: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt _](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?)?",
    re.ASCII,
)
_NUMBER_PATTERN: Final = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?", re.ASCII)
_INT_PATTERN: Final = re.compile(r"[+-]?\d+(?:_\d+)*(?:\.0+)?", re.ASCII)
_MAX_OFFSET_MINUTES: Final = 24 * 60


def is_msgpack_map(payload: bytes) -> bool:
    """Tell whether `payload` starts like a msgpack map (and so cannot be JSON text)."""
    return bool(payload) and payload[0] in _MSGPACK_MAP_FIRST_BYTES


def load_document(payload: bytes) -> object:
    """Parse msgpack or JSON bytes into Python data; raise `DecodeError` saying why not."""
    if is_msgpack_map(payload):
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise DecodeError(f"malformed msgpack: {exc}") from None
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise DecodeError("payload is neither msgpack nor UTF-8 text") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long int, too deeply nested
        raise DecodeError(f"payload is not valid JSON: {exc}") from None


# --- coercions shared with the pydantic models --------------------------------------------------------


def _from_micros(micros: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError("a unix timestamp must be a date from year 1 to 9999") from None


def _timestamp(numerator: int, denominator: int) -> datetime:
    """The UTC time `numerator / denominator` seconds (milliseconds past 2e10) after the epoch."""
    if abs(numerator) > _MS_WATERSHED * denominator:
        denominator *= 1000
    # Rounded to the nearest microsecond, halves away from zero, in exact integer arithmetic.
    scaled, rest = divmod(abs(numerator) * _MICROS, denominator)
    if 2 * rest >= denominator:
        scaled += 1
    return _from_micros(-scaled if numerator < 0 else scaled)


def _time_from_text(text: str) -> datetime:
    number = _NUMBER_PATTERN.fullmatch(text)
    if number is not None and (number.group(2) or number.group(3)):
        sign, whole, fraction = number.group(1), number.group(2) or "0", number.group(3) or ""
        numerator = int(whole + fraction) * (-1 if sign == "-" else 1)
        return _timestamp(numerator, 10 ** len(fraction))
    match = _TIME_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a time like 2026-11-25T04:52:40Z or a unix timestamp, got {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    tz: timezone | None = None
    if zulu:
        tz = UTC
    elif sign:
        offset = int(off_h) * 60 + int(off_m)
        if int(off_m) >= 60 or offset >= _MAX_OFFSET_MINUTES:  # noqa: PLR2004 - minutes in an hour
            raise ValueError(f"time offset out of range in {text[:40]!r}")
        tz = timezone(timedelta(minutes=-offset if sign == "-" else offset))
    micros = int((fraction or "")[:6].ljust(6, "0"))
    try:
        return datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), micros, tz
        )
    except ValueError as exc:
        raise ValueError(f"not a valid time {text[:40]!r}: {exc}") from None


def to_utc_time(value: object) -> datetime:  # noqa: C901 - one branch per input type, flat
    """A time attribute as an aware UTC datetime; raise `ValueError` saying why it is not one.

    Takes a datetime with a timezone, an ISO 8601 text (`2026-11-25T04:52:40Z`, `...+01:00`, UTF-8
    bytes too) or a unix timestamp (number or numeric text; milliseconds beyond 2e10).
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError("time is not UTF-8 text") from None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = _time_from_text(value)
    elif isinstance(value, bool):
        raise ValueError("time must be a time, not a boolean")  # noqa: TRY004 - pydantic wants ValueError
    elif isinstance(value, int):
        moment = _timestamp(value, 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("time must be a finite timestamp")
        moment = _timestamp(*value.as_integer_ratio())
    else:
        raise ValueError(f"time must be a time, got {type(value).__name__}")  # noqa: TRY004 - for pydantic
    if moment.tzinfo is None:
        raise ValueError("time must carry a timezone (e.g. 2026-11-25T04:52:40Z)")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ValueError("time is out of range once converted to UTC") from None


def to_int(value: object) -> int:
    """An integer attribute, read laxly as pydantic does: a bool, an integral number, or its text."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError("not a valid integer: not UTF-8 text") from None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError("not a valid integer: a number with a fractional part or not finite")
        return int(value)
    if isinstance(value, str):
        text = value.strip(" \t\n\r\f\v")
        if _INT_PATTERN.fullmatch(text):
            return int(text.split(".", 1)[0])
        raise ValueError(f"not a valid integer: {value[:40]!r}")
    raise ValueError(f"not a valid integer: got {type(value).__name__}")


# --- serialization ----------------------------------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """A UTC datetime as the envelope writes it (as pydantic does): `2026-11-25T04:52:40[.123456]Z`."""
    text = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
    text += f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def jsonable(value: object) -> Any:  # noqa: ANN401, PLR0911 - JSON data, one return per type
    """`value` in the JSON form pydantic gives `data` (`model_dump(mode="json")`).

    Raises `ValueError` (bytes that are not UTF-8) or `TypeError` (a value with no JSON form).
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_key(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    if isinstance(value, datetime):
        return format_time(value.astimezone(UTC)) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"a value of type {type(value).__name__} has no JSON form")


def _key(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode()
    return str(jsonable(key))


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a JSON-form document: what a command's signature covers."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- parsing ---------------------------------------------------------------------------------------------


class _Missing:
    pass


_MISSING: Final = _Missing()


def _text(value: object, *, low: int = 0, high: int | None = None) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError(
                "Input should be a valid string, unable to parse raw data as a unicode string"
            ) from None
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")  # noqa: TRY004 - an error message, not a raise kind
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(
            "Input should be a valid string, unable to parse raw data as a unicode string"
        ) from None
    if len(value) < low:
        raise ValueError(f"String should have at least {low} character{'s' if low > 1 else ''}")
    if high is not None and len(value) > high:
        raise ValueError(f"String should have at most {high} characters")
    return value


def _checker(what: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _text(value)
        if not is_token(text):
            raise ValueError(f"{what} {text!r} is not valid: use 1 to 64 of the characters A-Z a-z 0-9 _ -")
        return text

    return check


def _specversion(value: object) -> str:
    if value != "1.0" or not isinstance(value, str):
        raise ValueError("Input should be '1.0'")
    return value


def _message_id(value: object) -> str:
    return _text(value, low=1, high=MAX_ID_CHARS)


def _optional_id(value: object) -> str | None:
    return None if value is None else _message_id(value)


def _data(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("Input should be a valid dictionary")  # noqa: TRY004
    data: dict[str, Any] = {}
    for key, item in value.items():
        data[_text(key)] = item
    return data


def _hops(value: object) -> int:
    hops = to_int(value)
    if not 0 <= hops <= MAX_HOPS:
        raise ValueError(f"Input should be from 0 to {MAX_HOPS}")
    return hops


def _status(value: object) -> str:
    if not isinstance(value, str) or value not in RESULT_STATUSES:
        raise ValueError(f"Input should be one of {', '.join(map(repr, RESULT_STATUSES))}")
    return value


def _any_text(value: object) -> str:
    return _text(value)


def new_id() -> str:
    """A fresh message id (UUID4, hex)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


# name -> (coercion, default or _MISSING when required, default factory)
_Field = tuple[str, "Callable[[object], Any]", object, "Callable[[], object] | None"]
_ENVELOPE: Final[tuple[_Field, ...]] = (
    ("specversion", _specversion, "1.0", None),
    ("id", _message_id, _MISSING, new_id),
    ("source", lambda v: _text(v, low=1, high=256), _MISSING, None),
    ("type", lambda v: _text(v, low=1, high=128), _MISSING, None),
    ("subject", _checker("device id"), _MISSING, None),
    ("time", to_utc_time, _MISSING, utcnow),
    ("data", _data, _MISSING, dict),
    ("correlationid", _optional_id, None, None),
    ("causationid", _optional_id, None, None),
    ("hops", _hops, 0, None),
)
_COMMAND: Final = (
    *_ENVELOPE,
    ("action", _checker("name"), _MISSING, None),
    ("expires", to_utc_time, _MISSING, None),
    ("keyid", _any_text, "", None),
    ("sig", _any_text, "", None),
)
_RESULT: Final = (
    *_ENVELOPE,
    ("action", _checker("name"), _MISSING, None),
    ("status", _status, _MISSING, None),
    ("reason", _any_text, "", None),
)


def _parse(document: object, fields: tuple[_Field, ...], model: str) -> dict[str, Any]:  # noqa: C901
    if not isinstance(document, dict):
        raise DecodeError(f"a {model} must be a map, got {type(document).__name__}")
    errors: list[str] = []
    values: dict[str, Any] = {}
    for name, coerce, default, factory in fields:
        raw = document.get(name, _MISSING)
        if raw is _MISSING:
            if factory is not None:
                values[name] = factory()
            elif default is _MISSING:
                errors.append(f"{name}: Field required")
            else:
                values[name] = default
            continue
        try:
            values[name] = coerce(raw)
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
    known = {name for name, *_ in fields}
    for key in document:
        if not isinstance(key, str):
            errors.append(f"{key!r}: Keys should be strings")
        elif key not in known:
            errors.append(f"{key}: Extra inputs are not permitted")
    if errors:
        raise DecodeError(f"not a valid {model}: {'; '.join(errors[:_SHOWN_ERRORS])}")
    return values


@dataclass(frozen=True, slots=True)
class PlainCommand:
    """A `Command` as plain data: the same attributes, checked the same way (see `parse_command`)."""

    id: str
    source: str
    type: str
    subject: str
    time: datetime
    action: str
    expires: datetime
    data: dict[str, Any] = field(default_factory=dict)
    correlationid: str | None = None
    causationid: str | None = None
    hops: int = 0
    keyid: str = ""
    sig: str = ""
    specversion: str = "1.0"

    def signed_document(self) -> dict[str, Any]:
        """The JSON form of every attribute but `sig` (None left out), in the model's order.

        Raises `ValueError` or `TypeError` if `data` holds a value with no JSON form.
        """
        document: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": format_time(self.time),
            "data": jsonable(self.data),
        }
        if self.correlationid is not None:
            document["correlationid"] = self.correlationid
        if self.causationid is not None:
            document["causationid"] = self.causationid
        document.update(
            hops=self.hops, action=self.action, expires=format_time(self.expires), keyid=self.keyid
        )
        return document

    def canonical_bytes(self) -> bytes:
        """The bytes its signature covers (as `nerve.runtime.trust.signing.canonical_bytes` of the model)."""
        return canonical_json(self.signed_document())

    def caused(self) -> dict[str, Any]:
        """Attributes for a message caused by this one: same chain, one hop further."""
        return {
            "correlationid": self.correlationid or self.id,
            "causationid": self.id,
            "hops": min(self.hops + 1, MAX_HOPS),
        }


def parse_command(document: object) -> PlainCommand:
    """Check parsed data as a `Command`; raise `DecodeError` naming the bad attributes."""
    return PlainCommand(**_parse(document, _COMMAND, "Command"))


def decode_command(payload: bytes, *, max_size: int = DEFAULT_MAX_PAYLOAD) -> PlainCommand:
    """Decode a command (msgpack or JSON); raise `PayloadTooLarge` or `DecodeError`, never anything else."""
    if len(payload) > max_size:
        raise PayloadTooLarge(len(payload), max_size)
    return parse_command(load_document(payload))


@dataclass(frozen=True, slots=True)
class PlainResult:
    """A `CommandResult` as plain data; `encode()` gives the bytes `to_msgpack` gives for the model."""

    source: str
    type: str
    subject: str
    action: str
    status: str
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=utcnow)
    correlationid: str | None = None
    causationid: str | None = None
    hops: int = 0
    specversion: str = "1.0"

    def document(self) -> dict[str, Any]:
        """The JSON form, as `CommandResult.model_dump(mode="json", exclude_none=True)` (same order).

        Raises `ValueError` or `TypeError` if `data` holds a value with no JSON form.
        """
        document = envelope_document(
            event_id=self.id,
            source=self.source,
            type_=self.type,
            subject=self.subject,
            time=self.time,
            data=self.data,
            correlationid=self.correlationid,
            causationid=self.causationid,
            hops=self.hops,
        )
        document.update(action=self.action, status=self.status, reason=self.reason)
        return document

    def encode(self) -> bytes:
        """Msgpack, as `nerve.runtime.envelope.codec.to_msgpack` of the model."""
        packed: bytes = msgpack.packb(self.document())
        return packed


def parse_result(document: object) -> PlainResult:
    """Check parsed data as a `CommandResult`; raise `DecodeError` naming the bad attributes."""
    return PlainResult(**_parse(document, _RESULT, "CommandResult"))


def envelope_document(
    *,
    event_id: str,
    source: str,
    type_: str,
    subject: str,
    time: datetime,
    data: Mapping[str, Any],
    correlationid: str | None = None,
    causationid: str | None = None,
    hops: int = 0,
) -> dict[str, Any]:
    """The JSON form of an envelope's attributes, in the models' order, None left out."""
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": format_time(time.astimezone(UTC)),
        "data": jsonable(dict(data)),
    }
    if correlationid is not None:
        document["correlationid"] = correlationid
    if causationid is not None:
        document["causationid"] = causationid
    document["hops"] = hops
    return document


def event_bytes(
    *, event_id: str, source: str, type_: str, subject: str, time: datetime, data: Mapping[str, Any]
) -> bytes:
    """An `Event` as msgpack, the bytes `to_msgpack(Event(...))` gives for the same attributes."""
    packed: bytes = msgpack.packb(
        envelope_document(
            event_id=event_id, source=source, type_=type_, subject=subject, time=time, data=data
        )
    )
    return packed
