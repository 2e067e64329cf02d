"""Tamper-evident facts: each one signed by the part that kept it and chained to the record before it.

One chain per stream: a fact's `chainseq` is the NERVE_FACTS sequence it is stored at, and its `prevhash`
the SHA-256 (hex) of the bytes stored at the sequence before it (empty for the first). The publisher
stores it with `Nats-Expected-Last-Sequence`, so JetStream refuses it if anything else was stored in
between: two writers cannot fork the chain, and a fact can only land where it says it is. The signature
(`keyid`, `sig`: Ed25519 over the canonical JSON of every other attribute, as for commands) covers both.

So a changed field breaks the signature (and the next fact's link), a removed fact leaves a gap, a moved
or replayed one sits where it does not claim to be, and a forged one has no signature by a trusted key.
See docs/facts.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgspec

from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.errors import DecodeError, SignatureError
from nerve.runtime.trust.signing import canonical_bytes

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nerve.runtime.trust.signing import Signer, Verifier

EXPECTED_LAST_SEQUENCE_HEADER: Final = "Nats-Expected-Last-Sequence"
# JetStream's error code for "wrong last sequence": another record was stored first.
WRONG_LAST_SEQUENCE_CODE: Final = 10071
# How often a publisher re-reads the head and retries when another writer got there first.
MAX_CHAIN_ATTEMPTS: Final = 20


def fact_bytes(fact: Fact) -> bytes:
    """The bytes a fact's signature covers: its JSON without `sig`, keys sorted at every level."""
    return canonical_bytes(fact)


def record_hash(stored: bytes) -> str:
    """The SHA-256 (hex) of a record as JetStream stores it: what the next fact's `prevhash` holds."""
    return hashlib.sha256(stored).hexdigest()


def seal(fact: Fact, signer: Signer, *, chainseq: int, previous: bytes | None) -> Fact:
    """`fact` placed at `chainseq` after the stored record `previous` (None: nothing before it), signed."""
    unsigned = msgspec.structs.replace(
        fact,
        chainseq=chainseq,
        prevhash="" if previous is None else record_hash(previous),
        keyid=signer.keyid,
        sig="",
    )
    return msgspec.structs.replace(unsigned, sig=signer.sign_bytes(fact_bytes(unsigned)))


def is_legacy(fact: Fact) -> bool:
    """Whether `fact` was kept before facts were signed (it carries none of the chain attributes)."""
    return not (fact.sig or fact.keyid or fact.prevhash or fact.chainseq)


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the record at stream sequence `seq` does not verify."""

    seq: int
    reason: str

    def __str__(self) -> str:
        """One line: `seq N: reason`."""
        return f"seq {self.seq}: {self.reason}"


def check_record(seq: int, fact: Fact, previous: tuple[int, bytes] | None, verifier: Verifier) -> str | None:
    """Why the fact stored at `seq` after `previous` (its sequence and bytes) does not verify, or None."""
    if is_legacy(fact):
        return "unsigned legacy fact (kept before facts were signed): cannot be verified"
    try:
        verifier.check(fact.keyid, fact.sig, lambda: fact_bytes(fact), what="fact")
    except SignatureError as exc:
        return str(exc)
    return _misplaced(seq, fact) or _unlinked(seq, fact, previous)


def _misplaced(seq: int, fact: Fact) -> str | None:
    if fact.chainseq > seq:
        return f"claims place {fact.chainseq}: {fact.chainseq - seq} fact(s) before it are missing"
    if fact.chainseq < seq:
        return f"claims place {fact.chainseq}: moved here (reordered, replayed or copied)"
    return None


def _unlinked(seq: int, fact: Fact, previous: tuple[int, bytes] | None) -> str | None:
    if previous is None:
        if seq != 1:
            return f"the chain starts here: the {seq - 1} record(s) before it are missing"
        return "first in the stream but chained to a record before it" if fact.prevhash else None
    before, stored = previous
    if before != seq - 1:
        return f"the record before it (seq {seq - 1}) is missing"
    if fact.prevhash != record_hash(stored):
        return f"not chained to the record before it (seq {before}): that one was altered or replaced"
    return None


def verify_records(records: Iterable[tuple[int, bytes]], verifier: Verifier) -> list[Problem]:
    """Every problem in a stream's records (sequence, stored bytes) in stream order; none: intact."""
    problems: list[Problem] = []
    previous: tuple[int, bytes] | None = None
    for seq, data in records:
        try:
            fact = decode(data, Fact)
        except DecodeError as exc:
            problems.append(Problem(seq, f"not a fact: {exc}"))
        else:
            reason = check_record(seq, fact, previous, verifier)
            if reason is not None:
                problems.append(Problem(seq, reason))
        previous = (seq, data)
    return problems
