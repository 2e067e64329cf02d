"""nerve.runtime: what every part shares.

Re-exported here: the envelope, codecs, the topic/subject scheme, settings, signing and errors, none of
which needs nats-py (an edge-only install has none). The JetStream side (`nerve.runtime.agent`,
`nerve.runtime.central`, `nerve.runtime.jetstream`, `nerve.runtime.streams`) is imported from its module.

The names are imported on first use (PEP 562): `import nerve.runtime.subjects` must not load pydantic
through this package, since the lean edge process (`nerve.edge.main`) imports modules of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nerve.runtime.codec import decode, to_json, to_msgpack, wrap_raw
    from nerve.runtime.config import Settings, load_settings
    from nerve.runtime.envelope import Command, CommandResult, Envelope, Event, Fact, derived_id
    from nerve.runtime.errors import (
        BrokerBinaryMissing,
        BrokerStartFailed,
        BrokerUnavailable,
        ConfigError,
        DecodeError,
        NerveError,
        PayloadTooLarge,
        SignatureError,
        TopicError,
    )
    from nerve.runtime.plain_envelope import new_id
    from nerve.runtime.signing import Signer, Verifier, generate_keypair
    from nerve.runtime.subjects import Address, Kind, parse_subject, parse_topic

_MODULE_OF: dict[str, str] = {
    "Address": "nerve.runtime.subjects",
    "BrokerBinaryMissing": "nerve.runtime.errors",
    "BrokerStartFailed": "nerve.runtime.errors",
    "BrokerUnavailable": "nerve.runtime.errors",
    "Command": "nerve.runtime.envelope",
    "CommandResult": "nerve.runtime.envelope",
    "ConfigError": "nerve.runtime.errors",
    "DecodeError": "nerve.runtime.errors",
    "Envelope": "nerve.runtime.envelope",
    "Event": "nerve.runtime.envelope",
    "Fact": "nerve.runtime.envelope",
    "Kind": "nerve.runtime.subjects",
    "NerveError": "nerve.runtime.errors",
    "PayloadTooLarge": "nerve.runtime.errors",
    "Settings": "nerve.runtime.config",
    "SignatureError": "nerve.runtime.errors",
    "Signer": "nerve.runtime.signing",
    "TopicError": "nerve.runtime.errors",
    "Verifier": "nerve.runtime.signing",
    "decode": "nerve.runtime.codec",
    "derived_id": "nerve.runtime.envelope",
    "generate_keypair": "nerve.runtime.signing",
    "load_settings": "nerve.runtime.config",
    "new_id": "nerve.runtime.plain_envelope",
    "parse_subject": "nerve.runtime.subjects",
    "parse_topic": "nerve.runtime.subjects",
    "to_json": "nerve.runtime.codec",
    "to_msgpack": "nerve.runtime.codec",
    "wrap_raw": "nerve.runtime.codec",
}

__all__ = [
    "Address",
    "BrokerBinaryMissing",
    "BrokerStartFailed",
    "BrokerUnavailable",
    "Command",
    "CommandResult",
    "ConfigError",
    "DecodeError",
    "Envelope",
    "Event",
    "Fact",
    "Kind",
    "NerveError",
    "PayloadTooLarge",
    "Settings",
    "SignatureError",
    "Signer",
    "TopicError",
    "Verifier",
    "decode",
    "derived_id",
    "generate_keypair",
    "load_settings",
    "new_id",
    "parse_subject",
    "parse_topic",
    "to_json",
    "to_msgpack",
    "wrap_raw",
]


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
