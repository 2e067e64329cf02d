"""JetStream: connections (nats-py), publishing envelopes, facts and dead letters, the streams nerve keeps."""

from nerve.runtime.jetstream.client import (
    DEFAULT_NATS_PORT,
    MSG_ID_HEADER,
    ORIGIN_HEADER,
    REASON_HEADER,
    connect,
    connect_forever,
    dead_letter_body,
    envelope_headers,
    fact_subject,
    header_safe,
    publish_dead_letter,
    publish_envelope,
    publish_fact,
    shared_durable,
)
from nerve.runtime.jetstream.streams import (
    DEADLETTER_STREAM,
    STREAM_OF_KIND,
    STREAMS,
    StreamSpec,
    ensure_streams,
)

__all__ = [
    "DEADLETTER_STREAM",
    "DEFAULT_NATS_PORT",
    "MSG_ID_HEADER",
    "ORIGIN_HEADER",
    "REASON_HEADER",
    "STREAMS",
    "STREAM_OF_KIND",
    "StreamSpec",
    "connect",
    "connect_forever",
    "dead_letter_body",
    "ensure_streams",
    "envelope_headers",
    "fact_subject",
    "header_safe",
    "publish_dead_letter",
    "publish_envelope",
    "publish_fact",
    "shared_durable",
]
