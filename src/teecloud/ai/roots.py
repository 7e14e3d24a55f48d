"""Receipt-log roots on chain (the ReceiptRoots contract, docs/ai.md "Receipt roots on chain").

The inference app periodically signs its receipt log's head for the chain and submits it:

    digest = keccak256("teecloud-ai-receipt-root:" ‖ app_id (20 bytes) ‖ uint256(tree_size) ‖ root)

signed (r ‖ s ‖ v) by the app's receipt-signing key, so the contract stores it under the address
`ecrecover` returns, and only growing tree sizes. A client holding a receipt then checks that the receipt is
anchored on chain (`check_anchored`): its leaf index is below the on-chain tree size, and the signed tree
head it was proved against extends the on-chain root (RFC 9162 consistency proof), so the provider can no
longer drop or rewrite it without the chain showing a root that its later heads do not extend.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from eth_utils.crypto import keccak

from teecloud.ai.errors import ReceiptInvalid
from teecloud.ai.keyset import RECEIPT_KEY_PURPOSE, KeySet
from teecloud.ai.receiptlog import ReceiptLog, TreeHead, verify_consistency
from teecloud.keys.sigchain import kms_issued_digest, purpose_digest, recover_k256, sign_k256_recoverable

__all__ = ["ROOT_DOMAIN", "RootPublisher", "chain_proof", "check_anchored", "root_digest", "sign_root"]

log = logging.getLogger(__name__)

ROOT_DOMAIN = b"teecloud-ai-receipt-root:"


def root_digest(app_id: bytes, tree_size: int, root: bytes) -> bytes:
    if len(app_id) != 20 or len(root) != 32 or not 0 < tree_size < 2**256:
        raise ValueError("app_id is 20 bytes, root 32 bytes, tree_size positive")
    return keccak(ROOT_DOMAIN + app_id + tree_size.to_bytes(32, "big") + root)


def sign_root(signing_secret: bytes, app_id: bytes, tree_size: int, root: bytes) -> bytes:
    """65-byte r ‖ s ‖ v (v 0/1, low s) over root_digest, what ReceiptRoots.publish takes."""
    return sign_k256_recoverable(signing_secret, root_digest(app_id, tree_size, root))


Publish = Callable[[bytes, int, bytes, bytes], Any]  # (app_id, tree_size, root, signature)


def _xy(compressed: bytes) -> bytes:
    import coincurve

    return bytes(coincurve.PublicKey(compressed).format(compressed=False)[1:])


def chain_proof(keyset: KeySet) -> dict[str, bytes]:
    """What ReceiptRoots.publish_verified checks on chain: the receipt-signing key, the app key and the KMS
    root (x‖y, the last two recovered from the key set's GetKey chain) and the chain's two signatures."""
    app_sig, kms_sig = keyset.signing_key_chain
    app_key = recover_k256(purpose_digest(RECEIPT_KEY_PURPOSE, keyset.signing_public_key), app_sig)
    kms_root = recover_k256(kms_issued_digest(keyset.app_id, app_key), kms_sig)
    return {
        "signing_key": _xy(keyset.signing_public_key),
        "app_signature": app_sig,
        "app_key": _xy(app_key),
        "kms_signature": kms_sig,
        "kms_root_key": _xy(kms_root),
    }


class RootPublisher:
    """Publishes the log's head whenever it grew, every `interval` seconds (a daemon thread), through
    `publish` (teecloud.chain.receiptroots.ReceiptRoots.publish). A failed publication is retried at the
    next tick; the log keeps answering regardless."""

    def __init__(
        self, log_: ReceiptLog, app_id: bytes, signing_secret: bytes, publish: Publish, *, interval: float
    ) -> None:
        self.log = log_
        self.app_id = app_id
        self._secret = signing_secret
        self._publish = publish
        self.interval = interval
        self.published_size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self) -> int | None:
        """Publish the current head if the log grew since the last publication; returns its size."""
        head = self.log.tree_head(self.app_id, self._secret, int(time.time() * 1000))
        if head.tree_size <= self.published_size:
            return None
        sig = sign_root(self._secret, self.app_id, head.tree_size, head.root_hash)
        self._publish(self.app_id, head.tree_size, head.root_hash, sig)
        self.published_size = head.tree_size
        return head.tree_size

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish_once()
            except Exception as exc:  # the chain down, out of gas: retried at the next tick
                log.warning("receipt root not published: %s: %s", type(exc).__name__, exc)

    def start(self) -> RootPublisher:
        self._thread = threading.Thread(target=self._run, name="receipt-root-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def check_anchored(
    leaf_index: int,
    head: TreeHead,
    on_chain_size: int,
    on_chain_root: bytes,
    consistency: Sequence[bytes] | None,
) -> None:
    """The receipt at `leaf_index`, already proved included under the signed `head`, is in the tree the
    chain holds: (1) something is on chain, (2) the leaf is below its size, (3) the head is the on-chain
    tree or extends it (`consistency`: the RFC 9162 proof from the on-chain size to head.tree_size).
    Raises ReceiptInvalid(step="on_chain")."""
    # (1)
    if on_chain_size == 0:
        raise ReceiptInvalid("no receipt root of this app and key is on chain", step="on_chain")
    # (2)
    if leaf_index >= on_chain_size:
        raise ReceiptInvalid(
            f"the receipt (leaf {leaf_index}) is not yet anchored: the chain holds {on_chain_size} receipts",
            step="on_chain",
        )
    # (3)
    if head.tree_size < on_chain_size:
        raise ReceiptInvalid(
            f"the receipt's tree head ({head.tree_size}) is older than the chain's ({on_chain_size}): "
            f"fetch it again with ?since={on_chain_size}",
            step="on_chain",
        )
    if head.tree_size == on_chain_size:
        if head.root_hash != on_chain_root:
            raise ReceiptInvalid(
                "the on-chain root is not the signed head's root: a forked log", step="on_chain"
            )
        return
    if consistency is None:
        raise ReceiptInvalid(
            f"no consistency proof from the on-chain size: fetch the receipt with ?since={on_chain_size}",
            step="on_chain",
        )
    if not verify_consistency(on_chain_size, head.tree_size, on_chain_root, head.root_hash, consistency):
        raise ReceiptInvalid(
            "the signed head does not extend the on-chain root: a forked log", step="on_chain"
        )
