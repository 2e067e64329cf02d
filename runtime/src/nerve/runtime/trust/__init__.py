"""Trust: the keys that sign commands, results and facts, and how a signature is checked."""

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
    "Signer",
    "Verifier",
    "canonical_bytes",
    "generate_keypair",
]
