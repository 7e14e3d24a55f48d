"""FunctionResultVerifier's rule for steps (5)-(6): a chain given must be valid up to the KMS root KmsAuth
records now; a key certified under that root may omit it. Held against the rule it replaced (83e4fe2, "its
key certified, or its chain valid": bench/baseline/FunctionResultVerifier_83e4fe2.vy, deployed twice beside
it on the same KmsAuth and registry, once with the key certified and once without, so the second accepts
exactly the results whose chain is valid): over generated chains (omitted, fields emptied, cut, swapped,
bit-flipped, random, under another root), certified and new keys, and a rotated root, the new rule accepts
a result exactly when its chain is omitted and the old certified verifier accepts it, or its chain is given
and the old uncertified verifier accepts it. So it accepts nothing the old rule refused, and refuses only
certified keys' results whose given chain fails."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode

from teecloud.chain import ContractReverted
from teecloud.chain.functions import FunctionResultVerifier, without_chain
from teecloud.functions.service import function_hash_of
from teecloud.keys.sigchain import k256_public_key

from .conftest import World
from .test_gas import _echo, chain_under_another_root

OLD_RULE = Path(__file__).resolve().parents[2] / "bench" / "baseline" / "FunctionResultVerifier_83e4fe2.vy"
CHAIN = range(10, 14)  # app_signature, app_key, kms_signature, kms_root_key in FunctionResult


def _deploy_old_rule(w: World) -> FunctionResultVerifier:
    import vyper

    code = bytes.fromhex(
        vyper.compile_code(OLD_RULE.read_text(), output_formats=["bytecode"])["bytecode"][2:]
    )
    receipt = w.chain.send(None, code + encode(["address"], [w.chain.kms_auth]))
    return FunctionResultVerifier(w.chain, str(receipt["contractAddress"]))


def _accepts(v: FunctionResultVerifier, abi: tuple[Any, ...]) -> bool:
    try:
        v.check(abi)
    except ContractReverted:
        return False
    return True


def _mutations(abi: tuple[Any, ...], app_id: bytes, rng: random.Random) -> list[tuple[Any, ...]]:
    out = [abi, without_chain(abi), chain_under_another_root(abi, app_id)]
    for i in CHAIN:
        field = bytes(abi[i])
        for new in (
            b"",
            field[:-1],
            field + b"\x00" if len(field) < 65 else field[1:],
            os.urandom(len(field)),
            bytes(len(field)),
        ):
            out.append((*abi[:i], new, *abi[i + 1 :]))
        flipped = bytearray(field)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        out.append((*abi[:i], bytes(flipped), *abi[i + 1 :]))
    # only part of the chain given, or its keys swapped
    out.append((*abi[:10], abi[10], b"", b"", b""))
    out.append((*abi[:10], b"", abi[11], abi[12], abi[13]))
    out.append((*abi[:10], abi[10], abi[13], abi[12], abi[11]))
    # a result key not the one that signed (step 4 refuses, before the chain)
    out.append((*abi[:9], abi[11], *abi[10:]))
    return out


@pytest.mark.slow
def test_a_given_chain_must_hold_and_only_a_certified_key_may_omit_it(
    world: World,
) -> None:
    w = world
    old = _deploy_old_rule(w)
    rng = random.Random(22)
    module = _echo("a key nobody certifies")
    fh_new = function_hash_of(module, [], {})
    w.registry.propose_add_code_hash(fh_new)
    w.runtime.deploy(module, function_id=bytes.fromhex(w.registry.address[2:]))

    def result(fh: bytes, data: bytes) -> tuple[Any, ...]:
        return w.runtime.invoke(fh.hex(), data, request_id=os.urandom(32)).result.to_abi()

    certified = result(w.function_hash, w.price_input)
    for v in (w.verifier, old):
        v.certify_key(certified)
    chain_only = _deploy_old_rule(w)  # never certifies: accepts exactly the results whose chain is valid
    app_id = bytes.fromhex(certified[6][2:])
    compared = accepted = refused_for_a_bad_chain = 0
    for phase in ("recorded root", "rotated root", "recorded root back"):
        if phase == "rotated root":
            w.chain.kms.set_info(k256_public_key(b"\x44" * 32), b"dev-ca")
        elif phase == "recorded root back":
            w.chain.kms.set_info(w.guest.kms_root, b"dev-ca")
        for base in (certified, result(w.function_hash, w.price_input), result(fh_new, b"\x01" * 32)):
            for abi in _mutations(base, app_id, rng):
                old_accepts = _accepts(old, abi)
                chain_given = len(bytes(abi[10])) != 0
                want = _accepts(chain_only, abi) if chain_given else old_accepts
                assert _accepts(w.verifier, abi) == want, (phase, [bytes(abi[i]).hex()[:16] for i in CHAIN])
                assert old_accepts or not want  # nothing the old rule refused
                compared += 1
                accepted += want
                refused_for_a_bad_chain += old_accepts and not want
    # every outcome occurs: certified keys without a chain or with their valid chain, new keys only with
    # their own chain, certified keys with a failing chain refused now (the old rule took them), none rotated
    assert compared > 150 and 10 < accepted < compared - 50, (compared, accepted)
    assert refused_for_a_bad_chain > 10, refused_for_a_bad_chain
