"""nerve.runtime: what every part shares.

Re-exported here: the envelope, codecs, the topic/subject scheme, settings, signing and errors, none of
which needs nats-py (an edge-only install has none). The JetStream side (`nerve.runtime.agent`,
`nerve.runtime.central`, `nerve.runtime.jetstream`, `nerve.runtime.streams`) is imported from its module.
"""

from nerve.runtime.codec import decode, to_json, to_msgpack, wrap_raw
from nerve.runtime.config import Settings, load_settings
from nerve.runtime.envelope import Command, CommandResult, Envelope, Event, Fact, derived_id, new_id
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
from nerve.runtime.signing import Signer, Verifier, generate_keypair
from nerve.runtime.subjects import Address, Kind, parse_subject, parse_topic

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
