# pragma version 0.4.3
"""
@title FunctionResultVerifier
@notice Checks a teecloud function's signed result (teecloud.functions.result) up to the KMS root
        recorded in KmsAuth, and refuses a replay per consumer. Steps of `verify`:
        (1) not expired; (2) the function's registry allows this code hash on this runtime app;
        (3) the runtime app allows the compose hash the runtime booted with;
        (4) the result key signed the result digest;
        (5) the runtime app key signed the result key for purpose "teecloud-fn-result:<code hash>";
        (6) the KMS root in KmsAuth signed the app key for this app (dstack's GetKey chain); the given root
            key is compared with KmsAuth's kms_k256_pubkey_hash (one slot), read at every check, so a
            rotated root refuses results under the old one at once. (5)-(6) hold when the chain given is
            valid or, read only when the chain is omitted (empty app signature) or fails, the result key
            is certified (certify_key) under the root recorded now;
        (7) the request was not accepted before by this consumer (msg.sender): one bit per
            (consumer, function, request id), 256 ids that differ only in their low byte to a storage word.
        Keys come as x‖y (64 bytes): ecrecover yields addresses, and keccak256(x‖y) gives a key's address.
"""

MAX_OUTPUT: constant(uint256) = 4096

struct FunctionResult:
    request_id: bytes32
    function_id: address
    function_hash: bytes32
    input_hash: bytes32
    output: Bytes[MAX_OUTPUT]
    expiry: uint256
    runtime_app_id: address
    runtime_compose_hash: bytes32
    signature: Bytes[65]
    result_key: Bytes[64]
    app_signature: Bytes[65]
    app_key: Bytes[64]
    kms_signature: Bytes[65]
    kms_root_key: Bytes[64]


interface IKmsAuth:
    def kms_k256_pubkey_hash() -> bytes32: view

interface IAppAuth:
    def allowed_compose_hashes(compose_hash: bytes32) -> bool: view

interface IFunctionRegistry:
    def check(code_hash: bytes32, runtime_app_id: address) -> uint256: view


event KeyCertified:
    key_id: indexed(bytes32)
    runtime_app_id: indexed(address)
    function_hash: bytes32

event ResultAccepted:
    consumer: indexed(address)
    function_id: indexed(address)
    request_id: indexed(bytes32)
    function_hash: bytes32


kms_auth: public(immutable(address))  # immutable: read from code, not a storage slot
# keccak256(consumer ‖ function_id ‖ request_id >> 8) -> bit (request_id & 255) set: accepted. Ids that count
# up (FunctionOracle's, teecloud.functions.sequential_request_id) share a word: after the word's first id,
# marking one rewrites a non-zero slot (~5k gas) instead of filling a fresh one (~22k). Random ids open a
# word each, as one slot per id did. The set of accepted (consumer, function, id) is the same either way.
accepted_words: HashMap[bytes32, uint256]
# keccak256(keccak256(KMS root) ‖ runtime app ‖ code hash ‖ result key x‖y) -> its chain checked (certify_key)
certified: public(HashMap[bytes32, bool])

TYPEHASH: constant(bytes32) = keccak256("teecloud-fn-result-v1")
LO128: constant(uint256) = 2**128 - 1
PURPOSE_PREFIX: constant(bytes19) = 0x746565636c6f75642d666e2d726573756c743a  # "teecloud-fn-result:"


@deploy
def __init__(auth: address):
    assert auth != empty(address), "no KmsAuth"
    # a KmsAuth deployed before kms_k256_pubkey_hash existed would make every check revert: refuse it here
    ok: bool = False
    answer: Bytes[32] = b""
    ok, answer = raw_call(
        auth, method_id("kms_k256_pubkey_hash()"), max_outsize=32, is_static_call=True, revert_on_failure=False
    )
    assert ok and len(answer) == 32, "KmsAuth has no kms_k256_pubkey_hash: redeploy KmsAuth"
    kms_auth = auth


@internal
@pure
def _signer(digest: bytes32, sig: Bytes[65], xy: Bytes[64]) -> bool:
    """Whether `sig` over `digest` recovers to the key x‖y (its address: the low 20 bytes of keccak256(x‖y))."""
    assert len(sig) == 65, "a signature is 65 bytes"
    assert len(xy) == 64, "a public key is x||y, 64 bytes"
    v: uint256 = convert(extract32(sig, 33), uint256) & 255  # the last byte (the length is 65)
    if v < 27:
        v += 27
    signer: address = ecrecover(digest, v, extract32(sig, 0), extract32(sig, 32))
    assert signer != empty(address), "unrecoverable signature"
    return signer == convert(convert(keccak256(xy), uint256) & (2**160 - 1), address)


@internal
@pure
def _hex16(v: uint256) -> bytes32:
    """32 lowercase hex characters of the low 16 bytes of v: spread the 16 bytes to one nibble per byte
    (masks 0xFFFFFFFFFFFFFFFF0..0, 0xFFFFFFFF0..0FFFFFFFF0..0, ... 0xF000F000..., in decimal because Vyper
    reads a 64-digit hex literal as bytes32), then add "0" (0x30) and, for nibbles above 9, 39 more ("a").
    The additions and the product are unchecked: every byte stays below 0x100 (a nibble + 6 <= 0x15, a
    0/1 flag * 39 <= 0x27, 0x30 + 0x0f + 0x27 = 0x66), so no carry crosses a byte and none can overflow."""
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
    letters: uint256 = (
        unsafe_add(r, 2724519746760381068789905529616186067135764345073895624457825506068544226822) >> 4
    ) & 6811299366900952671974763824040465167839410862684739061144563765171360567055
    return convert(
        unsafe_add(
            unsafe_add(21796157974083048550319244236929488537086114760591164995662604048548353814576, r),
            unsafe_mul(letters, 39),
        ),
        bytes32,
    )


@internal
@pure
def _key_id(root_hash: bytes32, runtime_app_id: address, function_hash: bytes32, result_key: Bytes[64]) -> bytes32:
    """What a certification covers: the KMS root, the runtime app, the code hash and the result key."""
    return keccak256(concat(root_hash, convert(runtime_app_id, bytes20), function_hash, result_key))


# why a given chain fails (_chain_fault); 0: it holds. NO_CHAIN: omitted (no app signature given).
NO_CHAIN: constant(uint256) = 7


@internal
@pure
def _fail(fault: uint256):
    """Revert with the reason of a chain fault (codes of _recovers and _chain_fault)."""
    if fault == 1:
        raise "a signature is 65 bytes"
    if fault == 2:
        raise "a public key is x||y, 64 bytes"
    if fault == 3:
        raise "unrecoverable signature"
    if fault == 4:
        raise "result key not signed by the runtime app key"
    if fault == 5:
        raise "app key not signed by the KMS root key given"
    if fault == 6:
        raise "not the KMS root recorded in KmsAuth"
    raise "result key not certified and no signature chain given"


@internal
@pure
def _recovers(digest: bytes32, sig: Bytes[65], xy: Bytes[64]) -> uint256:
    """_signer without reverting: 0 when `sig` over `digest` recovers to x‖y; else 1 (signature not 65
    bytes), 2 (key not 64 bytes), 3 (unrecoverable) or 4 (another key)."""
    if len(sig) != 65:
        return 1
    if len(xy) != 64:
        return 2
    v: uint256 = convert(extract32(sig, 33), uint256) & 255  # the last byte (the length is 65)
    if v < 27:
        v += 27
    signer: address = ecrecover(digest, v, extract32(sig, 0), extract32(sig, 32))
    if signer == empty(address):
        return 3
    if signer != convert(convert(keccak256(xy), uint256) & (2**160 - 1), address):
        return 4
    return 0


@internal
@view
def _chain_fault(
    root_hash: bytes32,
    runtime_app_id: address,
    function_hash: bytes32,
    result_key: Bytes[64],
    app_signature: Bytes[65],
    app_key: Bytes[64],
    kms_signature: Bytes[65],
    kms_root_key: Bytes[64],
) -> uint256:
    """Steps (5) and (6), without reverting: 0 when `result_key` is the key the KMS derived for (runtime
    app, code hash) under the root whose hash KmsAuth records (`root_hash`: keccak256 of the SEC1 key, 33
    or 65 bytes, as set); else the first failing check's code (_fail gives its reason)."""
    if len(result_key) != 64 or len(app_key) != 64 or len(kms_root_key) != 64:
        return 2
    # (5) "teecloud-fn-result:<code hash hex>:<compressed result key hex>", built from fixed-size pieces
    fh: uint256 = convert(function_hash, uint256)
    kx: uint256 = convert(extract32(result_key, 0), uint256)
    purpose_digest: bytes32 = keccak256(
        concat(
            PURPOSE_PREFIX,
            self._hex16(fh >> 128),
            self._hex16(fh & LO128),
            # ":02" or ":03" (0x3a3032 + 1 when y is odd): the compressed key's SEC1 prefix, inline
            convert(convert(3813426 + (convert(extract32(result_key, 32), uint256) & 1), uint24), bytes3),
            self._hex16(kx >> 128),
            self._hex16(kx & LO128),
        )
    )
    fault: uint256 = self._recovers(purpose_digest, app_signature, app_key)
    if fault != 0:
        return fault
    # (6)
    app_compressed: Bytes[33] = concat(
        convert(convert(2 + (convert(extract32(app_key, 32), uint256) & 1), uint8), bytes1), extract32(app_key, 0)
    )
    issued_digest: bytes32 = keccak256(
        concat(b"dstack-kms-issued:", convert(runtime_app_id, bytes20), app_compressed)
    )
    fault = self._recovers(issued_digest, kms_signature, kms_root_key)
    if fault == 4:
        return 5
    if fault != 0:
        return fault
    root_compressed: Bytes[33] = concat(
        convert(convert(2 + (convert(extract32(kms_root_key, 32), uint256) & 1), uint8), bytes1),
        extract32(kms_root_key, 0),
    )
    # the hash of a 33-byte and of a 65-byte string: equal to root_hash only for the same length and bytes
    if root_hash != keccak256(root_compressed) and root_hash != keccak256(concat(b"\x04", kms_root_key)):
        return 6
    return 0


@external
def certify_key(
    runtime_app_id: address,
    function_hash: bytes32,
    result_key: Bytes[64],
    app_signature: Bytes[65],
    app_key: Bytes[64],
    kms_signature: Bytes[65],
    kms_root_key: Bytes[64],
) -> bytes32:
    """@notice Check a result key's chain (steps 5 and 6) once and remember the conclusion, keyed by
    everything it rests on (the KMS root KmsAuth records now, the runtime app, the code hash, the key):
    later results signed by that key skip the two ecrecovers. A rotated root gives other ids, so a key
    certified under the old root is checked in full again. Anyone may call it; it only records a fact."""
    assert len(result_key) == 64, "a public key is x||y, 64 bytes"
    root_hash: bytes32 = staticcall IKmsAuth(kms_auth).kms_k256_pubkey_hash()
    fault: uint256 = self._chain_fault(
        root_hash, runtime_app_id, function_hash, result_key, app_signature, app_key, kms_signature, kms_root_key
    )
    if fault != 0:
        self._fail(fault)
    key_id: bytes32 = self._key_id(root_hash, runtime_app_id, function_hash, result_key)
    if not self.certified[key_id]:
        self.certified[key_id] = True
        log KeyCertified(key_id=key_id, runtime_app_id=runtime_app_id, function_hash=function_hash)
    return key_id


@external
@view
def is_certified(runtime_app_id: address, function_hash: bytes32, result_key: Bytes[64]) -> bool:
    """@notice Whether this result key is certified under the KMS root KmsAuth records now."""
    root_hash: bytes32 = staticcall IKmsAuth(kms_auth).kms_k256_pubkey_hash()
    return self.certified[self._key_id(root_hash, runtime_app_id, function_hash, result_key)]


@internal
@pure
def _word_key(consumer: address, function_id: address, request_id: bytes32) -> bytes32:
    word: bytes32 = convert(convert(request_id, uint256) >> 8, bytes32)
    return keccak256(concat(convert(consumer, bytes20), convert(function_id, bytes20), word))


@external
@view
def is_accepted(consumer: address, function_id: address, request_id: bytes32) -> bool:
    """@notice Whether `consumer` accepted a result of `function_id` for `request_id` (step 7 records it)."""
    bit: uint256 = 1 << (convert(request_id, uint256) & 255)
    return self.accepted_words[self._word_key(consumer, function_id, request_id)] & bit != 0


@external
def verify(r: FunctionResult) -> Bytes[MAX_OUTPUT]:
    """@notice Check `r` for the calling consumer and mark its request used; returns the output."""
    # (1)
    assert block.timestamp <= r.expiry, "result expired"
    # (2)
    status: uint256 = staticcall IFunctionRegistry(r.function_id).check(r.function_hash, r.runtime_app_id)
    assert status != 1, "code hash not allowed"
    assert status == 0, "another runtime app"
    # (3)
    assert staticcall IAppAuth(r.runtime_app_id).allowed_compose_hashes(r.runtime_compose_hash), (
        "runtime compose hash not allowed"
    )
    # (4)
    digest: bytes32 = keccak256(
        abi_encode(
            TYPEHASH,
            r.request_id,
            r.function_id,
            r.function_hash,
            r.input_hash,
            keccak256(r.output),
            r.expiry,
            r.runtime_app_id,
            r.runtime_compose_hash,
        )
    )
    assert self._signer(digest, r.signature, r.result_key), "bad result signature"
    # (5), (6): a chain given must hold up to the KMS root KmsAuth records now; a result key certified
    # earlier under that root may omit it (an empty app signature). Whatever evidence is given must be valid:
    # a certified key with a chain that fails is refused, not rescued by its certification.
    root_hash: bytes32 = staticcall IKmsAuth(kms_auth).kms_k256_pubkey_hash()
    if len(r.app_signature) != 0:
        fault: uint256 = self._chain_fault(
            root_hash, r.runtime_app_id, r.function_hash, r.result_key, r.app_signature, r.app_key, r.kms_signature,
            r.kms_root_key,
        )
        if fault != 0:
            self._fail(fault)
    elif not self.certified[self._key_id(root_hash, r.runtime_app_id, r.function_hash, r.result_key)]:
        self._fail(NO_CHAIN)
    # (7)
    word_key: bytes32 = self._word_key(msg.sender, r.function_id, r.request_id)
    bit: uint256 = 1 << (convert(r.request_id, uint256) & 255)
    word: uint256 = self.accepted_words[word_key]
    assert word & bit == 0, "result already accepted (replay)"
    self.accepted_words[word_key] = word | bit
    log ResultAccepted(consumer=msg.sender, function_id=r.function_id, request_id=r.request_id, function_hash=r.function_hash)
    return r.output
