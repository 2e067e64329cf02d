"""Trust: the keys that sign commands, results and facts, and how a signature is checked."""

from nerve.runtime.trust.chain import Problem, fact_bytes, record_hash, seal, verify_records
from nerve.runtime.trust.signing import (
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    Signer,
    Verifier,
    canonical_bytes,
    generate_keypair,
)

__all__ = [
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "Problem",
    "Signer",
    "Verifier",
    "canonical_bytes",
    "fact_bytes",
    "generate_keypair",
    "record_hash",
    "seal",
    "verify_records",
]
