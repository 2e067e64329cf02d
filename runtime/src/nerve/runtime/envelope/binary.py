"""CloudEvents MQTT binding, binary content mode (MQTT v5): attributes as user properties, data as payload.

A producer in this mode puts every attribute (`specversion`, `id`, `source`, `type`, the optional ones,
extensions) in the PUBLISH's user properties, the data's media type in its Content Type, and the data
itself, as it is, in the payload. `event_from_binary` builds the `Event` from those parts; what the
MQTT client hands over (user properties as (name, value) pairs, content type, payload) is all it needs,
so it stays pure and testable without a broker.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Final

import msgspec

from nerve.runtime.envelope.codec import DEFAULT_MAX_PAYLOAD, envelope_from
from nerve.runtime.envelope.model import Event
from nerve.runtime.errors import DecodeError, PayloadTooLarge

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nerve.runtime.subjects import Address

__all__ = ["event_from_binary", "is_binary_mode", "is_json_media_type"]

_JSON_ANY: Final = msgspec.json.Decoder()
_INTEGER_ATTRIBUTES: Final = frozenset({"hops"})


def is_binary_mode(properties: Sequence[tuple[str, str]]) -> bool:
    """Tell whether a PUBLISH's user properties carry a CloudEvent (they name its `specversion`)."""
    return any(name == "specversion" for name, _ in properties)


def is_json_media_type(media_type: str) -> bool:
    """Tell whether a media type (`application/json; charset=utf-8`, `application/vnd.x+json`) is JSON."""
    essence = media_type.split(";", 1)[0].strip().lower()
    return essence in {"application/json", "text/json"} or essence.endswith("+json")


def _data(content_type: str | None, payload: bytes) -> dict[str, Any]:
    """`data` (JSON media types, parsed) or `data_base64` (anything else, as it came) of the event."""
    if not payload:
        return {}
    if content_type is None or is_json_media_type(content_type):
        # CloudEvents: without a datacontenttype, data is JSON (application/json is implied).
        try:
            return {"data": _JSON_ANY.decode(payload)}
        except msgspec.DecodeError as exc:
            shown = "application/json (implied)" if content_type is None else content_type
            raise DecodeError(f"payload is not the {shown} its content type says: {exc}") from None
        except RecursionError:
            raise DecodeError("data: nested too deeply to read") from None
    return {"data_base64": base64.b64encode(payload).decode("ascii")}


def _attributes(properties: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The attributes the user properties carry (`hops` as an integer); raise `DecodeError` naming one."""
    document: dict[str, Any] = {}
    for name, value in properties:
        if name in document:
            raise DecodeError(f"not a valid Event: attribute {name!r} is given twice")
        if name in {"data", "data_base64"}:
            raise DecodeError(f"not a valid Event: {name!r} is not an attribute: the payload is the data")
        if name in _INTEGER_ATTRIBUTES:
            try:
                document[name] = int(value, 10)
            except ValueError:
                raise DecodeError(f"not a valid Event: {name}: {value[:40]!r} is not an integer") from None
        else:
            document[name] = value
    return document


def event_from_binary(
    properties: Sequence[tuple[str, str]],
    content_type: str | None,
    payload: bytes,
    address: Address,
    *,
    max_size: int = DEFAULT_MAX_PAYLOAD,
) -> Event:
    """The `Event` a binary-mode PUBLISH on `address`'s topic carries.

    `properties` are the user properties (name, value), `content_type` the PUBLISH's Content Type (the
    event's `datacontenttype`), `payload` its data. Attribute values are strings, as MQTT carries them:
    `hops` is read as an integer, `time` as an RFC 3339 timestamp, extensions stay strings. An event
    without `subject` gets the topic's device; one naming another device is refused.

    Raises `PayloadTooLarge`, or `DecodeError` naming the attribute: a property named twice or not a
    valid attribute name, a missing or bad required attribute, a payload that is not what its content
    type says.
    """
    size = len(payload) + sum(len(name) + len(value) for name, value in properties)
    if size > max_size:
        raise PayloadTooLarge(size, max_size)
    document = _attributes(properties)
    if content_type is not None:
        if "datacontenttype" in document and document["datacontenttype"] != content_type:
            raise DecodeError(
                f"not a valid Event: datacontenttype {document['datacontenttype']!r} disagrees with the "
                f"PUBLISH content type {content_type!r}"
            )
        document["datacontenttype"] = content_type
    media_type = content_type if content_type is not None else document.get("datacontenttype")
    subject = document.setdefault("subject", address.device)
    if subject != address.device:
        raise DecodeError(f"subject {subject!r} names another device than the topic's {address.device!r}")
    document.update(_data(media_type, payload))
    if "specversion" not in document:
        raise DecodeError("not a valid Event: missing required attribute `specversion`")
    return envelope_from(document, Event)
