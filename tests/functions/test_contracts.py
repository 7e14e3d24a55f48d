"""On the embedded EVM: a function deployed on a runtime app registered in KmsAuth, its results checked by
FunctionResultVerifier and accepted by the example FunctionPriceFeed; every forged, expired, replayed,
other-function, disallowed-runtime and superseded-version result reverts."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from eth_utils.crypto import keccak

from teecloud.chain import DEV_KEYS, ContractReverted
from teecloud.chain.functions import (
    FunctionRegistry,
    deploy_function_registry,
    without_chain,
)
from teecloud.functions import (
    NotAllowed,
    SignedResult,
    function_hash_of,
    result_key_purpose,
    sequential_request_id,
)
from teecloud.keys.sigchain import (
    k256_public_key,
    kms_issued_digest,
    purpose_digest,
    sign_k256_recoverable,
)

from . import wat
from .conftest import World
from .test_gas import _execution_gas


def _invoke(w: World, ref: str | None = None, inp: bytes | None = None, ttl_s: int = 300) -> SignedResult:
    return w.runtime.invoke(ref or w.function_hash.hex(), inp or w.price_input, ttl_s=ttl_s).result


def _reverts(w: World, r: SignedResult | tuple, match: str) -> None:  # type: ignore[type-arg]
    abi = r.to_abi() if isinstance(r, SignedResult) else r
    with pytest.raises(ContractReverted, match=match):
        w.feed.submit(abi)


def test_the_consumer_accepts_a_signed_result_once(world: World) -> None:
    w = world
    r = _invoke(w)
    assert int.from_bytes(r.output, "big") == 4242
    assert w.verifier.check(r.to_abi()) == r.output  # a read: nothing recorded
    gas = w.verifier.estimate_gas(r.to_abi())
    w.feed.submit(r.to_abi())
    assert w.feed.price() == 4242 and w.feed.updates() == 1
    _reverts(w, r, "replay")
    print(f"verify gas: {gas}")
    assert 0 < gas < 110_000  # ≈100k today (docs/benchmarks.md): a regression shows here


def test_forged_and_tampered_results_revert(world: World) -> None:
    w = world
    r = _invoke(w)
    base = list(r.to_abi())
    # tampered output / expiry / request id / input: the result signature no longer matches
    for i, v in [(4, (4243).to_bytes(32, "big")), (5, r.expiry - 1), (0, b"\1" * 32)]:
        _reverts(w, (*base[:i], v, *base[i + 1 :]), "bad result signature")
    other_input = list(base)
    other_input[3] = keccak(b"x")
    with pytest.raises(ContractReverted, match="bad result signature"):
        w.verifier.check(tuple(other_input))
    # a key of the attacker's, with a chain made up under the attacker's own "KMS root"
    fake_root, fake_app, fake_key = b"\x21" * 32, b"\x22" * 32, b"\x23" * 32
    forged = SignedResult(**{**r.__dict__, "signature": b"\0" * 65})
    fk_pub = k256_public_key(fake_key)
    app_pub = k256_public_key(fake_app)
    chain_ = (
        sign_k256_recoverable(fake_app, purpose_digest(result_key_purpose(r.function_hash), fk_pub)),
        sign_k256_recoverable(fake_root, kms_issued_digest(r.runtime_app_id, app_pub)),
    )
    forged = SignedResult.sign(fake_key, fk_pub, chain_, **_fields(r))
    _reverts(w, forged, "not the KMS root recorded in KmsAuth")
    # a genuine chain, but the result signed by another key
    stolen_chain = SignedResult.sign(fake_key, r.public_key, r.signature_chain, **_fields(r))
    _reverts(w, stolen_chain, "bad result signature")
    # the key signed by the app key for another purpose (another function's key) does not pass step (5)
    other_purpose = list(base)
    other_purpose[2] = keccak(b"another function")
    with pytest.raises(ContractReverted):
        w.verifier.check(tuple(other_purpose))


def _fields(r: SignedResult) -> dict[str, object]:
    d = dict(r.__dict__)
    for k in ("signature", "public_key", "signature_chain"):
        d.pop(k)
    return d


def test_expired_results_revert(world: World) -> None:
    w = world
    r = _invoke(w, ttl_s=60)
    w.chain.increase_time(120)
    _reverts(w, r, "expired")


def test_results_of_another_function_revert(world: World) -> None:
    w = world
    host = w.outside.url.removeprefix("https://")
    # a second function (its own registry, on the same runtime) computing the same kind of output
    other_fh = function_hash_of(wat.FETCH_ONCE, [host], {})
    other = deploy_function_registry(
        w.chain, w.chain.address or "", "other", "0x" + w.guest.app_id.hex(), other_fh
    )
    w.runtime.deploy(wat.FETCH_ONCE, allowed_hosts=[host], function_id=bytes.fromhex(other.address[2:]))
    r = _invoke(w, other_fh.hex())
    assert w.verifier.check(r.to_abi())  # a valid result ... of another function
    _reverts(w, r, "result of another function")
    # relabelled as the feed's function: its registry does not allow that code hash
    relabelled = list(r.to_abi())
    relabelled[1] = w.registry.address
    _reverts(w, tuple(relabelled), "code hash not allowed")
    # ... and with the feed's code hash too, the key's chain (purpose = its own code hash) does not match
    relabelled[2] = w.function_hash
    _reverts(w, tuple(relabelled), "bad result signature|not signed by the runtime app key")


def test_results_of_a_disallowed_runtime_compose_hash_revert(world: World) -> None:
    w = world
    r = _invoke(w)
    app = w.chain.app("0x" + w.guest.app_id.hex())
    app.add_compose_hash(b"\x99" * 32)
    app.remove_compose_hash(w.guest.compose_hash)
    _reverts(w, r, "runtime compose hash not allowed")


def test_results_of_another_runtime_app_revert(world: World) -> None:
    w = world
    r = _invoke(w)
    other_app = w.chain.kms.register_app(w.chain.address or "", b"\x42" * 32)
    w.registry.propose_set_runtime_app_id(other_app)
    _reverts(w, r, "another runtime app")
    with pytest.raises(NotAllowed, match="another runtime app"):
        _invoke(w)


def test_an_upgrade_through_a_multisig_retires_the_old_hash(world: World) -> None:
    w = world
    chain = w.chain
    owners = [chain.with_signer(k) for k in DEV_KEYS[1:4]]
    ms_addr = chain.deploy_multisig([o.address for o in owners], 2)
    # hand the registry to a 2-of-3 multisig
    chain.transact("FunctionRegistry", w.registry.address, "transfer_ownership", ms_addr)
    from teecloud.chain.connection import abi_of

    pid = (
        owners[0]
        .multisig(ms_addr)
        .propose(w.registry.address, abi_of("FunctionRegistry").encode_call("accept_ownership"))
    )
    owners[1].multisig(ms_addr).approve(pid)
    owners[0].multisig(ms_addr).execute(pid)
    assert w.registry.owner() == ms_addr
    old = _invoke(w)
    # v2 of the function: same module, a lower CPU budget (so another code hash)
    host = w.outside.url.removeprefix("https://")
    v2 = w.runtime.deploy(
        wat.PRICE,
        allowed_hosts=[host],
        limits={"cpu_fuel": 10_000_000},
        function_id=bytes.fromhex(w.registry.address[2:]),
    )
    action = FunctionRegistry(owners[0], w.registry.address).propose_upgrade(
        w.function_hash, v2.function_hash
    )
    assert action.kind == "multisig"
    assert w.registry.is_code_hash_allowed(w.function_hash)  # one approval is not enough
    owners[2].multisig(ms_addr).approve(int(action.ident))
    owners[2].multisig(ms_addr).execute(int(action.ident))
    assert not w.registry.is_code_hash_allowed(w.function_hash) and w.registry.is_code_hash_allowed(
        v2.function_hash
    )
    # the old version's result (signed before the upgrade) is refused now, and the runtime no longer runs it
    _reverts(w, old, "code hash not allowed")
    with pytest.raises(NotAllowed, match="code hash not allowed"):
        _invoke(w)
    new = _invoke(w, v2.function_hash.hex())
    w.feed.submit(new.to_abi())
    assert w.feed.price() == 4242
    # the registry's history shows the upgrade
    events = [e["event"] for e in w.registry.history()]
    assert events[-2:] == ["CodeHashRemoved", "CodeHashAdded"]


def test_a_result_in_json_verifies_on_chain_too(world: World) -> None:
    w = world
    r = SignedResult.from_json(json.dumps(_invoke(w).to_json()))
    w.feed.submit(r.to_abi())
    assert w.feed.updates() == 1 and w.feed.price() == 4242
    assert int(time.time()) <= r.expiry


def test_code_naming_a_function_id_it_does_not_own_does_not_take_its_calls(world: World) -> None:
    from teecloud.functions import RegistryUnavailable

    w = world
    # anyone may deploy code to the runtime and name any function id in it
    impostor = w.runtime.deploy(wat.ECHO, function_id=bytes.fromhex(w.registry.address[2:]))
    r = _invoke(w, w.registry.address)  # by id: the version the registry allows
    assert r.function_hash == w.function_hash and int.from_bytes(r.output, "big") == 4242
    with pytest.raises(NotAllowed, match="code hash not allowed"):
        _invoke(w, impostor.function_hash.hex())
    # a function id that is no registry at all: a clear error, not a crash
    stray = w.runtime.deploy(wat.COUNTER, function_id=b"\0" * 19 + b"\1")
    with pytest.raises(RegistryUnavailable):
        _invoke(w, stray.function_hash.hex())


def test_a_certified_result_key_skips_its_chain_but_no_other_check(world: World) -> None:
    """certify_key checks a result key's chain once and remembers it under the KMS root KmsAuth records
    now; results of that key then skip steps 5-6, and every other check still applies."""
    w = world
    first = _invoke(w)
    full_gas = _execution_gas(w, first)  # a verify transaction by this signer (another consumer)
    assert not w.verifier.is_certified(first.to_abi())
    # a key nobody certified: its chain may not be omitted
    _reverts(w, without_chain(first.to_abi()), "not certified and no signature chain given")
    # a made-up chain under the attacker's own root cannot be certified (nor can a key be relabelled)
    fake_root, fake_app, fake_key = b"\x31" * 32, b"\x32" * 32, b"\x33" * 32
    fk_pub = k256_public_key(fake_key)
    forged_chain = (
        sign_k256_recoverable(fake_app, purpose_digest(result_key_purpose(first.function_hash), fk_pub)),
        sign_k256_recoverable(fake_root, kms_issued_digest(first.runtime_app_id, k256_public_key(fake_app))),
    )
    forged = SignedResult.sign(fake_key, fk_pub, forged_chain, **_fields(first))
    with pytest.raises(ContractReverted, match="not the KMS root recorded in KmsAuth"):
        w.verifier.certify_key(forged.to_abi())
    relabelled = list(first.to_abi())
    relabelled[2] = keccak(b"another function")
    with pytest.raises(ContractReverted, match="not signed by the runtime app key"):
        w.verifier.certify_key(tuple(relabelled))
    assert not w.verifier.is_certified(forged.to_abi()) and not w.verifier.is_certified(tuple(relabelled))

    key_id = w.verifier.certify_key(first.to_abi())
    assert len(key_id) == 32 and w.verifier.is_certified(first.to_abi())
    assert w.verifier.certify_key(first.to_abi()) == key_id  # idempotent
    r = _invoke(w)
    certified_gas = _execution_gas(w, without_chain(r.to_abi()))  # the certification read instead
    print(f"verify gas: full chain {full_gas}, certified key {certified_gas}")
    assert certified_gas < full_gas - 5_000  # two ecrecovers and the hex purpose string skipped
    # still refused: tampered, expired, replayed; the forged chain is not made good by the certified key
    base = list(r.to_abi())
    _reverts(w, (*base[:4], (1).to_bytes(32, "big"), *base[5:]), "bad result signature")
    _reverts(
        w, SignedResult.sign(fake_key, r.public_key, r.signature_chain, **_fields(r)), "bad result signature"
    )
    w.feed.submit(r.to_abi())
    assert w.feed.price() == 4242
    _reverts(w, r, "replay")
    late = _invoke(w, ttl_s=60)
    w.chain.increase_time(120)
    _reverts(w, late, "expired")
    # the KMS root rotated in KmsAuth: the certification no longer applies, and the old chain fails
    fresh = _invoke(w)
    w.chain.kms.set_info(k256_public_key(b"\x44" * 32), b"dev-ca")
    assert not w.verifier.is_certified(fresh.to_abi())
    _reverts(w, fresh, "not the KMS root recorded in KmsAuth")
    _reverts(w, without_chain(fresh.to_abi()), "not certified and no signature chain given")


def test_certify_key_refuses_malformed_keys(world: World) -> None:
    w = world
    abi = list(_invoke(w).to_abi())
    abi[9] = abi[9][:63]
    with pytest.raises(ContractReverted, match="64 bytes"):
        w.verifier.certify_key(tuple(abi))


def _at(w: World, request_id: bytes) -> SignedResult:
    return w.runtime.invoke(w.function_hash.hex(), w.price_input, request_id=request_id).result


def test_the_replay_record_is_one_bit_per_request_id(world_both: World) -> None:
    """Step 7 keeps a bit per (consumer, function, request id), 256 ids differing in their low byte to a
    word: ids taken out of order, with gaps, or across words are each accepted once, a reused id reverts,
    and no id marks a neighbour."""
    w = world_both
    stream = os.urandom(24)
    ids = [sequential_request_id(stream, s) for s in (5, 3, 4, 255, 256, 300, 2**64 - 1)]
    results = [_at(w, rid) for rid in ids]
    for r in results:  # out of order (5 then 3, 4), a gap (to 255), the next words (256, 300), the last id
        w.feed.submit(r.to_abi())
    assert w.feed.updates() == len(ids)
    for r in results:  # reused: each one refused, in any order
        _reverts(w, r, "replay")
    consumer = w.feed.address
    for s in (0, 1, 2, 6, 254, 257, 299, 301, 2**64 - 2):
        assert not w.verifier.is_accepted(consumer, w.registry.address, sequential_request_id(stream, s))
    for rid in ids:
        assert w.verifier.is_accepted(consumer, w.registry.address, rid)
        # per consumer and per function: the same id is free for another consumer or another function
        assert not w.verifier.is_accepted(w.chain.address or "", w.registry.address, rid)
        assert not w.verifier.is_accepted(consumer, w.oracle.address, rid)
    # another stream whose ids differ from these only above the low byte: its own words
    other = bytearray(ids[0])
    other[-2] ^= 1
    assert not w.verifier.is_accepted(consumer, w.registry.address, bytes(other))
    w.feed.submit(_at(w, bytes(other)).to_abi())
    # a second consumer (here: the signer, calling verify itself) takes the same result once too
    w.verifier.verify(results[0].to_abi())
    with pytest.raises(ContractReverted, match="replay"):
        w.verifier.verify(results[0].to_abi())


def test_generated_request_ids_are_accepted_exactly_once(world: World) -> None:
    """Generated ids in three words (random low bytes, some shared): after each is accepted, exactly the
    accepted ones read as used, and every one of them reverts when sent again."""
    w = world
    rng = random.Random(22)
    bases = [os.urandom(31) for _ in range(3)]
    ids = list(dict.fromkeys(rng.choice(bases) + bytes([rng.randrange(256)]) for _ in range(10)))
    done: set[bytes] = set()
    for rid in ids:
        r = _at(w, rid)
        w.verifier.verify(r.to_abi())
        done.add(rid)
        me = w.chain.address or ""
        probes = {b + bytes([x]) for b in bases for x in rng.sample(range(256), 8)} | set(ids)
        for p in probes:
            assert w.verifier.is_accepted(me, w.registry.address, p) == (p in done), p.hex()
        with pytest.raises(ContractReverted, match="replay"):
            w.verifier.verify(r.to_abi())


def test_a_second_id_in_a_word_costs_a_slot_rewrite_not_a_fresh_slot(world: World) -> None:
    w = world
    stream = os.urandom(24)
    first, second = (_at(w, sequential_request_id(stream, s)) for s in (0, 1))
    w.verifier.certify_key(first.to_abi())  # both on the same path (certified key)
    opening = w.verifier.estimate_gas(first.to_abi())
    w.verifier.verify(first.to_abi())
    following = w.verifier.estimate_gas(second.to_abi())
    print(f"verify gas: opening a word {opening}, the next id in it {following}")
    assert following < opening - 12_000  # a fresh slot (~22.1k) vs a rewrite (~5k)


def test_sequential_request_ids_refuse_a_bad_stream_or_number() -> None:
    stream = b"\x07" * 24
    assert sequential_request_id(stream, 258) == stream + (258).to_bytes(8, "big")
    for bad_stream, n in [(b"\x07" * 23, 0), (b"\x07" * 32, 0), (stream, -1), (stream, 2**64)]:
        with pytest.raises(ValueError):
            sequential_request_id(bad_stream, n)
