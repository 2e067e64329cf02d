"""nerve.runtime: what every part shares.

Its parts, one subpackage each (each re-exports its public names):

- `envelope`: the messages (CloudEvents 1.0) and their codecs;  `subjects`: topics and subjects;
- `config`: settings;  `trust`: signing;  `errors`: the exception tree;
- `wire`: the MQTT client (and the protocol base the bridge's JetStream publisher shares);
- `jetstream`: nats-py connections, publishing, the streams;  `central`: the Agent API and its runner;
- `stack`: broker processes and `nerve up`;  `cli`: the `nerve` command line;  `testing`: test helpers.

Re-exported here: the envelope, codecs, the topic/subject scheme, settings, signing and errors, none of
which needs nats-py (an edge-only install has none). The JetStream side is imported from its package.

The names are imported on first use (PEP 562): `import nerve.runtime.subjects` must not load pydantic
through this package, since the lean edge process (`nerve.edge.main`) imports modules of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nerve.runtime import lazy as _lazy

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings, load_settings
    from nerve.runtime.envelope.codec import decode, to_json, to_msgpack, wrap_raw
    from nerve.runtime.envelope.model import (
        Command,
        CommandResult,
        Envelope,
        Event,
        Fact,
        derived_id,
        new_id,
    )
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
    from nerve.runtime.subjects import Address, Kind, parse_subject, parse_topic
    from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair

_MODULE_OF: dict[str, str] = {
    "Address": "nerve.runtime.subjects",
    "BrokerBinaryMissing": "nerve.runtime.errors",
    "BrokerStartFailed": "nerve.runtime.errors",
    "BrokerUnavailable": "nerve.runtime.errors",
    "Command": "nerve.runtime.envelope.model",
    "CommandResult": "nerve.runtime.envelope.model",
    "ConfigError": "nerve.runtime.errors",
    "DecodeError": "nerve.runtime.errors",
    "Envelope": "nerve.runtime.envelope.model",
    "Event": "nerve.runtime.envelope.model",
    "Fact": "nerve.runtime.envelope.model",
    "Kind": "nerve.runtime.subjects",
    "NerveError": "nerve.runtime.errors",
    "PayloadTooLarge": "nerve.runtime.errors",
    "Settings": "nerve.runtime.config.settings",
    "SignatureError": "nerve.runtime.errors",
    "Signer": "nerve.runtime.trust.signing",
    "TopicError": "nerve.runtime.errors",
    "Verifier": "nerve.runtime.trust.signing",
    "decode": "nerve.runtime.envelope.codec",
    "derived_id": "nerve.runtime.envelope.model",
    "generate_keypair": "nerve.runtime.trust.signing",
    "load_settings": "nerve.runtime.config.settings",
    "new_id": "nerve.runtime.envelope.model",
    "parse_subject": "nerve.runtime.subjects",
    "parse_topic": "nerve.runtime.subjects",
    "to_json": "nerve.runtime.envelope.codec",
    "to_msgpack": "nerve.runtime.envelope.codec",
    "wrap_raw": "nerve.runtime.envelope.codec",
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


__getattr__ = _lazy.lazy_getattr(__name__, _MODULE_OF)
