"""Confidential inference: the key set and the attestation route's report_data, signed receipts, the
append-only Merkle receipt log, end-to-end encryption of prompts, the inference app's front
(`teecloud.ai.server`, used by examples/llm) and the client's verifying proxy (`teecloud.ai.proxy`).

Imports no node, KMS or agent internals: the app side reaches keys and quotes only through the guest API
(dstack-sdk); the client side verifies quotes with the one shared verifier (`teecloud.peer`), injected.
Errors: see `teecloud.ai.errors`.
"""

from teecloud.ai.e2ee import ClientSession, ReplayCache, ServerKey, is_envelope
from teecloud.ai.errors import (
    AiError,
    EnvelopeRejected,
    KeySetInvalid,
    MalformedInput,
    ReceiptInvalid,
    UpstreamRejected,
)
from teecloud.ai.keyset import (
    ATTESTATION_PURPOSE,
    E2EE_KEY_PATH,
    RECEIPT_KEY_PATH,
    RECEIPT_KEY_PURPOSE,
    KeySet,
    eth_address,
    report_data_for,
)
from teecloud.ai.receiptlog import ReceiptLog, TreeHead, inclusion_proof, merkle_root, verify_inclusion
from teecloud.ai.receipts import ReceiptBody, SignedReceipt, receipt_digest, sign_receipt, verify_receipt

__all__ = [
    "ATTESTATION_PURPOSE",
    "E2EE_KEY_PATH",
    "RECEIPT_KEY_PATH",
    "RECEIPT_KEY_PURPOSE",
    "AiError",
    "ClientSession",
    "EnvelopeRejected",
    "KeySet",
    "KeySetInvalid",
    "MalformedInput",
    "ReceiptBody",
    "ReceiptInvalid",
    "ReceiptLog",
    "ReplayCache",
    "ServerKey",
    "SignedReceipt",
    "TreeHead",
    "UpstreamRejected",
    "eth_address",
    "inclusion_proof",
    "is_envelope",
    "merkle_root",
    "receipt_digest",
    "report_data_for",
    "sign_receipt",
    "verify_inclusion",
    "verify_receipt",
]
