"""Bytes ⇄ envelopes: msgpack (NATS, and MQTT by default) and JSON (MQTT, for people).

`decode` tells the two apart by the first byte: a msgpack map starts with 0x80-0x8f, 0xde or 0xdf, which
can never start UTF-8 JSON text. `wrap_raw` turns what a person types into `mosquitto_pub` (`95`,
`95.5`, `{"value": 95}`) into an `Event`.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgpack
from pydantic import ValidationError

from nerve.runtime.envelope.model import Command, CommandResult, Envelope, Event, Fact
from nerve.runtime.errors import DecodeError, PayloadTooLarge
from nerve.runtime.plain_envelope import DEFAULT_MAX_PAYLOAD, is_msgpack_map, load_document
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.subjects import Address

E = TypeVar("E", bound=Envelope)

# Defined with the plain envelopes (the lean edge reads bytes without this module); kept here too.
__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MODEL_OF_KIND",
    "decode",
    "envelope_from",
    "is_envelope",
    "is_msgpack_map",
    "load_document",
    "raw_data",
    "to_json",
    "to_msgpack",
    "wrap_raw",
]

_SHOWN_CHARS: Final = 40  # how much of a bad payload an error message quotes

MODEL_OF_KIND: Final[dict[Kind, type[Envelope]]] = {
    Kind.TELEMETRY: Event,
    Kind.EVENTS: Event,
    Kind.COMMANDS: Command,
    Kind.RESULTS: CommandResult,
    Kind.FACTS: Fact,
}


def to_msgpack(envelope: Envelope) -> bytes:
    """Encode an envelope as msgpack (attributes that are None are left out)."""
    packed: bytes = msgpack.packb(envelope.model_dump(mode="json", exclude_none=True))
    return packed


def to_json(envelope: Envelope) -> bytes:
    """Encode an envelope as compact UTF-8 JSON."""
    return envelope.model_dump_json(exclude_none=True).encode()


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(loc) for loc in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def envelope_from(document: object, model: type[E]) -> E:
    """Validate parsed data as `model`; raise `DecodeError` naming the bad attributes."""
    if not isinstance(document, dict):
        raise DecodeError(f"a {model.__name__} must be a map, got {type(document).__name__}")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise DecodeError(f"not a valid {model.__name__}: {_explain(exc)}") from None


def decode(payload: bytes, model: type[E], *, max_size: int = DEFAULT_MAX_PAYLOAD) -> E:
    """Decode an enveloped message (msgpack or JSON) as `model`.

    Raises `PayloadTooLarge` or `DecodeError`; never anything else for any input bytes.
    """
    if len(payload) > max_size:
        raise PayloadTooLarge(len(payload), max_size)
    return envelope_from(load_document(payload), model)


def is_envelope(document: object) -> bool:
    """Tell whether parsed data claims to be a CloudEvents envelope."""
    return isinstance(document, dict) and "specversion" in document


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
            return {str(k): v for k, v in document.items()}
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
            return {str(k): v for k, v in document.items()}
        return {"message": text}
    raise DecodeError(f"{address.kind.value} must be enveloped messages, not raw payloads")


def wrap_raw(address: Address, payload: bytes, *, source: str) -> Event:
    """Turn a raw MQTT payload on a telemetry or events topic into an `Event`.

    Raises `DecodeError` when the payload does not fit (see `raw_data`).
    """
    try:
        text = payload.decode().strip()
    except UnicodeDecodeError:
        raise DecodeError("raw payload is not UTF-8 text") from None
    try:
        document: object = json.loads(text) if text else None
    except (ValueError, RecursionError):  # JSONDecodeError, over-long int, too deeply nested
        document = None
    data = raw_data(address, document, text)
    try:
        return Event(
            source=source,
            type=f"nerve.{address.kind.value}.{address.name}",
            subject=address.device,
            data=data,
        )
    except ValidationError as exc:
        raise DecodeError(f"cannot wrap payload: {_explain(exc)}") from None
