"""Threshold key derivation: a t-of-n verifiable OPRF on ristretto255 (pure functions; no I/O).

The construction (docs/kms.md):
  * RFC 9497 VOPRF, ciphersuite ristretto255-SHA512 (RFC 9497 §4.1): contextString, HashToGroup (RFC 9380
    hash_to_ristretto255 with expand_message_xmd / SHA-512), HashToScalar, DeriveKeyPair (§3.2.1), the
    DLEQ proof GenerateProof / VerifyProof with ComputeComposites(Fast) (§2.2) and Finalize (§3.3.2).
    Used *without blinding* (Blind = 1): every KMS node sees the input, so it can check that the input is
    the attested caller's own context before evaluating. With any other `blind` these functions are the
    RFC's, byte for byte (tests/keys/test_threshold.py runs the RFC 9497 appendix A.1.2 vectors).
  * The server key skS is Shamir-shared (degree t-1 polynomial over the ristretto255 scalar field, shares
    at x = 1..n) with Feldman commitments C_j = a_j·G, so Y_i = s_i·G (node i's public share) is
    computable from the commitments by anyone. Node i returns Z_i = s_i·H(input) and a DLEQ proof
    (GenerateProof(s_i, G, Y_i, [H], [Z_i])) that it used the s_i behind Y_i. The client checks every
    partial against Y_i, and any t valid partials combine by Lagrange interpolation at 0 in the exponent:
    Σ λ_i·Z_i = skS·H(input); Finalize then gives exactly the RFC 9497 VOPRF output under skS.
  * Dealerless key generation: Pedersen's Joint-Feldman DKG (Pedersen, EUROCRYPT '91) with GJKR's
    complaint phase (Gennaro, Jarecki, Krawczyk, Rabin, J. Cryptology 2007, Fig. 2 steps 1(b)-(c), 2, 3:
    gjkr_answers, gjkr_qualify): every dealer shares a random secret with Feldman commitments; a receiver
    checks its share against the dealer's commitments and complains about a dealer whose share does not
    verify; the accused reveals the complained-about sub-shares; a dealer with more than t-1 complaints or a
    missing or wrong answer is disqualified; the qualified set's (QUAL's) sharings are summed.
    Joint-Feldman lets a rushing adversary bias the group key's distribution (GJKR §3): GJKR's Pedersen-
    commitment phase (§4) is not built, so that bias remains (docs/kms.md).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pysodium
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys import _shamir
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem
from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial
from teecloud.keys.kdf import P256_ORDER, derive_key
from teecloud.keys.sigchain import k256_public_key

__all__ = [
    "CONTEXT_STRING",
    "GROUP_ORDER",
    "Dealing",
    "DkgOutcome",
    "Partial",
    "ThresholdError",
    "app_ca_key",
    "app_contexts",
    "app_k256_key",
    "app_keys_from_outputs",
    "combine",
    "deal",
    "derive_key_pair",
    "expand_message_xmd",
    "finalize",
    "generate_proof",
    "gjkr_answers",
    "gjkr_qualify",
    "hash_to_group",
    "hash_to_scalar",
    "joint_feldman",
    "lagrange_at_zero",
    "partial_evaluate",
    "public_share",
    "reshare_commitments",
    "reshare_deal",
    "reshare_receive",
    "verify_partial",
    "verify_proof",
    "verify_share",
]

# RFC 9497 §4.1: ristretto255-SHA512; §3.1 CreateContextString(modeVOPRF = 0x01, identifier).
IDENTIFIER = b"ristretto255-SHA512"
MODE_VOPRF = 0x01
CONTEXT_STRING = b"OPRFV1-" + bytes([MODE_VOPRF]) + b"-" + IDENTIFIER
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493  # RFC 9496 §4.1 (ristretto255 order L)
NE = 32  # serialized element
NS = 32  # serialized scalar
MAX_INPUT_BYTES = 4096
MAX_NODES = 64  # shares live at x = 1..MAX_NODES


class ThresholdError(MalformedKeyMaterial):
    """A partial, proof, share or dealing that does not verify (hostile input; names the party when known)."""

    def __init__(self, message: str, *, party: int | None = None) -> None:
        super().__init__(message)
        self.party = party


# ------------------------------------------------------------------------------------------ primitives


def _i2osp(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """RFC 9380 §5.3.1 expand_message_xmd with SHA-512 (b_in_bytes 64, s_in_bytes 128)."""
    b_in_bytes, s_in_bytes = 64, 128
    ell = -(-len_in_bytes // b_in_bytes)
    if ell > 255 or len_in_bytes > 65535 or len(dst) > 255:
        raise KeyUsageError("expand_message_xmd: output or DST too long")
    dst_prime = dst + _i2osp(len(dst), 1)
    msg_prime = bytes(s_in_bytes) + msg + _i2osp(len_in_bytes, 2) + b"\x00" + dst_prime
    b0 = hashlib.sha512(msg_prime).digest()
    b = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        b.append(
            hashlib.sha512(
                bytes(x ^ y for x, y in zip(b0, b[-1], strict=True)) + _i2osp(i, 1) + dst_prime
            ).digest()
        )
    return b"".join(b)[:len_in_bytes]


def hash_to_group(msg: bytes, *, context: bytes = CONTEXT_STRING) -> bytes:
    """RFC 9380 hash_to_ristretto255 (libsodium's from_hash is RFC 9496's element derivation of 64 bytes)."""
    uniform = expand_message_xmd(msg, b"HashToGroup-" + context, 64)
    return bytes(pysodium.crypto_core_ristretto255_from_hash(uniform))


def hash_to_scalar(msg: bytes, *, dst: bytes | None = None) -> int:
    """RFC 9497 §4.1 HashToScalar: 64 uniform bytes, little-endian, reduced mod the group order."""
    uniform = expand_message_xmd(msg, dst if dst is not None else b"HashToScalar-" + CONTEXT_STRING, 64)
    return int.from_bytes(uniform, "little") % GROUP_ORDER


def _ser_scalar(k: int) -> bytes:
    return (k % GROUP_ORDER).to_bytes(NS, "little")


def _de_scalar(buf: bytes) -> int:
    if len(buf) != NS:
        raise ThresholdError(f"a scalar is {NS} bytes, got {len(buf)}")
    k = int.from_bytes(buf, "little")
    if k >= GROUP_ORDER:
        raise ThresholdError("scalar out of range")
    return k


def _check_element(elem: bytes) -> bytes:
    """RFC 9497 DeserializeElement: a valid ristretto255 encoding, not the identity."""
    if len(elem) != NE or not pysodium.crypto_core_ristretto255_is_valid_point(elem):
        raise ThresholdError("not a valid ristretto255 element")
    if elem == bytes(NE):
        raise ThresholdError("the identity element is not accepted")
    return bytes(elem)


def _mul(k: int, elem: bytes) -> bytes:
    k %= GROUP_ORDER
    if k == 0:
        raise ThresholdError("multiplication by zero")
    return bytes(pysodium.crypto_scalarmult_ristretto255(_ser_scalar(k), elem))


def _mul_base(k: int) -> bytes:
    k %= GROUP_ORDER
    if k == 0:
        raise ThresholdError("multiplication by zero")
    return bytes(pysodium.crypto_scalarmult_ristretto255_base(_ser_scalar(k)))


def _add(a: bytes, b: bytes) -> bytes:
    return bytes(pysodium.crypto_core_ristretto255_add(a, b))


def _sum(elems: Iterable[bytes]) -> bytes:
    total: bytes | None = None
    for e in elems:
        total = e if total is None else _add(total, e)
    if total is None:
        raise KeyUsageError("empty sum")
    return total


GENERATOR = _mul_base(1)


def _lp(data: bytes) -> bytes:
    return _i2osp(len(data), 2) + data


def derive_key_pair(seed: bytes, info: bytes) -> tuple[int, bytes]:
    """RFC 9497 §3.2.1 DeriveKeyPair -> (skS, SerializeElement(pkS))."""
    derive_input = seed + _lp(info)
    for counter in range(256):
        sk = hash_to_scalar(derive_input + _i2osp(counter, 1), dst=b"DeriveKeyPair" + CONTEXT_STRING)
        if sk != 0:
            return sk, _mul_base(sk)
    raise KeyUsageError("DeriveKeyPairError")  # pragma: no cover (probability ~2^-2000)


# -------------------------------------------------------------------------------- DLEQ (RFC 9497 §2.2)


def _composites(b: bytes, c: Sequence[bytes], d: Sequence[bytes], k: int | None) -> tuple[bytes, bytes]:
    seed_dst = b"Seed-" + CONTEXT_STRING
    seed = hashlib.sha512(_lp(b) + _lp(seed_dst)).digest()
    m_terms, z_terms = [], []
    for i, (ci, di) in enumerate(zip(c, d, strict=True)):
        transcript = _lp(seed) + _i2osp(i, 2) + _lp(ci) + _lp(di) + b"Composite"
        s = hash_to_scalar(transcript)
        m_terms.append(_mul(s, ci))
        if k is None:
            z_terms.append(_mul(s, di))
    m = _sum(m_terms)
    z = _mul(k, m) if k is not None else _sum(z_terms)
    return m, z


def _challenge(b: bytes, m: bytes, z: bytes, t2: bytes, t3: bytes) -> int:
    return hash_to_scalar(_lp(b) + _lp(m) + _lp(z) + _lp(t2) + _lp(t3) + b"Challenge")


def generate_proof(
    k: int, a: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes], *, r: int | None = None
) -> bytes:
    """GenerateProof(k, A, B, C, D) -> c ‖ s (64 bytes). `r` only for the RFC's test vectors."""
    m, z = _composites(b, c, d, k)
    if r is None:
        r = secrets.randbelow(GROUP_ORDER - 1) + 1
    t2, t3 = _mul(r, a), _mul(r, m)
    ch = _challenge(b, m, z, t2, t3)
    s = (r - ch * k) % GROUP_ORDER
    return _ser_scalar(ch) + _ser_scalar(s)


def verify_proof(a: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes], proof: bytes) -> bool:
    """VerifyProof(A, B, C, D, proof)."""
    if len(proof) != 2 * NS:
        return False
    try:
        ch, s = _de_scalar(proof[:NS]), _de_scalar(proof[NS:])
        m, z = _composites(b, c, d, None)
        # s·G by libsodium's fixed-base multiplication when A is the generator (the same point, ≈⅓ the CPU)
        t2 = _add(_mul_base(s) if a == GENERATOR else _mul(s, a), _mul(ch, b))
        t3 = _add(_mul(s, m), _mul(ch, z))
    except (ThresholdError, ValueError):  # ValueError: libsodium refused an invalid or identity element
        return False
    return secrets.compare_digest(_ser_scalar(_challenge(b, m, z, t2, t3)), proof[:NS])


def blind(input_: bytes, blind_scalar: int) -> bytes:
    """RFC 9497 §3.3.1 Blind with a given blind (blind = 1: the unblinded mode the KMS uses)."""
    return _mul(blind_scalar, hash_to_group(input_))


def blind_evaluate(sk: int, pk: bytes, blinded: bytes, *, r: int | None = None) -> tuple[bytes, bytes]:
    """RFC 9497 §3.3.2 VOPRF BlindEvaluate -> (evaluatedElement, proof)."""
    evaluated = _mul(sk, _check_element(blinded))
    return evaluated, generate_proof(sk, GENERATOR, pk, [blinded], [evaluated], r=r)


def finalize(input_: bytes, unblinded: bytes) -> bytes:
    """RFC 9497 §3.3.2 Finalize's hash, given N = blind⁻¹·evaluatedElement (64 bytes)."""
    return hashlib.sha512(_lp(input_) + _lp(unblinded) + b"Finalize").digest()


def unblind(blind_scalar: int, evaluated: bytes) -> bytes:
    return _mul(pow(blind_scalar, -1, GROUP_ORDER), evaluated)


# ------------------------------------------------------------------------------- Shamir / Feldman VSS


def _poly_eval(coeffs: Sequence[int], x: int) -> int:
    return _shamir.poly_eval(coeffs, x, GROUP_ORDER)


def _check_params(t: int, n: int) -> None:
    if not 1 <= t <= n <= MAX_NODES:
        raise KeyUsageError(f"need 1 <= t <= n <= {MAX_NODES}, got t={t}, n={n}")


@dataclass(frozen=True)
class Dealing:
    """One dealer's Feldman sharing: commitments C_0..C_{t-1} (public) and the share for each x = 1..n
    (secret: share i goes to node i only, over an attested channel)."""

    dealer: int
    commitments: tuple[bytes, ...]
    shares: dict[int, int]


def deal(secret: int | None, t: int, n: int, *, dealer: int = 0) -> Dealing:
    """Feldman VSS of `secret` (random when None) at threshold t among n."""
    _check_params(t, n)
    a0 = secret if secret is not None else secrets.randbelow(GROUP_ORDER - 1) + 1
    if not 0 < a0 < GROUP_ORDER:
        raise KeyUsageError("secret out of range")
    coeffs = [a0] + [secrets.randbelow(GROUP_ORDER - 1) + 1 for _ in range(t - 1)]
    return Dealing(
        dealer,
        tuple(_mul_base(a) for a in coeffs),
        {x: _poly_eval(coeffs, x) for x in range(1, n + 1)},
    )


def public_share(commitments: Sequence[bytes], x: int) -> bytes:
    """Σ_j x^j·C_j = s_x·G: node x's public share, from the (Feldman) commitments alone."""
    if not 1 <= x <= MAX_NODES or not commitments:
        raise KeyUsageError("share index out of range or no commitments")
    return _sum(_mul(pow(x, j, GROUP_ORDER), _check_element(c)) for j, c in enumerate(commitments))


def verify_share(commitments: Sequence[bytes], x: int, share: int) -> bool:
    """Feldman's check: share·G == Σ_j x^j·C_j."""
    if not 0 < share < GROUP_ORDER:
        return False
    try:
        return _mul_base(share) == public_share(commitments, x)
    except ThresholdError:
        return False


def joint_feldman(
    dealings: Sequence[Dealing], receiver: int, received: dict[int, int]
) -> tuple[int, list[int]]:
    """Receiver `receiver`'s side of a Joint-Feldman DKG round: check every dealer's share against that
    dealer's commitments. Returns (sum of the qualified dealers' shares, dealers to complain about).
    The caller drops a complained-against dealer from the qualified set unless it answers the complaint
    (GJKR §3, step 1.c) — the group key is then Σ over the qualified dealers' C_0."""
    total, complaints = 0, []
    for d in dealings:
        share = received.get(d.dealer)
        if share is None or not verify_share(d.commitments, receiver, share):
            complaints.append(d.dealer)
            continue
        total = (total + share) % GROUP_ORDER
    return total, complaints


# GJKR's complaint phase: Gennaro, Jarecki, Krawczyk, Rabin, "Secure Distributed Key Generation for
# Discrete-Log Based Cryptosystems", J. Cryptology 20(1), 2007, Fig. 2, steps 1(b)-(c), 2 and 3, with
# Feldman commitments in place of step 1's Pedersen ones (so the key-bias remark of GJKR §3 still applies).
# Their polynomials have degree t (t+1 shares reconstruct); ours have degree t-1, so their "more than t
# complaints" is our "more than t-1".


@dataclass(frozen=True)
class DkgOutcome:
    """One receiver's result of the complaint phase: QUAL, the dealers disqualified (with why), this
    receiver's share (Σ over QUAL) and the group commitments (Σ over QUAL; C_0 is the group key)."""

    qual: tuple[int, ...]
    disqualified: dict[int, str]
    share: int
    commitments: tuple[bytes, ...]


def gjkr_answers(dealing: Dealing, complainers: Iterable[int], t: int) -> dict[int, int]:
    """The accused dealer's answer (GJKR Fig. 2, step 1(c)): it reveals s_ij for every receiver j that
    complained against it. With more than t-1 complaints it is disqualified whatever it answers (step 2), so
    it reveals nothing: an honest dealer never reveals t values of its polynomial (GJKR's secrecy argument:
    only corrupt receivers complain against an honest dealer, and they are at most t-1)."""
    against = sorted(set(complainers))
    if len(against) > t - 1:
        return {}
    return {j: dealing.shares[j] for j in against if j in dealing.shares}


def gjkr_qualify(
    dealings: Sequence[Dealing],
    receiver: int,
    received: dict[int, int],
    complaints: dict[int, Sequence[int]],
    answers: dict[int, dict[int, int]],
    t: int,
) -> DkgOutcome:
    """Receiver `receiver`'s decision (GJKR Fig. 2, steps 2 and 3), the same for every receiver given the same
    broadcast `complaints` (receiver j -> the dealers it complained against) and `answers` (dealer i -> the
    sub-shares it revealed, by complainer). A dealer is disqualified when more than t-1 receivers complained
    against it, or when a complaint against it got no answer or an answer that fails its commitments.
    QUAL = the others. This receiver's share from a dealer it complained against is the revealed one; a
    sub-share it did not complain about must verify (else its own complaint was not broadcast: an error).
    Fewer than t dealers in QUAL: ThresholdError (the round fails)."""
    by_dealer = {d.dealer: d for d in dealings}
    if len(by_dealer) != len(dealings):
        raise ThresholdError("a dealer appears twice")
    for j, against in complaints.items():
        if not set(against) <= set(by_dealer):
            raise ThresholdError(f"receiver {j} complained against a dealer that is not in the round")
    disqualified: dict[int, str] = {}
    for i, d in sorted(by_dealer.items()):
        # (2): count the complaints against dealer i; check each answer against i's commitments
        complainers = sorted(j for j, against in complaints.items() if i in against)
        revealed = answers.get(i, {})
        if len(complainers) > t - 1:
            disqualified[i] = f"{len(complainers)} complaints (receivers {complainers}), more than t-1"
            continue
        for j in complainers:
            value = revealed.get(j)
            if value is None:
                disqualified[i] = f"did not answer receiver {j}'s complaint"
                break
            if not verify_share(d.commitments, j, value):
                disqualified[i] = f"answered receiver {j}'s complaint with a value its commitments refuse"
                break
    qual = tuple(i for i in sorted(by_dealer) if i not in disqualified)
    if len(qual) < t:
        raise ThresholdError(
            f"only {len(qual)} qualified dealers, {t} needed; disqualified: "
            + "; ".join(f"dealer {i}: {why}" for i, why in sorted(disqualified.items()))
        )
    # (3): the share is the sum over QUAL, a complained-about sub-share replaced by the revealed one
    mine = set(complaints.get(receiver, ()))
    total = 0
    for i in qual:
        value = answers[i][receiver] if i in mine else received.get(i)
        if value is None or not verify_share(by_dealer[i].commitments, receiver, value):
            raise ThresholdError(f"the sub-share of dealer {i} does not verify and was not complained about")
        total = (total + value) % GROUP_ORDER
    return DkgOutcome(qual, disqualified, total, sum_commitments([by_dealer[i] for i in qual]))


def sum_commitments(dealings: Sequence[Dealing]) -> tuple[bytes, ...]:
    """The group's commitments: C_j = Σ over dealers of their C_j (C_0 is the group public key)."""
    if not dealings:
        raise KeyUsageError("no dealings")
    t = len(dealings[0].commitments)
    if any(len(d.commitments) != t for d in dealings):
        raise ThresholdError("dealers disagree on the threshold")
    return tuple(_sum(d.commitments[j] for d in dealings) for j in range(t))


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod L, for interpolation at 0."""
    return _shamir.lagrange_at_zero(xs, GROUP_ORDER, MAX_NODES)


# ------------------------------------------------------------------ resharing (same key, new committee)


def reshare_deal(index: int, share: int, t_new: int, n_new: int) -> Dealing:
    """Old node `index`'s part of a reshare (Desmedt–Jajodia 1997; Herzberg et al., CRYPTO '95): a Feldman
    sharing of its own share s_i for the new committee. Its C_0 is s_i·G, which the new nodes check against
    the old public share Y_i."""
    return deal(share, t_new, n_new, dealer=index)


def reshare_receive(
    old_commitments: Sequence[bytes], dealings: Sequence[Dealing], receiver: int, received: dict[int, int]
) -> tuple[int, list[int]]:
    """New node `receiver`'s side: every dealing must come from an old share (C_0 == Y_i from the old group's
    commitments) and its sub-share must match its commitments. Returns (the new share, dealers to complain
    about). With no complaint and at least t_old dealings: s'_j = Σ λ_i·f_i(j), a share of the SAME key."""
    t_old = len(old_commitments)
    complaints = []
    for d in dealings:
        ok = d.commitments and d.commitments[0] == public_share(old_commitments, d.dealer)
        if not ok or not verify_share(d.commitments, receiver, received.get(d.dealer, 0)):
            complaints.append(d.dealer)
    if complaints:
        return 0, complaints
    if len(dealings) < t_old:
        raise ThresholdError(f"a reshare needs {t_old} old shares, got {len(dealings)}")
    lam = lagrange_at_zero([d.dealer for d in dealings])
    return sum(lam[d.dealer] * received[d.dealer] for d in dealings) % GROUP_ORDER, []


def reshare_commitments(dealings: Sequence[Dealing]) -> tuple[bytes, ...]:
    """The new committee's commitments C'_k = Σ λ_i·D_{i,k}; C'_0 is the unchanged group public key."""
    lam = lagrange_at_zero([d.dealer for d in dealings])
    t_new = len(dealings[0].commitments)
    if any(len(d.commitments) != t_new for d in dealings):
        raise ThresholdError("reshare dealers disagree on the new threshold")
    return tuple(_sum(_mul(lam[d.dealer], d.commitments[k]) for d in dealings) for k in range(t_new))


# ------------------------------------------------------------------------------ threshold evaluation


@dataclass(frozen=True)
class Partial:
    """Node `index`'s answer: Z_i = s_i·H(input) and its DLEQ proof against Y_i."""

    index: int
    element: bytes
    proof: bytes

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "element": self.element.hex(), "proof": self.proof.hex()}

    @classmethod
    def from_json(cls, doc: object) -> Partial:
        try:
            assert isinstance(doc, dict)
            index, element, proof = (
                int(doc["index"]),
                bytes.fromhex(doc["element"]),
                bytes.fromhex(doc["proof"]),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ThresholdError(f"a partial evaluation is malformed: {exc}") from exc
        if not 1 <= index <= MAX_NODES or len(element) != NE or len(proof) != 2 * NS:
            raise ThresholdError("a partial evaluation has a bad index or size")
        return cls(index, element, proof)


def _check_input(input_: bytes) -> bytes:
    if not isinstance(input_, bytes) or not 0 < len(input_) <= MAX_INPUT_BYTES:
        raise KeyUsageError(f"the VOPRF input must be 1..{MAX_INPUT_BYTES} bytes")
    return input_


def partial_evaluate(index: int, share: int, input_: bytes) -> Partial:
    """Node side: Z_i = s_i·H(input) with GenerateProof(s_i, G, Y_i, [H(input)], [Z_i])."""
    h = hash_to_group(_check_input(input_))
    z = _mul(share, h)
    return Partial(index, z, generate_proof(share, GENERATOR, _mul_base(share), [h], [z]))


def verify_partial(public_share_i: bytes, input_: bytes, partial: Partial) -> bool:
    """Client side: the partial is s_i·H(input) for the s_i behind the public share Y_i."""
    try:
        _check_element(partial.element)
        h = hash_to_group(_check_input(input_))
    except ThresholdError:
        return False
    return verify_proof(GENERATOR, public_share_i, [h], [partial.element], partial.proof)


def combine(input_: bytes, partials: Sequence[Partial], t: int) -> bytes:
    """Any t verified partials -> the RFC 9497 VOPRF output under the group key (64 bytes).
    The caller verifies each partial first (verify_partial); fewer than t is an error."""
    chosen = {p.index: p for p in partials}
    if len(chosen) < t:
        raise ThresholdError(f"{len(chosen)} distinct partials, {t} needed")
    use = sorted(chosen)[:t]
    lam = lagrange_at_zero(use)
    n = _sum(_mul(lam[i], chosen[i].element) for i in use)
    return finalize(input_, n)


# ------------------------------------------------------------------------------ app keys from outputs

APP_CONTEXT_PREFIX = b"teecloud-kms-v1/app\x00"
INSTANCE_CONTEXT_PREFIX = b"teecloud-kms-v1/instance\x00"


def app_contexts(epoch: int, app_id: bytes, instance_id: bytes) -> tuple[bytes, bytes]:
    """The two VOPRF inputs of one app instance: (per app, per instance). The root epoch is an input of
    both, so a new epoch (rotation) gives new keys and an old epoch's keys stay derivable."""
    if not 0 <= epoch < 1 << 32 or not 1 <= len(app_id) <= 64 or len(instance_id) > 64:
        raise KeyUsageError("epoch must be a u32, app_id 1..64 bytes, instance_id at most 64 bytes")
    e = epoch.to_bytes(4, "big")
    app = APP_CONTEXT_PREFIX + e + _lp(app_id)
    return app, INSTANCE_CONTEXT_PREFIX + e + _lp(app_id) + _lp(instance_id)


def app_k256_key(app_output: bytes) -> bytes:
    """The app's k256 key (32 bytes) from its combined VOPRF output (the key the KMS signature covers)."""
    if len(app_output) != 64:
        raise KeyUsageError("VOPRF outputs are 64 bytes")
    k256 = derive_key(app_output, [b"app-key"])
    k256_public_key(k256)  # in range except with probability ~2^-128
    return k256


def app_ca_key(app_output: bytes) -> ec.EllipticCurvePrivateKey:
    """The app CA's P-256 key, from the combined app-level VOPRF output (as app_keys_from_outputs)."""
    okm = derive_key(app_output, [b"app-ca"], 48)
    return ec.derive_private_key(int.from_bytes(okm, "big") % (P256_ORDER - 1) + 1, ec.SECP256R1())


def app_keys_from_outputs(
    app_output: bytes,
    instance_output: bytes,
    app_id: bytes,
    *,
    now: int,
    key_provider_info: dict[str, object],
    gateway_app_id: str = "",
    os_image_hash: bytes = b"",
    k256_signature: bytes = b"",
    kms_k256_pubkey: bytes = b"",
    ca_cert_pem: str = "",
) -> AppKeys:
    """An app instance's keys from the two combined VOPRF outputs (computed inside the attested CVM).

    `k256_signature` is the KMS signature of the app's k256 key made by t nodes (keys.threshold_ecdsa, over
    sigchain.kms_issued_digest) and `kms_k256_pubkey` the group's signing key it verifies under; without
    them (a group with no signing key) dstack's GetKey chain is not available. `ca_cert_pem` is the app CA
    certificate t nodes signed under the group's root CA (teecloud.keys.threshold_certs; its key must be
    the app CA key derived here); without it the app CA certificate is self-signed by the app CA key."""
    if len(app_output) != 64 or len(instance_output) != 64:
        raise KeyUsageError("VOPRF outputs are 64 bytes")
    if k256_signature and (len(k256_signature) != 65 or len(kms_k256_pubkey) != 33):
        raise KeyUsageError("a KMS k256 signature is 65 bytes and its key 33 bytes")
    ca_key = app_ca_key(app_output)
    if ca_cert_pem:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
        if ca_cert.public_key() != ca_key.public_key():
            raise KeyUsageError("the group-signed app CA certificate is for another key than this app's")
    else:
        ca_cert = issue_cert(
            ca_key.public_key(),
            issuer_key=ca_key,
            issuer_name=None,
            subject_cn=f"teecloud app CA {app_id.hex()}"[:64],
            not_before=now - 60,
            not_after=now + 365 * 24 * 3600,
            ca=True,
        )
    k256 = app_k256_key(app_output)
    return AppKeys(
        ca_key_pem=key_to_pem(ca_key),
        ca_cert_pem=cert_to_pem(ca_cert),
        disk_crypt_key=derive_key(instance_output, [b"app-disk-crypt-key"]),
        env_crypt_key=derive_key(app_output, [b"env-encrypt-key"]),
        k256_key=k256,
        k256_signature=bytes(k256_signature),
        kms_k256_pubkey=bytes(kms_k256_pubkey),
        key_provider_info=dict(key_provider_info),
        gateway_app_id=gateway_app_id,
        os_image_hash=bytes(os_image_hash),
    )
