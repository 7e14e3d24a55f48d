# pragma version 0.4.3
"""
@title ReceiptRoots
@notice Published roots of confidential-inference receipt logs (docs/ai.md, teecloud.ai.roots): for each app,
        the latest (tree_size, root) of its RFC 9162 receipt log, signed by the app's receipt-signing key
        (KMS-derived). Anyone may submit (a relayer pays the gas); the head is stored under the key that
        signed it (ecrecover), so nobody can publish for another key, and a head never shrinks: a replayed
        older head is refused. Whether the signing key belongs to the app is checked off chain from its
        GetKey signature chain to the KMS root (`teecloud ai verify`), as for the receipts themselves.
"""

# secp256k1 order / 2: signatures with a higher s are refused (EIP-2 malleability)
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168


struct Head:
    tree_size: uint256
    root: bytes32
    published_at: uint256


event RootPublished:
    app_id: indexed(address)
    signer: indexed(address)
    tree_size: uint256
    root: bytes32


# app_id -> receipt-signing address -> latest head
heads: public(HashMap[address, HashMap[address, Head]])


@view
@external
def head_digest(app_id: address, tree_size: uint256, root: bytes32) -> bytes32:
    return self._digest(app_id, tree_size, root)


@view
@internal
def _digest(app_id: address, tree_size: uint256, root: bytes32) -> bytes32:
    return keccak256(
        concat(b"teecloud-ai-receipt-root:", convert(app_id, bytes20), convert(tree_size, bytes32), root)
    )


@external
def publish(app_id: address, tree_size: uint256, root: bytes32, signature: Bytes[65]) -> address:
    """Store a signed head; returns the signer. The signature is r || s || v (v 0/1 or 27/28)."""
    assert len(signature) == 65, "signature is 65 bytes"
    assert tree_size > 0, "empty tree"
    r: uint256 = convert(slice(signature, 0, 32), uint256)
    s: uint256 = convert(slice(signature, 32, 32), uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    if v < 27:
        v += 27
    assert v == 27 or v == 28, "bad signature v"
    assert s <= HALF_N, "high-s signature"
    signer: address = ecrecover(self._digest(app_id, tree_size, root), v, r, s)
    assert signer != empty(address), "bad signature"
    assert tree_size > self.heads[app_id][signer].tree_size, "tree size does not grow"
    self.heads[app_id][signer] = Head(tree_size=tree_size, root=root, published_at=block.timestamp)
    log RootPublished(app_id=app_id, signer=signer, tree_size=tree_size, root=root)
    return signer
