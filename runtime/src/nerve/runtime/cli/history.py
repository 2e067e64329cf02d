"""`nerve facts` and `nerve deadletters`: read what the streams keep, oldest first, newest last."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final, TextIO

import msgspec
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.errors import BrokerUnavailable, ConfigError, DecodeError
from nerve.runtime.jetstream.client import connect
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM
from nerve.runtime.subjects import Kind, deadletter_subject, is_token, subject_root

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings

FACTS_STREAM: Final = "NERVE_FACTS"
READ_TIMEOUT_S: Final = 2.0
PAYLOAD_PREVIEW: Final = 60


async def read_stream(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message of `stream` on `subject` (wildcards allowed), in stream order."""
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except NotFoundError:
        return []
    if info.state.messages == 0:
        return []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    messages: list[Msg] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            messages.append(msg)
            if msg.metadata.num_pending == 0:
                break
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return messages


async def read_facts(
    js: JetStreamContext, *, prefix: str, device: str | None = None
) -> tuple[list[Fact], int]:
    """Every fact (of `device`, if given) in stream order, and how many records could not be decoded.

    Raises:
        ConfigError: `device` is not a device id (a wildcard or a dot would widen the subject).
    """
    if device is not None and not is_token(device):
        raise ConfigError(f"{device!r} is not a valid device id", key="device")
    subject = f"{subject_root(prefix)}.{device or '*'}.{Kind.FACTS.value}.*"
    facts: list[Fact] = []
    undecodable = 0
    for msg in await read_stream(js, FACTS_STREAM, subject):
        try:
            facts.append(decode(msg.data, Fact))
        except DecodeError:
            undecodable += 1
    return facts, undecodable


def format_fact(fact: Fact) -> str:
    """One line: time, device, kind, summary."""
    return (
        f"{fact.time.isoformat(timespec='milliseconds')}  {fact.subject:<16} {fact.kind:<18} {fact.summary}"
    )


def format_dead_letter(msg: Msg) -> str:
    """One line: time, part, where it came from, why, and the start of the original bytes."""
    try:
        record = msgspec.msgpack.decode(msg.data)
        payload = bytes(record["payload"])
        shown = repr(payload[:PAYLOAD_PREVIEW]) + ("…" if len(payload) > PAYLOAD_PREVIEW else "")
        return (
            f"{record['time'][:23]}  {record['part']:<8} {record['origin']}  {record['reason']}  "
            f"[{len(payload)} bytes: {shown}]"
        )
    except (ValueError, KeyError, TypeError, msgspec.DecodeError):
        seq = msg.metadata.sequence.stream
        return f"(seq {seq}: not a nerve dead-letter record: {msg.data[:PAYLOAD_PREVIEW]!r})"


async def print_facts(
    settings: Settings, *, device: str | None = None, limit: int = 0, out: TextIO = sys.stdout
) -> int:
    """Print the facts, newest last; return the exit status (0, also when there are none)."""
    nc = await connect(settings.nats, name="nerve-facts")
    try:
        facts, undecodable = await read_facts(nc.jetstream(), prefix=settings.prefix, device=device)
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"reading {FACTS_STREAM} failed: {exc}") from exc
    finally:
        await nc.close()
    if limit > 0:
        facts = facts[-limit:]
    if not facts:
        print("no facts yet" + (f" for device {device}" if device else ""), file=out)
    for fact in facts:
        print(format_fact(fact), file=out)
    if undecodable:
        print(f"({undecodable} record(s) in {FACTS_STREAM} could not be decoded as facts)", file=out)
    return 0


async def print_dead_letters(settings: Settings, *, limit: int = 0, out: TextIO = sys.stdout) -> int:
    """Print what no part could handle, with the reason, newest last; return the exit status."""
    nc = await connect(settings.nats, name="nerve-deadletters")
    try:
        messages = await read_stream(
            nc.jetstream(), DEADLETTER_STREAM, deadletter_subject("*", settings.prefix)
        )
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"reading {DEADLETTER_STREAM} failed: {exc}") from exc
    finally:
        await nc.close()
    if limit > 0:
        messages = messages[-limit:]
    if not messages:
        print("no dead letters", file=out)
    for msg in messages:
        print(format_dead_letter(msg), file=out)
    return 0
