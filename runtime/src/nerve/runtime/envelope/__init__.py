"""The envelope: CloudEvents 1.0 messages (`Event`, `Command`, `CommandResult`, `Fact`) and their codecs.

`model` holds the one definition of each message; `codec` turns bytes into messages and back.
"""

from nerve.runtime.envelope.codec import (
    DEFAULT_MAX_PAYLOAD,
    MODEL_OF_KIND,
    decode,
    envelope_from,
    is_envelope,
    to_json,
    to_msgpack,
    wrap_raw,
)
from nerve.runtime.envelope.model import (
    Command,
    CommandResult,
    Envelope,
    Event,
    Fact,
    ResultStatus,
    derived_id,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MODEL_OF_KIND",
    "Command",
    "CommandResult",
    "Envelope",
    "Event",
    "Fact",
    "ResultStatus",
    "decode",
    "derived_id",
    "envelope_from",
    "is_envelope",
    "to_json",
    "to_msgpack",
    "wrap_raw",
]
