"""`nerve facts`: read the audit trail (NERVE_FACTS), oldest first, newest last."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final, TextIO

from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from nerve.runtime.codec import decode
from nerve.runtime.envelope import Fact
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream import connect
from nerve.runtime.subjects import Kind, subject_root

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from nerve.runtime.config import Settings

FACTS_STREAM: Final = "NERVE_FACTS"
READ_TIMEOUT_S: Final = 2.0


async def read_facts(
    js: JetStreamContext, *, prefix: str, device: str | None = None
) -> tuple[list[Fact], int]:
    """Every fact (of `device`, if given) in stream order, and how many records could not be decoded."""
    subject = f"{subject_root(prefix)}.{device or '*'}.{Kind.FACTS.value}.*"
    try:
        info = await js.stream_info(FACTS_STREAM, subjects_filter=subject)
    except NotFoundError:
        return [], 0
    if info.state.messages == 0:
        return [], 0
    sub = await js.subscribe(
        subject, stream=FACTS_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    facts: list[Fact] = []
    undecodable = 0
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            try:
                facts.append(decode(msg.data, Fact))
            except DecodeError:
                undecodable += 1
            if msg.metadata.num_pending == 0:
                break
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return facts, undecodable


def format_fact(fact: Fact) -> str:
    """One line: time, device, kind, summary."""
    return (
        f"{fact.time.isoformat(timespec='milliseconds')}  {fact.subject:<16} {fact.kind:<18} {fact.summary}"
    )


async def print_facts(
    settings: Settings, *, device: str | None = None, limit: int = 0, out: TextIO = sys.stdout
) -> int:
    """Print the facts, newest last; return the exit status (0, also when there are none)."""
    nc = await connect(settings.nats, name="nerve-facts")
    try:
        facts, undecodable = await read_facts(nc.jetstream(), prefix=settings.prefix, device=device)
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
