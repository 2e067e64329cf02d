"""`nerve facts`, `nerve facts verify` and `nerve deadletters`: read what the streams keep, newest last."""

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
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM, FACTS_STREAM
from nerve.runtime.subjects import Kind, deadletter_subject, is_token, subject_root
from nerve.runtime.trust.chain import verify_records
from nerve.runtime.trust.signing import PUBLIC_SUFFIX, Verifier

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.trust.chain import Problem

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
    js: JetStreamContext, *, prefix: str, device: str | None = None, stream: str = FACTS_STREAM
) -> tuple[list[Fact], int]:
    """Every fact (of `device`, if given) in stream order, and how many records could not be decoded.

    Raises:
        ConfigError: `device` is not a device id (a wildcard or a dot would widen the subject).
    """
    facts: list[Fact] = []
    undecodable = 0
    for _, data in await read_records(js, prefix=prefix, device=device, stream=stream):
        try:
            facts.append(decode(data, Fact))
        except DecodeError:
            undecodable += 1
    return facts, undecodable


async def read_records(
    js: JetStreamContext, *, prefix: str, device: str | None = None, stream: str = FACTS_STREAM
) -> list[tuple[int, bytes]]:
    """The stored bytes of every fact (of `device`, if given) with its stream sequence, in stream order.

    Raises:
        ConfigError: `device` is not a device id (a wildcard or a dot would widen the subject).
    """
    if device is not None and not is_token(device):
        raise ConfigError(f"{device!r} is not a valid device id", key="device")
    subject = f"{subject_root(prefix)}.{device or '*'}.{Kind.FACTS.value}.*"
    return [(msg.metadata.sequence.stream, msg.data) for msg in await read_stream(js, stream, subject)]


def fact_verifier(settings: Settings, keys: Path) -> Verifier:
    """Trust the `.pub` files in directory `keys`, or the one file `keys` names.

    Raises:
        ConfigError: there is no such file or directory, or a key in it is not a key.
    """
    if keys.is_dir():
        verifier = Verifier.from_config({}, keys)
        if not verifier.keyids:
            raise ConfigError(f"no *{PUBLIC_SUFFIX} key in {keys}", key="--keys")
        return verifier
    if keys.suffix != PUBLIC_SUFFIX:
        keys = keys.with_suffix(PUBLIC_SUFFIX)  # the private key's path names its .pub beside it
    try:
        text = keys.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the public key: {exc}", source=str(keys)) from None
    keyid = settings.central.keyid if keys.stem == settings.central.keyid else keys.stem
    return Verifier.from_config({keyid: text})


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


async def _read_all(settings: Settings, name: str) -> list[tuple[int, bytes]]:
    nc = await connect(settings.nats, name=name)
    try:
        return await read_records(nc.jetstream(), prefix=settings.prefix)
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"reading {FACTS_STREAM} failed: {exc}") from exc
    finally:
        await nc.close()


async def print_facts(
    settings: Settings,
    *,
    device: str | None = None,
    limit: int = 0,
    verifier: Verifier | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the facts, newest last, marking those that do not verify; return the exit status (0).

    Without `verifier` nothing is checked, and the output says so.

    Raises:
        ConfigError: `device` is not a device id.
    """
    if device is not None and not is_token(device):
        raise ConfigError(f"{device!r} is not a valid device id", key="device")
    records = await _read_all(settings, "nerve-facts")
    # The whole chain is verified (a link spans devices); only then is it narrowed to one device.
    problems = {p.seq: p.reason for p in verify_records(records, verifier)} if verifier else {}
    facts: list[tuple[int, Fact]] = []
    undecodable = 0
    for seq, data in records:
        try:
            fact = decode(data, Fact)
        except DecodeError:
            undecodable += 1
            continue
        if device is None or fact.subject == device:
            facts.append((seq, fact))
    if limit > 0:
        facts = facts[-limit:]
    if not facts:
        print("no facts yet" + (f" for device {device}" if device else ""), file=out)
    for seq, fact in facts:
        reason = problems.get(seq)
        print(format_fact(fact) + (f"  !! NOT VERIFIED (seq {seq}): {reason}" if reason else ""), file=out)
    if undecodable:
        print(f"({undecodable} record(s) in {FACTS_STREAM} could not be decoded as facts)", file=out)
    if verifier is None and facts:
        print("(not verified: no trusted key; see `nerve facts verify --keys`)", file=out)
    return 0


async def verify_facts(settings: Settings, verifier: Verifier, *, out: TextIO = sys.stdout) -> int:
    """Print one line per fact that does not verify (or that the chain is intact); 0 if intact, else 1."""
    records = await _read_all(settings, "nerve-facts-verify")
    return report(verify_records(records, verifier), len(records), out=out)


def report(problems: list[Problem], count: int, *, out: TextIO) -> int:
    """Print `problems` one a line, or that all `count` facts verify; return the exit status."""
    for problem in problems:
        print(problem, file=out)
    if problems:
        print(f"{FACTS_STREAM}: {len(problems)} of {count} record(s) do not verify", file=out)
        return 1
    print(f"{FACTS_STREAM}: {count} fact(s), chain intact", file=out)
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
