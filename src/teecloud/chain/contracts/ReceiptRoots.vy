# pragma version 0.4.3
"""
@title ReceiptRoots
@notice Published roots of confidential-inference receipt logs (docs/ai.md, teecloud.ai.roots): for each app,
        the latest (tree_size, root) of its RFC 9162 receipt log, signed by the app's receipt-signing key
        (KMS-derived). Anyone may submit (a relayer pays the gas); the head is stored under the key that
        signed it (ecrecover), so nobody can publish for another key, and a head never shrinks: a replayed
        older head is refused. `publish` leaves it to readers to check that the signing key belongs to the
        app (its GetKey signature chain to the KMS root, as `teecloud ai verify` does); `publish_verified`
        checks that chain here, up to the KMS root recorded in KmsAuth, and keeps `verified_heads[app_id]`:
        a head only the app's own KMS-issued receipt key can have published.
"""

interface IKmsAuth:
    def kms_k256_pubkey() -> Bytes[65]: view

LO128: constant(uint256) = 2**128 - 1

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
# app_id -> latest head signed by the app's KMS-issued receipt key (publish_verified)
verified_heads: public(HashMap[address, Head])
kms_auth: public(address)


@deploy
def __init__(kms_auth: address):
    """`kms_auth`: the KmsAuth whose k256 root publish_verified checks (empty: publish only)."""
    self.kms_auth = kms_auth


@internal
@pure
def _recover(digest: bytes32, sig: Bytes[65]) -> address:
    assert len(sig) == 65, "signature is 65 bytes"
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    if v < 27:
        v += 27
    assert v == 27 or v == 28, "bad signature v"
    assert convert(extract32(sig, 32), uint256) <= HALF_N, "high-s signature"
    signer: address = ecrecover(digest, v, extract32(sig, 0), extract32(sig, 32))
    assert signer != empty(address), "bad signature"
    return signer


@internal
@pure
def _address_of(xy: Bytes[64]) -> address:
    assert len(xy) == 64, "a public key is x||y, 64 bytes"
    return convert(convert(keccak256(xy), uint256) & (2**160 - 1), address)


@internal
@pure
def _hex16(v: uint256) -> bytes32:
    """32 lowercase hex characters of the low 16 bytes of v: spread the 16 bytes to one nibble per byte
    (masks 0xFFFFFFFFFFFFFFFF0..0, 0xFFFFFFFF0..0FFFFFFFF0..0, ... 0xF000F000..., in decimal because Vyper
    reads a 64-digit hex literal as bytes32), then add "0" (0x30) and, for nibbles above 9, 39 more ("a")."""
    r: uint256 = v << 128
    m1: uint256 = 115792089237316195417293883273301227089434195242432897623355228563449095127040
    m2: uint256 = 6277101735386680763495507056286727952638980837032266301440
    r = (r & m1) | ((r & m2) >> 64)
    r = (r & 115792089210356248756420345214020892766590636358845129917866121796647743651840) | (
        (r & 26959946660873538059280334323183841250508706168934034630159410135040) >> 32
    )
    r = (r & 115790322390251417045518407665602541580876576382886237870932034214514906890240) | (
        (r & 1766820104831717179039282343530312218946480962873630338606751010353315840) >> 16
    )
    r = (r & 115339776415587563416932325264655436961555197117815440296434705327231273533440) | (
        (r & 450546001623388919597391895565060300631074988741466563657948067684497162240) >> 8
    )
    r = ((r & 108556740104382498616376002425174106332568976239520199200187288646466509271040) >> 4) | (
        (r & 6784796256523906163523500151573381645785561014970012450011705540404156829440) >> 8
    )
    letters: uint256 = ((r + 2724519746760381068789905529616186067135764345073895624457825506068544226822) >> 4) & (
        6811299366900952671974763824040465167839410862684739061144563765171360567055
    )
    return convert(21796157974083048550319244236929488537086114760591164995662604048548353814576 + r + letters * 39, bytes32)


@internal
@pure
def _hex32(b: bytes32) -> Bytes[64]:
    v: uint256 = convert(b, uint256)
    return concat(self._hex16(v >> 128), self._hex16(v & LO128))


@internal
@pure
def _compressed_prefix(xy: Bytes[64]) -> uint256:
    return 2 + (convert(extract32(xy, 32), uint256) & 1)


@internal
@pure
def _compressed(xy: Bytes[64]) -> Bytes[33]:
    return concat(convert(convert(self._compressed_prefix(xy), uint8), bytes1), extract32(xy, 0))


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
    assert tree_size > 0, "empty tree"
    signer: address = self._recover(self._digest(app_id, tree_size, root), signature)
    assert tree_size > self.heads[app_id][signer].tree_size, "tree size does not grow"
    self.heads[app_id][signer] = Head(tree_size=tree_size, root=root, published_at=block.timestamp)
    log RootPublished(app_id=app_id, signer=signer, tree_size=tree_size, root=root)
    return signer


@external
def publish_verified(
    app_id: address,
    tree_size: uint256,
    root: bytes32,
    signature: Bytes[65],
    signing_key: Bytes[64],
    app_signature: Bytes[65],
    app_key: Bytes[64],
    kms_signature: Bytes[65],
    kms_root_key: Bytes[64],
) -> address:
    """Store a head signed by the app's KMS-issued receipt key. Steps: (1) the head is signed by
    `signing_key`; (2) the app key signed keccak256("teecloud-ai-receipt:" ‖ hex(compressed signing key));
    (3) the KMS root signed keccak256("dstack-kms-issued:" ‖ app_id ‖ compressed app key); (4) that root is
    the one KmsAuth records; (5) the tree grew."""
    assert self.kms_auth != empty(address), "no KmsAuth configured"
    assert tree_size > 0, "empty tree"
    # (1)
    signer: address = self._recover(self._digest(app_id, tree_size, root), signature)
    assert signer == self._address_of(signing_key), "head not signed by the signing key given"
    # (2)
    key_hex: Bytes[66] = concat(
        slice(self._hex16(self._compressed_prefix(signing_key)), 30, 2),
        self._hex32(extract32(signing_key, 0)),
    )
    purpose: bytes32 = keccak256(concat(b"teecloud-ai-receipt:", key_hex))
    assert self._recover(purpose, app_signature) == self._address_of(app_key), (
        "signing key not issued by the app key"
    )
    # (3)
    issued: bytes32 = keccak256(concat(b"dstack-kms-issued:", convert(app_id, bytes20), self._compressed(app_key)))
    assert self._recover(issued, kms_signature) == self._address_of(kms_root_key), (
        "app key not signed by the KMS root key given"
    )
    # (4)
    recorded: Bytes[65] = staticcall IKmsAuth(self.kms_auth).kms_k256_pubkey()
    assert (len(recorded) == 33 and keccak256(recorded) == keccak256(self._compressed(kms_root_key))) or (
        len(recorded) == 65 and keccak256(recorded) == keccak256(concat(b"\x04", kms_root_key))
    ), "not the KMS root recorded in KmsAuth"
    # (5)
    assert tree_size > self.verified_heads[app_id].tree_size, "tree size does not grow"
    self.verified_heads[app_id] = Head(tree_size=tree_size, root=root, published_at=block.timestamp)
    log RootPublished(app_id=app_id, signer=signer, tree_size=tree_size, root=root)
    return signer
