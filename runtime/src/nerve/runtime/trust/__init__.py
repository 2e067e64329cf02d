"""Trust: the keys that sign commands, results and facts, and how a signature is checked."""

from nerve.runtime.trust.chain import Problem, fact_bytes, record_hash, seal, verify_records
from nerve.runtime.trust.devices import DeviceKeys, Refusal, registry_dir
from nerve.runtime.trust.expiry import COMMAND_SEQ_HEADER, EXPIRED_CLAIM_MARGIN_S, expired_claim_refusal
from nerve.runtime.trust.signing import (
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    Signer,
    Verifier,
    canonical_bytes,
    generate_keypair,
    read_public_key,
)

__all__ = [
    "COMMAND_SEQ_HEADER",
    "EXPIRED_CLAIM_MARGIN_S",
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "DeviceKeys",
    "Problem",
    "Refusal",
    "Signer",
    "Verifier",
    "canonical_bytes",
    "expired_claim_refusal",
    "fact_bytes",
    "generate_keypair",
    "read_public_key",
    "record_hash",
    "registry_dir",
    "seal",
    "verify_records",
]
