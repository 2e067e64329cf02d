"""Bytes ⇄ envelopes: CloudEvents structured mode in JSON, or in msgpack (nerve's own, compact).

`decode` tells the two apart by the first byte: a msgpack map starts with 0x80-0x8f, 0xde or 0xdf, which
can never start UTF-8 JSON text. Decoders and encoders are built once per type; msgspec validates while
it decodes, and an error names the attribute (`$.hops`, `$.time`). `wrap_raw` turns what a person
types into `mosquitto_pub` (`95`, `95.5`, `{"value": 95}`) into an `Event`.

Extension attributes: an `Event` without any decodes in one pass; one with some fails that pass on the
unknown attribute and is read again through a plain map, whose extra attributes are checked and kept in
`Event.extensions` (see docs/envelope.md, "Why msgspec").
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import msgspec

from nerve.runtime.envelope.model import (
    EXTENSIONS_FIELD,
    Command,
    CommandResult,
    Envelope,
    Event,
    Fact,
    check_extensions,
    utcnow,
)
from nerve.runtime.errors import DecodeError, PayloadTooLarge
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.subjects import Address

__all__ = [
    "CONTENT_TYPE_HEADER",
    "DEFAULT_CODEC",
    "DEFAULT_MAX_PAYLOAD",
    "MODEL_OF_KIND",
    "Codec",
    "content_type",
    "decode",
    "encode",
    "envelope_from",
    "is_envelope",
    "is_enveloped",
    "is_msgpack_map",
    "load_document",
    "raw_data",
    "to_json",
    "to_msgpack",
    "wrap_raw",
]

E = TypeVar("E", bound=Envelope)

DEFAULT_MAX_PAYLOAD: Final = 64 * 1024
CONTENT_TYPE_HEADER: Final = "Content-Type"
_SHOWN_CHARS: Final = 40  # how much of a bad payload an error message quotes
_MSGPACK_MAP_FIRST_BYTES: Final = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})
_UNKNOWN_FIELD: Final = "Object contains unknown field"


class Codec(StrEnum):
    """How nerve writes envelopes (setting `nats.codec`): both are CloudEvents structured mode."""

    JSON = "json"
    MSGPACK = "msgpack"


#: Measured faster (bench/codec.py) and smaller; `json` makes the streams readable by standard tools.
DEFAULT_CODEC: Final = Codec.MSGPACK

_CONTENT_TYPES: Final = {
    Codec.JSON: "application/cloudevents+json",
    Codec.MSGPACK: "application/cloudevents+msgpack",
}

MODEL_OF_KIND: Final[dict[Kind, type[Envelope]]] = {
    Kind.TELEMETRY: Event,
    Kind.EVENTS: Event,
    Kind.COMMANDS: Command,
    Kind.RESULTS: CommandResult,
    Kind.FACTS: Fact,
}


class _SpecVersion(msgspec.Struct):
    """Only `specversion`, required: is this a CloudEvent at all?"""

    specversion: Literal["1.0"]


class _Required(_SpecVersion):
    """What CloudEvents requires and the models default (for code): a document must carry them."""

    id: str


_MODELS: Final = (Event, Command, CommandResult, Fact)
_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_JSON_DECODERS: Final[dict[type[Envelope], msgspec.json.Decoder[Any]]] = {
    model: msgspec.json.Decoder(model) for model in _MODELS
}
_MSGPACK_DECODERS: Final[dict[type[Envelope], msgspec.msgpack.Decoder[Any]]] = {
    model: msgspec.msgpack.Decoder(model) for model in _MODELS
}
_JSON_HEADER: Final = msgspec.json.Decoder(_SpecVersion)
_MSGPACK_HEADER: Final = msgspec.msgpack.Decoder(_SpecVersion)
_JSON_REQUIRED: Final = msgspec.json.Decoder(_Required)
_MSGPACK_REQUIRED: Final = msgspec.msgpack.Decoder(_Required)
_JSON_MAP: Final = msgspec.json.Decoder(dict[str, Any])
_MSGPACK_MAP: Final = msgspec.msgpack.Decoder(dict[str, Any])
_JSON_ANY: Final = msgspec.json.Decoder()
_MSGPACK_ANY: Final = msgspec.msgpack.Decoder()
_EVENT_ATTRIBUTES: Final = frozenset(Event.__struct_encode_fields__) - {EXTENSIONS_FIELD}


def content_type(codec: Codec) -> str:
    """The CloudEvents media type of `codec` (the NATS binding's `Content-Type` header)."""
    return _CONTENT_TYPES[codec]


def is_msgpack_map(payload: bytes) -> bool:
    """Tell whether `payload` starts like a msgpack map (and so cannot be JSON text)."""
    return bool(payload) and payload[0] in _MSGPACK_MAP_FIRST_BYTES


def _flat(envelope: Envelope, *, keep: tuple[type, ...] = ()) -> dict[str, Any]:
    """An Event with extensions as one map: extensions are top-level attributes (CloudEvents)."""
    document: dict[str, Any] = msgspec.to_builtins(envelope, builtin_types=keep)
    document.update(document.pop(EXTENSIONS_FIELD, {}))
    return document


def to_msgpack(envelope: Envelope) -> bytes:
    """Encode an envelope as msgpack (attributes at their default are left out; time as a timestamp)."""
    if isinstance(envelope, Event) and envelope.extensions:
        return _MSGPACK_ENCODER.encode(_flat(envelope, keep=(bytes, datetime)))
    return _MSGPACK_ENCODER.encode(envelope)


def to_json(envelope: Envelope) -> bytes:
    """Encode an envelope as compact UTF-8 JSON, CloudEvents structured mode."""
    if isinstance(envelope, Event) and envelope.extensions:
        return _JSON_ENCODER.encode(_flat(envelope))
    return _JSON_ENCODER.encode(envelope)


def encode(envelope: Envelope, codec: Codec) -> bytes:
    """Encode an envelope with `codec`."""
    return to_msgpack(envelope) if codec is Codec.MSGPACK else to_json(envelope)


def _explain(exc: Exception) -> str:
    text = str(exc)
    if text.startswith(_UNKNOWN_FIELD):
        return "unknown attribute " + text.removeprefix(_UNKNOWN_FIELD).strip()
    if text.startswith("Object missing required field"):
        return "missing required attribute " + text.removeprefix("Object missing required field").strip()
    return text


def _malformed(payload: bytes, exc: msgspec.DecodeError) -> str:
    return f"malformed msgpack: {exc}" if is_msgpack_map(payload) else f"payload is not valid JSON: {exc}"


def load_document(payload: bytes) -> object:
    """Parse msgpack or JSON bytes into Python data; raise `DecodeError` saying why not."""
    try:
        if is_msgpack_map(payload):
            return _MSGPACK_ANY.decode(payload)
        return _JSON_ANY.decode(payload)
    except msgspec.DecodeError as exc:
        raise DecodeError(_malformed(payload, exc)) from None
    except RecursionError:
        raise DecodeError("payload is nested too deeply to read") from None


def _with_extensions(payload: bytes, *, as_msgpack: bool) -> Event:
    """Decode an Event that has extension attributes: the extra attributes go to `extensions`."""
    document = (_MSGPACK_MAP if as_msgpack else _JSON_MAP).decode(payload)
    known: dict[str, Any] = {}
    extensions: dict[str, Any] = {}
    for name, value in document.items():
        if name in _EVENT_ATTRIBUTES:
            known[name] = value
        elif value is not None:  # CloudEvents: a null attribute is an absent one
            extensions[name] = value
    try:
        check_extensions(extensions)
    except ValueError as exc:
        raise DecodeError(f"not a valid Event: {exc}") from None
    known[EXTENSIONS_FIELD] = extensions
    # Through the same format again, so every attribute is read exactly as in the one-pass case.
    if as_msgpack:
        event: Event = _MSGPACK_DECODERS[Event].decode(_MSGPACK_ENCODER.encode(known))
    else:
        event = _JSON_DECODERS[Event].decode(_JSON_ENCODER.encode(known))
    return event


def _decode(payload: bytes, model: type[E]) -> E:
    as_msgpack = is_msgpack_map(payload)
    try:
        (_MSGPACK_REQUIRED if as_msgpack else _JSON_REQUIRED).decode(payload)
        try:
            envelope: E = (_MSGPACK_DECODERS if as_msgpack else _JSON_DECODERS)[model].decode(payload)
        except msgspec.ValidationError as exc:
            if model is not Event or not str(exc).startswith(_UNKNOWN_FIELD):
                raise
            return _with_extensions(payload, as_msgpack=as_msgpack)  # type: ignore[return-value]
    except msgspec.ValidationError as exc:
        raise DecodeError(f"not a valid {model.__name__}: {_explain(exc)}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(_malformed(payload, exc)) from None
    except RecursionError:
        raise DecodeError("payload is nested too deeply to read") from None
    if isinstance(envelope, Event) and envelope.extensions:
        raise DecodeError(f"not a valid Event: attribute name {EXTENSIONS_FIELD!r} is not valid")
    return envelope


def decode(payload: bytes, model: type[E], *, max_size: int = DEFAULT_MAX_PAYLOAD) -> E:
    """Decode an enveloped message (msgpack or JSON, structured mode) as `model`.

    Raises `PayloadTooLarge` or `DecodeError` (naming the attribute); never anything else for any bytes.
    """
    if len(payload) > max_size:
        raise PayloadTooLarge(len(payload), max_size)
    if model not in _JSON_DECODERS:
        raise TypeError(f"{model.__name__} is not an envelope model")
    return _decode(payload, model)


def envelope_from(document: object, model: type[E]) -> E:
    """Validate parsed data (a map, as JSON gives it) as `model`; raise `DecodeError` naming what is wrong."""
    if not isinstance(document, dict):
        raise DecodeError(f"a {model.__name__} must be a map, got {type(document).__name__}")
    try:
        payload = _JSON_ENCODER.encode(document)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"not a valid {model.__name__}: {exc}") from None
    return _decode(payload, model)


def is_envelope(document: object) -> bool:
    """Tell whether parsed data claims to be a CloudEvents envelope."""
    return isinstance(document, dict) and "specversion" in document


def is_enveloped(payload: bytes) -> bool:
    """Tell whether `payload` is a map with a `specversion` (so it must decode as an envelope)."""
    try:
        (_MSGPACK_HEADER if is_msgpack_map(payload) else _JSON_HEADER).decode(payload)
    except msgspec.ValidationError as exc:
        # `specversion` there but wrong ("0.3"): an envelope all the same, refused when decoded.
        return "specversion" in str(exc) and "missing" not in str(exc)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def raw_data(address: Address, document: object, text: str) -> dict[str, Any]:
    """The `data` of an Event made from a raw (non-enveloped) payload; raise `DecodeError` if unfit.

    Telemetry needs a finite number: `95`, `95.5`, or a map with a numeric `value`. An event takes a map
    as its data, or any other text as `{"message": text}`.
    """
    if address.kind is Kind.TELEMETRY:
        if isinstance(document, dict):
            if _number(document.get("value")) is None:
                raise DecodeError(
                    f"telemetry map for {address.name!r} needs a numeric 'value', "
                    f"got {document.get('value')!r}"
                )
            return dict(document)
        number = _number(document)
        if number is None:
            shown = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"
            raise DecodeError(
                f"telemetry payload for {address.name!r} must be a number or a map with a "
                f"numeric 'value', got {shown!r}"
            )
        return {"value": number}
    if address.kind is Kind.EVENTS:
        if isinstance(document, dict):
            return dict(document)
        return {"message": text}
    raise DecodeError(f"{address.kind.value} must be enveloped messages, not raw payloads")


def wrap_raw(address: Address, payload: bytes, *, source: str) -> Event:
    """Turn a raw MQTT payload on a telemetry or events topic into an `Event` (subject: the device).

    Raises `DecodeError` when the payload does not fit (see `raw_data`).
    """
    try:
        text = payload.decode().strip()
    except UnicodeDecodeError:
        raise DecodeError("raw payload is not UTF-8 text") from None
    try:
        document: object = _JSON_ANY.decode(text) if text else None
    except (msgspec.DecodeError, RecursionError):  # not JSON (NaN included), or nested too deeply
        document = None
    data = raw_data(address, document, text)
    try:
        return Event(
            source=source,
            type=f"nerve.{address.kind.value}.{address.name}",
            subject=address.device,
            time=utcnow(),
            data=data,
        )
    except ValueError as exc:
        raise DecodeError(f"cannot wrap payload: {exc}") from None
