"""R6-2 (FINDING): who can make the committee run env-key ceremonies and burn presignatures.

The only gate before a ceremony is `KmsAuth.registered_apps(app_id)`, and both ways to get there are open to
anyone: `register_app(<any contract>)` ("registering grants nothing by itself"; any contract on the chain
will do, an AppAuth or not) and `deploy_and_register_app(...)` with a compose hash nobody runs. The
attacker's exact steps: one such transaction, then one unauthenticated GetAppEnvEncryptPubKey per node.
Each address costs the committee a Joint-Feldman ceremony among all n members (n^2 sub-share calls), n
sealed files that are never removed, and 2 presignatures per node it asks (then again every 120 s), so the
cost scales with the number of addresses the attacker registers, not with anything a real app does; the
presignature pools are what app boots (ThresholdSignAppKey) also need. Even with no registration at all:
GetAppEnvEncryptPubKey for 3 EXISTING apps on each of 5 nodes (15 unauthenticated requests) empties pools of
24, and the next app boot gets no KMS signature ("no presignature is held by 3 of the answering KMS nodes"),
so GetKey refuses it; pools refill only at `teecloud up` start or by `teecloud kms presign`.

Minimal fix: a node-wide budget on ceremonies and on env-key re-signatures per period (not a per-app one),
and gate the ceremony on an app KmsAuth deployed itself (AppDeployed, the blueprint) rather than any
registered contract. Fixed: every member runs a ceremony and signs only for an app in
`KmsAuth.deployed_apps` (set by deploy_and_register_app only), read through the chain gate at its finality
depth (the test below, formerly a strict xfail; generated mutations in tests/kms/test_threshold_env_gate.py);
an app deployed for a compose hash nobody runs still gets one (the first test), bounded by the budget."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

import pytest

from teecloud.appcompose import compose_hash
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold_env import EnvKeyBusy
from teecloud.tee.simulated import SimulatedTdx
from tests.kms._threshold_env_world import env_files, provider_for, pubkey
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO, boot_hello

pytestmark = pytest.mark.slow


def _unused(m: Member) -> int:
    signer = m.service.threshold.signer  # type: ignore[union-attr]
    assert signer is not None
    return len(signer.pool.unused())


def test_what_one_bare_registration_costs_today(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """The measurement behind R6-2 (passes today, documents the cost of an app KmsAuth deployed for a compose
    hash nobody runs; the next test asserts a registered contract that is no such app costs nothing)."""
    nodes, _ = members
    bare = world.register(secrets.token_bytes(32))  # an AppAuth for a compose hash nobody runs
    before = _unused(nodes[1])
    answers = {pubkey(m, bare).public_key for m in nodes.values()}
    assert len(answers) == 1
    assert all(len(f) == 1 for f in env_files(nodes).values())  # one sealed share per member, forever
    assert before - _unused(nodes[1]) == 2 * len(nodes)  # 2 presignatures for each node asked


def test_a_registered_contract_that_is_no_app_gets_no_ceremony_and_burns_no_presignature(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, _ = members
    before = _unused(nodes[1])
    kms = world.chain.kms
    blueprint = bytes.fromhex(str(kms._call("app_blueprint"))[2:])
    for bare in (bytes.fromhex(kms.address[2:]), blueprint):  # contracts that are not apps, registered
        kms.register_existing_app(bare)
        assert world.chain.is_registered(bare)
        for m in nodes.values():
            with pytest.raises(AccessDenied):
                pubkey(m, bare)
    assert all(f == [] for f in env_files(nodes).values())
    assert _unused(nodes[1]) == before


# R6-2, half fixed: env-key signatures use only presignatures kept for them (threshold_env.env_usable)
def test_unauthenticated_env_key_requests_do_not_starve_app_boots_of_their_signature(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """The attacker's exact steps, with apps that already exist (no registration needed): one
    GetAppEnvEncryptPubKey per node per app, from no identity at all. Safe: an app's boot still gets the
    KMS signature of its k256 key (ThresholdSignAppKey), i.e. env-key signing cannot drain the pools."""
    nodes, signing_key = members
    existing = [world.register(compose_hash(dict(HELLO, name=f"existing-{k}"))) for k in range(3)]
    boot_app = world.register(compose_hash(HELLO))
    for app in existing:
        for m in nodes.values():
            with contextlib.suppress(EnvKeyBusy):
                pubkey(m, app)
    provider = provider_for(nodes, signing_key, SimulatedTdx(teecloud_home))
    boot_hello(teecloud_home, world, provider, app_id=boot_app)
    assert provider.signature_error == ""
