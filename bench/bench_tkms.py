"""Threshold KMS benchmark (issue 19): key release at t=3 of 5 vs the single-node path, same run; DKG and
reshare durations at 3-of-5 and 4-of-7.

Part 1 (crypto only, one process): one node's ThresholdEvaluate crypto (two partial evaluations with
DLEQ proofs), the client's checks and combination at t=3, and the single node's whole-key derivation.
Part 2 (end to end): five threshold KMS nodes and one single KMS, each its own KmsService and RA-TLS
listener (threads of this process: the GIL is shared, so the threshold figure is pessimistic), embedded
chain. Per release: a fresh simulated CVM boots with the provider's boot-nonce (not timed), then
`get_app_keys` is timed: mutual RA-TLS to the nodes (temp CA + ThresholdEvaluate each; the threshold
client asks all reachable nodes in parallel), every partial's proof checked, any 3 combined, keys derived.

Part 4 (`--processes`, run alone): the same release against `teecloud up`'s own KMS setups, each in a
fresh data directory: the single KMS (`LocalCloud()`: its listener is a thread of this process) and five
threshold nodes as separate `teecloud kms up --threshold-node I` processes (`LocalCloud(kms_nodes=5,
kms_threshold=3)`: networked DKG, signing key and a batch of 32 presignatures first, untimed). Timed:
`get_app_keys` of the cloud's own key provider for a fresh simulated CVM (boot-nonce measured first,
untimed) — for the threshold group including the KMS signature of the app key (one presignature from t
nodes), which the single node's GetAppKey also returns. Two cases each: first boots (a fresh app per
release: the threshold boot runs the signing round and hands the signatures to the nodes to keep) and
repeat boots (one app booted again and again: the nodes return the kept signatures in their evaluate
answers, one attested round).

    python bench/bench_tkms.py [--releases 30] [--crypto-iters 200]
    python bench/bench_tkms.py --processes [--releases 20]    # under flock /tmp/teecloud-e2e.lock
    python bench/bench_tkms.py --processes --py-spy DIR       # + py-spy profiles of the timed releases

`--processes` and `--threads-http` also report CPU ms per release (kernel CPU-time clocks: per node process,
the client's threads and the rest of this process; `--threads-http`: the whole process), the figure that
holds on a shared, loaded machine (`_Cpu`). `--py-spy-on-cpu` drops py-spy's `--idle`.

`--py-spy DIR` (needs py-spy on PATH) samples this process (client, single KMS, chain RPC server) and every
node process, wall clock (--idle), while one case's releases run: DIR/<nodes>-<first|repeat>-<who>.txt,
collapsed stacks. The profiler slows every process several-fold: read shares from it, not times.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.kms: the five-member setups the tests use


def _ms(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def crypto(iters: int) -> list[tuple[str, float, float]]:
    from teecloud.keys import threshold as th
    from teecloud.keys.appkeys import RootKeys, derive_app_keys

    app, inst = b"\x11" * 20, b"\x22" * 20
    d = th.deal(None, 3, 5)
    xs = th.app_contexts(1, app, inst)
    ys = {i: th.public_share(d.commitments, i) for i in range(1, 6)}
    parts = {i: [th.partial_evaluate(i, d.shares[i], x) for x in xs] for i in (1, 2, 3)}

    def node() -> None:
        for x in xs:
            th.partial_evaluate(2, d.shares[2], x)

    def client() -> None:
        for i in (1, 2, 3):
            for x, p in zip(xs, parts[i], strict=True):
                assert th.verify_partial(ys[i], x, p)
        outs = [th.combine(x, [parts[i][k] for i in (1, 2, 3)], 3) for k, x in enumerate(xs)]
        th.app_keys_from_outputs(outs[0], outs[1], app, now=int(time.time()), key_provider_info={})

    root = RootKeys.generate()
    rows = [
        ("node: ThresholdEvaluate crypto (2 partials + DLEQ)", *_ms(node, iters)),
        ("client at t=3: 6 proof checks + 2 combinations + key derivation", *_ms(client, iters)),
        (
            "single node: whole-key derive_app_keys",
            *_ms(lambda: derive_app_keys(root, app, inst, now=1), iters),
        ),
    ]

    def dkg(t: int, n: int) -> None:
        dealings = [th.deal(None, t, n, dealer=k) for k in range(1, n + 1)]
        th.sum_commitments(dealings)
        for r in range(1, n + 1):
            th.joint_feldman(dealings, r, {x.dealer: x.shares[r] for x in dealings})

    def reshare(d0: th.Dealing, old: list[int], t: int, n: int) -> None:
        ds = [th.reshare_deal(i, d0.shares[i], t, n) for i in old]
        for j in range(1, n + 1):
            th.reshare_receive(d0.commitments, ds, j, {x.dealer: x.shares[j] for x in ds})
        th.reshare_commitments(ds)

    d47 = th.deal(None, 4, 7)
    few = max(5, iters // 20)
    rows += [
        ("DKG Joint-Feldman 3-of-5 (all parties, one process)", *_ms(lambda: dkg(3, 5), few)),
        ("DKG Joint-Feldman 4-of-7 (all parties, one process)", *_ms(lambda: dkg(4, 7), few)),
        ("reshare 3-of-5 -> 4-of-7", *_ms(lambda: reshare(d, [1, 2, 3], 4, 7), few)),
        ("reshare 4-of-7 -> 3-of-5", *_ms(lambda: reshare(d47, [1, 2, 3, 4], 3, 5), few)),
    ]
    return rows


def signatures(iters: int) -> list[tuple[str, float, float]]:
    """Threshold ECDSA (secp256k1, then P-256) and threshold X25519 at t=3 of 5, one process, vs one whole
    key."""
    import coincurve
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from teecloud.keys import threshold_ecdh as td
    from teecloud.keys import threshold_ecdsa as te
    from teecloud.keys.envcrypt import encrypt_env

    digest = hashlib.sha256(b"bench").digest()
    keys = te.dkg_local(3, 5)
    ps = te.presign_local(keys, [1, 2, 3, 4, 5])
    shares = [te.sign_share(ps[i], digest) for i in (1, 2, 3)]
    whole = coincurve.PrivateKey()
    few = max(5, iters // 10)

    env_keys = td.dkg_local(3, 5)
    blob = encrypt_env(td.x25519_public_key(env_keys[0].commitments), {"A": "b"})
    point = td.ephemeral_point(blob)
    app = b"\x11" * 20
    parts = [td.partial_decrypt(s, app, point) for s in env_keys[:3]]
    x_whole = X25519PrivateKey.generate()
    x_peer = X25519PrivateKey.generate().public_key()
    return [
        (
            "tECDSA presignature 3-of-5 (5 participants' math, one process)",
            *_ms(lambda: te.presign_local(keys, [1, 2, 3, 4, 5]), few),
        ),
        ("tECDSA node: one signature share", *_ms(lambda: te.sign_share(ps[2], digest), iters)),
        (
            "tECDSA client at t=3: 3 share checks + combine + recover check",
            *_ms(lambda: te.combine_signature(ps[1], digest, shares), iters),
        ),
        (
            "single key: secp256k1 sign_recoverable (libsecp256k1)",
            *_ms(lambda: whole.sign_recoverable(digest, hasher=None), iters),
        ),
        (
            "tECDH node: one partial + Chaum-Pedersen proof",
            *_ms(lambda: td.partial_decrypt(env_keys[1], app, point), iters),
        ),
        (
            "tECDH client at t=3: point decode + 3 proof checks + combine",
            *_ms(lambda: td.combine(env_keys[0].commitments, app, td.ephemeral_point(blob), parts), iters),
        ),
        ("single key: X25519 exchange (OpenSSL)", *_ms(lambda: x_whole.exchange(x_peer), iters)),
        *p256_signatures(iters, keys, ps, shares, digest),
    ]


def p256_signatures(
    iters: int, k256_keys: Any, k256_ps: Any, k256_shares: Any, digest: bytes
) -> list[tuple[str, float, float]]:
    """The same GJKR rounds over NIST P-256 (python-ecdsa arithmetic: the group's CA key, app CA
    certificates) beside secp256k1 (coincurve) in the same run, and a whole P-256 key (OpenSSL)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from teecloud.keys import threshold_ecdsa as te

    keys = te.dkg_local(3, 5, group=te.P256)
    ps = te.presign_local(keys, [1, 2, 3, 4, 5])
    shares = [te.sign_share(ps[i], digest) for i in (1, 2, 3)]
    whole = ec.generate_private_key(ec.SECP256R1())
    few = max(5, iters // 20)
    presign_k = _ms(lambda: te.presign_local(k256_keys, [1, 2, 3, 4, 5]), few)
    presign_p = _ms(lambda: te.presign_local(keys, [1, 2, 3, 4, 5]), few)
    combine_k = _ms(lambda: te.combine_signature(k256_ps[1], digest, k256_shares), iters)
    combine_p = _ms(lambda: te.combine_signature(ps[1], digest, shares), iters)
    optimistic_k = _ms(
        lambda: te.combine_signature(k256_ps[1], digest, k256_shares, check_shares=False), iters
    )
    optimistic_p = _ms(lambda: te.combine_signature(ps[1], digest, shares, check_shares=False), iters)
    return [
        ("P-256 tECDSA presignature 3-of-5 (5 participants' math, one process)", *presign_p),
        ("  secp256k1 presignature, same run (baseline)", *presign_k),
        ("  ratio P-256 / secp256k1 presignature (p50)", presign_p[0] / presign_k[0], float("nan")),
        ("P-256 tECDSA node: one signature share", *_ms(lambda: te.sign_share(ps[2], digest), iters)),
        ("P-256 tECDSA client at t=3: 3 share checks + combine + OpenSSL verify", *combine_p),
        ("  secp256k1 client, same run (baseline)", *combine_k),
        ("  ratio P-256 / secp256k1 client (p50)", combine_p[0] / combine_k[0], float("nan")),
        (
            "P-256 client at t=3, optimistic: combine unchecked + OpenSSL verify (the CVM's path)",
            *optimistic_p,
        ),
        ("  secp256k1 client, optimistic, same run", *optimistic_k),
        (
            "single key: P-256 ECDSA sign (OpenSSL)",
            *_ms(lambda: whole.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))), iters),
        ),
    ]


def end_to_end(releases: int) -> list[tuple[str, float, float]]:
    from tests.kms.test_threshold_nodes import start_node

    from teecloud.chain import ChainClient
    from teecloud.kms.audit import AuditLog
    from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee, kms_dir, start_kms_state
    from teecloud.kms.challenge import BootChallenges
    from teecloud.kms.client import connect_kms
    from teecloud.kms.server import KmsServer
    from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
    from teecloud.kms.threshold import (
        DkgPlan,
        ReshareDealer,
        ResharePlan,
        ThresholdEvaluator,
        local_joint_feldman,
    )
    from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider, join_dkg, join_reshare
    from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference

    home = Path(os.environ["TEECLOUD_HOME"])
    chain = ChainClient.embedded(home / "chain")
    chain.deploy()
    dev = SimulatedTdx(home)
    chain.add_os_image(dev.os_image_hash)
    compose = hashlib.sha256(b"bench tkms").digest()
    app_id = bytes.fromhex(chain.register_app(None, compose)[2:])

    def node(
        name: str, evaluator: ThresholdEvaluator | None, reshare: ReshareDealer | None = None
    ) -> KmsServer:
        tee = SimulatedTdx(home)
        identity = boot_kms_tee(tee)
        state, _ = start_kms_state(tee, identity, now=int(time.time()), home=home / name)
        service = KmsService(
            state=state,
            identity=identity,
            tee=tee,
            chain=chain,
            collateral=StaticCollateral(tee.collateral),
            audit=AuditLog(kms_dir(home / name) / "audit.jsonl"),
            config=KmsConfig(dev_mode=True, boot_challenge_max_uses=1),
            dev_root_der=tee.dev_root_der(),
            block_number=chain.block_number,
            os_image_reference=simulated_os_image_reference,
            challenges=BootChallenges(max_uses=1),
            threshold=evaluator,
            reshare=reshare,
        )
        return KmsServer(service).start()

    def client(server: KmsServer):  # type: ignore[no-untyped-def]
        return connect_kms(
            server.url,
            collateral_for=lambda _q, _n: dev.collateral(),
            dev_root_der=dev.dev_root_der(),
            expected_ca_pubkey_der=server.service.keys.ca_public_key_der,
        )

    shares = local_joint_feldman(3, 5)
    # the tests' node (tests.kms.test_threshold_nodes): sealed share, own listener, data directory, TEE
    servers = {s.index: start_node(home, chain, s).server for s in shares}
    single = node("single", None)
    group = ThresholdGroup(1, 3, shares[0].commitments, {i: s.url for i, s in servers.items()})
    threshold = ThresholdKeyProvider(group, {i: client(s) for i, s in servers.items()})
    one = client(single)

    def release(provider: object) -> float:
        tee = SimulatedTdx(home)
        iid = os.urandom(20)
        for name, payload in (
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", compose),
            ("instance-id", iid),
            ("boot-nonce", provider.boot_nonce()),  # type: ignore[attr-defined]
            ("boot-mr-done", b""),
            ("os-image-hash", tee.os_image_hash),
        ):
            tee.emit_event(name, payload)
        t0 = time.perf_counter()
        provider.get_app_keys(tee, app_id, iid)  # type: ignore[attr-defined]
        return (time.perf_counter() - t0) * 1000

    rows = []
    dealers: dict[int, KmsServer] = {}
    try:
        for label, provider in (
            ("single KMS node (GetAppKey)", one),
            ("threshold 3 of 5 (ThresholdEvaluate)", threshold),
        ):
            release(provider)  # warm: server certificates verified once per client
            samples = sorted(release(provider) for _ in range(releases))
            rows.append(
                (label, statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))])
            )

        # Rounds over mutual RA-TLS: receivers boot-time KMS CVMs, one after another (wall time of all).
        ident = boot_kms_tee(SimulatedTdx(home))
        for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
            chain.add_kms_mr(mr)
        chain.add_kms_device(dev.device_id)

        def receiver_clients(srv: dict[int, KmsServer]) -> tuple[SimulatedTdx, dict[int, Any]]:
            tee = SimulatedTdx(home)
            boot_kms_tee(tee, finish=False)
            return tee, {i: client(s) for i, s in srv.items()}

        def run_dkg(t: int, n: int) -> float:
            for s in dealers.values():
                s.stop()
            dealers.clear()
            dealers.update({i: node(f"dkg-{t}-{n}-{i}", None, ReshareDealer(None)) for i in range(1, n + 1)})
            plan = DkgPlan(os.urandom(16), 1, tuple(range(1, n + 1)), t, n)
            t0 = time.perf_counter()
            for i, s in dealers.items():
                assert s.service.reshare is not None
                s.service.reshare.open_dkg(plan, i)
            for j in range(1, n + 1):
                tee, clients = receiver_clients(dealers)
                join_dkg(plan, j, tee, clients, app_id=KMS_APP_ID)
            return (time.perf_counter() - t0) * 1000

        def run_reshare(t_new: int, n_new: int) -> float:
            plan = ResharePlan(os.urandom(16), 1, shares[0].commitments, (1, 2, 3), t_new, n_new)
            # each new member's one-time token (review 3, R3-5): a sub-share goes only to its named member
            tokens = {j: os.urandom(32) for j in range(1, n_new + 1)}
            hashes = {j: hashlib.sha256(tok).digest() for j, tok in tokens.items()}
            t0 = time.perf_counter()
            for i in plan.dealers:
                dealer = servers[i].service.reshare
                assert dealer is not None
                dealer.open(plan, hashes)
            for j in range(1, n_new + 1):
                tee, clients = receiver_clients({i: servers[i] for i in plan.dealers})
                join_reshare(plan, j, tee, clients, app_id=KMS_APP_ID, member_token=tokens[j])
            return (time.perf_counter() - t0) * 1000

        rows.append(("networked DKG 3-of-5 (5 dealers, 5 receivers in turn)", run_dkg(3, 5), float("nan")))
        rows.append(("networked DKG 4-of-7 (7 dealers, 7 receivers in turn)", run_dkg(4, 7), float("nan")))
        rows.append(
            ("networked reshare 3-of-5 -> 4-of-7 (3 dealers, 7 receivers)", run_reshare(4, 7), float("nan"))
        )
    finally:
        for s in [*servers.values(), single, *dealers.values()]:
            s.stop()
        chain.close()
    return rows


def env_ceremony(apps: int) -> list[tuple[str, float, float]]:
    """Threshold env keys (kms.threshold_env) among five running members (own listeners, sealed shares,
    boot-time peer identities, mutual RA-TLS between them): the first GetAppEnvEncryptPubKey of an app (its
    Joint-Feldman ceremony among all 5 + the two threshold signatures), a re-signed answer (t = 3 members'
    signature shares), and the single-KMS GetAppEnvEncryptPubKey (one whole key) in the same run."""
    import statistics

    from tests.kms.test_threshold_net_peering import allow_build, start_member

    from teecloud.chain import ChainClient
    from teecloud.keys import threshold_ecdsa as te
    from teecloud.kms.audit import AuditLog
    from teecloud.kms.server import KmsServer
    from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
    from teecloud.kms.threshold import ThresholdEvaluator, local_joint_feldman
    from teecloud.kms.threshold_sign import open_signer, save_signing_share
    from teecloud.tee.simulated import SimulatedTdx

    home = Path(os.environ["TEECLOUD_HOME"]) / "env"
    chain = ChainClient.embedded(home / "chain")
    chain.deploy()
    dev = SimulatedTdx(home)
    chain.add_os_image(dev.os_image_hash)
    allow_build(chain, home)
    shares = local_joint_feldman(3, 5, epoch=1)
    keys = te.dkg_local(3, 5)
    services: dict[int, KmsService] = {}
    servers: list[KmsServer] = []
    try:
        for s in shares:
            # the tests' running member (tests.kms.test_threshold_net_peering): boot-time peer identity
            member = start_member(home, chain, s)
            servers.append(member.server)
            svc = member.service
            save_signing_share(keys[s.index - 1], member.tee, svc.identity, home / f"m-{s.index}")
            svc.threshold = ThresholdEvaluator(
                s, signer=open_signer(member.tee, svc.identity, home / f"m-{s.index}")
            )
            services[s.index] = svc
        for _ in range(4 * apps + 4):
            for i, p in te.presign_local(keys, [1, 2, 3, 4, 5]).items():
                services[i].threshold.signer.pool.add([p])
        urls = {i: srv.url for i, srv in zip(sorted(services), servers, strict=True)}
        for svc in services.values():
            assert svc.env_keys is not None
            svc.env_keys.set_peers(urls)
        first, resign = [], []
        for k in range(apps):
            app = bytes.fromhex(chain.register_app(None, hashlib.sha256(b"env %d" % k).digest())[2:])
            t0 = time.perf_counter()
            services[1 + k % 5].env_encrypt_pubkey(app.hex())
            first.append((time.perf_counter() - t0) * 1000)
            env = services[1 + k % 5].env_keys
            assert env is not None
            env._answers.clear()  # force a fresh signature (normally at most once per 120 s per app)
            t0 = time.perf_counter()
            services[1 + k % 5].env_encrypt_pubkey(app.hex())
            resign.append((time.perf_counter() - t0) * 1000)
        single = KmsService(
            state=services[1].state,
            identity=services[1].identity,
            tee=services[1].tee,
            chain=chain,
            collateral=StaticCollateral(dev.collateral),
            audit=AuditLog(home / "single-audit.jsonl"),
            config=KmsConfig(dev_mode=True),
            dev_root_der=dev.dev_root_der(),
        )
        base = _ms(lambda: single.env_encrypt_pubkey("11" * 20), 50)
    finally:
        for srv in servers:
            srv.stop()

    def row(label: str, xs: list[float]) -> tuple[str, float, float]:
        return label, statistics.median(xs), max(xs)

    return [
        row(f"env key: first request, ceremony among 5 + 2 threshold signatures ({apps} apps)", first),
        row(f"env key: re-signed answer (3 members' shares, 2 signatures) ({apps} apps)", resign),
        ("baseline: single KMS GetAppEnvEncryptPubKey (whole key, 2 signatures)", *base),
    ]


class _Phases:
    """Per-release phases of a threshold release, measured by wrapping the provider's own steps (wall time,
    ms): the evaluation round (ThresholdEvaluate to t nodes and each answer's checks), the signature round
    (the app-key signature and the app CA certificate, concurrently: from the first start to the last end;
    none when the nodes' kept signatures checked), and the rest (combination, key derivation, the boot's
    credential and connection set-up). The hand-over of what a first boot signed to the nodes to keep runs
    after the release returned (ThresholdKeyProvider._hand_over, a background thread): its duration is
    listed apart, not in the release."""

    def __init__(self, provider: Any) -> None:
        self.rows: list[dict[str, float]] = []
        self._now: dict[str, float] = {}
        self._spans: list[tuple[str, float, float]] = []
        self.hand_overs: list[float] = []  # background: after the release's keys were returned
        gather = provider._gather
        sign_key, sign_ca, hand_over = provider._sign_app_key, provider._sign_app_ca, provider._hand_over

        def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    # not a background hand-over's round (ThresholdKeyProvider._hand_over_later's thread)
                    if threading.current_thread().name != "kms-keep-hand-over":
                        self._spans.append((name, t0, time.perf_counter()))

            return run

        provider._gather = timed("gather", gather)
        provider._sign_app_key = timed("sign", sign_key)
        provider._sign_app_ca = timed("sign", sign_ca)

        def background(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return hand_over(*a, **kw)
            finally:
                self.hand_overs.append((time.perf_counter() - t0) * 1000)

        provider._hand_over = background

    def start(self) -> None:
        self._spans.clear()

    def stop(self, total_ms: float) -> None:
        gathers = [sp for sp in self._spans if sp[0] == "gather"]
        signs = [sp for sp in self._spans if sp[0] == "sign"]
        evaluate = (gathers[0][2] - gathers[0][1]) * 1000 if gathers else 0.0
        sign = (max(e for _, _, e in signs) - min(b for _, b, _ in signs)) * 1000 if signs else 0.0
        self.rows.append(
            {"evaluate": evaluate, "sign": sign, "rest": total_ms - evaluate - sign, "total": total_ms}
        )

    def summary(self) -> list[tuple[str, float, float]]:
        out = []
        for name, label in (
            ("evaluate", "evaluation round (ThresholdEvaluate at t nodes + proof checks)"),
            ("sign", "signature round (app-key signature + app CA certificate, concurrent; 0 when kept)"),
            ("rest", "rest (combination, key derivation, credential and connections)"),
        ):
            xs = sorted(r[name] for r in self.rows)
            out.append(
                (f"  phase: {label}", statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))])
            )
        if self.hand_overs:
            xs = sorted(self.hand_overs)
            label = "  background, not in the release: keep hand-over (ThresholdKeepSignatures at every node)"
            out.append((label, statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]))
        return out


class _Cpu:
    """CPU seconds per release (user + system), the robust figure on a shared, loaded machine: wall time
    there mostly measures the other engineers' work, CPU time the release's own. Read from the kernel's
    CPU-time clocks (clock_getcpuclockid / pthread_getcpuclockid: nanoseconds, not /proc's 10 ms ticks):
    each threshold node process whole; this bench process split into the client (the thread that calls
    get_app_keys, and the provider's fan-out threads) and the rest of the process (the chain's RPC server,
    LocalCloud's gateway threads, and in the single-node case the KMS listener that serves the release: its
    GetAppKey work is counted there). A background keep hand-over of a first boot runs into the next
    release's window (it is listed apart only in wall time); repeat boots have none."""

    def __init__(self, pids: dict[str, int]) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.pids = pids
        self.clocks: dict[str, int] = {}  # who -> the CPU-time clock of a separate process (a node)
        for who, pid in pids.items():
            clock = ctypes.c_int()
            if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
                raise SystemExit(f"cannot read the CPU clock of {who} (pid {pid})")
            self.clocks[who] = clock.value
        self.rows: list[dict[str, float]] = []
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {who: time.clock_gettime(clock) for who, clock in self.clocks.items()}
        client = 0.0
        for thread in threading.enumerate():
            if thread is threading.current_thread() or thread.name.startswith("kms-fan-out"):
                if thread.ident is not None:
                    client += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        out["client"] = client
        out["bench process"] = time.process_time()
        return out

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> None:
        after = self._now()
        # a fan-out thread started inside the window counts from 0
        row = {who: (after[who] - self._before.get(who, 0.0)) * 1000 for who in after}
        row["chain RPC server, gateway, in-process KMS"] = row.pop("bench process") - row["client"]
        row["all processes"] = sum(row.values())
        self.rows.append(row)

    def summary(self, case: str) -> list[tuple[str, float, float]]:
        """CPU ms per release by process: median (p50 column) and mean (p99 column's place, marked)."""
        out = []
        for who in self.rows[0]:
            xs = [r[who] for r in self.rows]
            label = f"  CPU ms per release, {case}: {who} (p50; mean in the second column)"
            out.append((label, statistics.median(xs), statistics.fmean(xs)))
        return out


class _Spy:
    """`--py-spy DIR`: py-spy (sampling, wall clock with --idle) attached to this process (the client, the
    single KMS's listener and the chain's RPC server) and to every threshold node process while one case's
    releases run; collapsed stacks to DIR/<case>-<who>.txt (bench/profile_tkms.py reads them)."""

    def __init__(self, out: Path | None, *, idle: bool = True) -> None:
        self.out = out
        self.idle = idle  # False (`--py-spy-on-cpu`): only samples of threads on a CPU (where CPU time goes)
        self._procs: list[Any] = []

    def start(self, case: str, pids: dict[str, int]) -> None:
        import subprocess

        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for who, pid in pids.items():
            dest = self.out / f"{case}-{who}.txt"
            cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "500", "--format", "raw"]
            cmd += ["--idle"] if self.idle else []
            self._procs.append(
                subprocess.Popen(
                    [*cmd, "--output", str(dest), "--threads"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # attached before the first timed release

    def stop(self) -> None:
        import signal

        for proc in self._procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self._procs:
            proc.wait(timeout=60)
        self._procs.clear()


def processes(
    releases: int, phases: bool = True, spy_dir: Path | None = None, spy_idle: bool = True
) -> list[tuple[str, float, float]]:
    """Part 4: the release against LocalCloud's single KMS and against five threshold node processes, in
    the same run, first boots (a fresh app each) and repeat boots (the same app) separately; the threshold
    release with its per-phase breakdown (`_Phases`) and the ratios."""
    from teecloud import devstack
    from teecloud.devstack import LocalCloud
    from teecloud.kms.threshold_net import RefillPolicy
    from teecloud.tee.simulated import SimulatedTdx

    # presignatures for every timed first boot and the warm-ups (`teecloud up` makes 8): a boot that finds
    # none goes on with a self-signed app CA, which the single node's release never does
    devstack.CA_PRESIGN_BATCH = releases + 4
    compose = hashlib.sha256(b"bench tkms processes").digest()
    rows = []
    p50: dict[tuple[int, str], float] = {}
    cpu_total: dict[tuple[int, str], float] = {}
    for label, nodes in (
        ("single KMS node (GetAppKey; listener in this process), LocalCloud", 1),
        ("threshold 3 of 5, nodes as separate processes, LocalCloud", 5),
    ):
        home = Path(os.environ["TEECLOUD_HOME"]) / f"cloud-{nodes}"
        cloud = LocalCloud(home, kms_nodes=nodes, kms_threshold=3 if nodes > 1 else 1)
        # one batch large enough for every timed boot: no refill round runs while releases are timed
        cloud.presign_policy = RefillPolicy(low=2, batch=releases + 4, interval_s=3600)
        cloud.start(check=False, resume=False)
        try:
            provider = cloud.key_provider
            apps = [bytes.fromhex(cloud.chain.register_app(None, compose)[2:]) for _ in range(releases + 2)]
            timer = _Phases(provider) if nodes > 1 and phases else None
            cpu = _Cpu({f"node{i}": p.pid for i, p in cloud.kms_processes.items()} if nodes > 1 else {})
            cpu_nonce = _Cpu(cpu.pids)  # the boot challenge before each release (not timed)

            def release(
                app_id: bytes,
                provider: Any = provider,
                home: Path = home,
                label: str = label,
                timer: _Phases | None = timer,
                cpu: _Cpu = cpu,
                cpu_nonce: _Cpu = cpu_nonce,
            ) -> float:
                tee = SimulatedTdx(home)
                iid = os.urandom(20)
                for name, payload in (
                    ("system-preparing", b""),
                    ("app-id", app_id),
                    ("compose-hash", compose),
                    ("instance-id", iid),
                    ("boot-nonce", b""),
                    ("boot-mr-done", b""),
                    ("os-image-hash", tee.os_image_hash),
                ):
                    if name == "boot-nonce":
                        cpu_nonce.start()
                        payload = provider.boot_nonce()
                        cpu_nonce.stop()
                    tee.emit_event(name, payload)
                if timer is not None:
                    timer.start()
                cpu.start()
                t0 = time.perf_counter()
                keys = provider.get_app_keys(tee, app_id, iid)
                took = (time.perf_counter() - t0) * 1000
                cpu.stop()
                if timer is not None:
                    timer.stop(took)
                if len(keys.k256_signature) != 65:
                    raise SystemExit(f"{label}: the release carries no KMS signature")
                ca = x509.load_pem_x509_certificate(keys.ca_cert_pem.encode())
                if ca.issuer == ca.subject:
                    raise SystemExit(f"{label}: the app CA certificate is self-signed, not the KMS's")
                return took

            release(apps[0])  # warm: server certificates verified once per client
            firsts: list[Callable[[], float]] = [functools.partial(release, a) for a in apps[2:]]
            repeats: list[Callable[[], float]] = [functools.partial(release, apps[0])] * releases
            spy = _Spy(spy_dir, idle=spy_idle)
            for case, boots in (
                ("first boot (a fresh app each)", firsts),
                ("repeat boot (the same app again)", repeats),
            ):
                if timer is not None:
                    timer.rows.clear()
                    timer.hand_overs.clear()
                cpu.rows.clear()
                cpu_nonce.rows.clear()
                if nodes > 1:
                    provider.wait_for_hand_overs()  # the previous case's: not counted in this one
                pids = {"client": os.getpid()} | {f"node{i}": p.pid for i, p in cloud.kms_processes.items()}
                spy.start(f"{nodes}-{case.split()[0]}", pids)
                try:
                    samples = sorted(boot() for boot in boots)
                    if nodes > 1:
                        provider.wait_for_hand_overs()
                finally:
                    spy.stop()
                p50[nodes, case] = statistics.median(samples)
                rows.append(
                    (
                        f"key release, {case}, {label}",
                        p50[nodes, case],
                        samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                    )
                )
                if timer is not None:
                    rows += timer.summary()
                rows += cpu.summary(case.split(" (")[0])
                rows += [row for row in cpu_nonce.summary("its boot challenge before it") if "all" in row[0]]
                cpu_total[nodes, case] = statistics.median(r["all processes"] for r in cpu.rows)
        finally:
            cloud.stop()
    for case in ("first boot (a fresh app each)", "repeat boot (the same app again)"):
        rows.append(
            (f"  {case}: threshold minus single (p50, ms)", p50[5, case] - p50[1, case], float("nan"))
        )
        rows.append((f"  {case}: ratio threshold / single (p50)", p50[5, case] / p50[1, case], float("nan")))
        added = cpu_total[5, case] - cpu_total[1, case]
        rows.append(
            (
                f"  {case}: CPU ms per release, threshold minus single (all processes, p50)",
                added,
                float("nan"),
            )
        )
    rows.append(("load average (1 min) at the end", os.getloadavg()[0], float("nan")))
    return rows


def threads_http(releases: int) -> list[tuple[str, float, float]]:
    """`--threads-http` (no LocalCloud, so no e2e lock): the `--processes` topology's chain path in one
    process — the embedded chain behind its JSON-RPC HTTP server, and every KMS (five threshold nodes from
    the tests' setup, one single KMS) reading it over HTTP through its own ChainClient with
    `checked_head` (chain id and head, every question by hash) — as threads. Repeat boots of one app (a
    fresh instance each: every node's isAppAllowed is a new question), single and threshold releases
    interleaved (one of each per step), evaluation only (no signing group). CPU per release: the whole
    process's, and the client's own (the calling thread and the provider's fan-out threads, `_Cpu`)."""
    from teecloud.chain import ChainClient
    from teecloud.chain.embedded import EmbeddedChain
    from teecloud.chain.rpcserver import ChainRpcServer
    from teecloud.kms.audit import AuditLog
    from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
    from teecloud.kms.challenge import BootChallenges
    from teecloud.kms.client import connect_kms
    from teecloud.kms.rootkeys import LocalRootKeys
    from teecloud.kms.server import KmsServer
    from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
    from teecloud.kms.threshold import ThresholdEvaluator, load_share, local_joint_feldman, save_share
    from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
    from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference

    home = Path(os.environ["TEECLOUD_HOME"]) / "http"
    rpc = ChainRpcServer(EmbeddedChain(home / "chain")).start()
    chain = ChainClient.embedded(home)  # over HTTP: the server recorded its URL
    chain.deploy()
    dev = SimulatedTdx(home)
    chain.add_os_image(dev.os_image_hash)
    compose = hashlib.sha256(b"bench tkms http").digest()
    app_id = bytes.fromhex(chain.register_app(None, compose)[2:])

    def own_chain() -> ChainClient:
        return ChainClient.embedded(home)

    def kms(name: str, share: Any = None) -> KmsServer:
        """A KMS (a threshold node with `share`) as `teecloud kms up` wires it: its own chain client over
        HTTP, the head read by hash with the chain-id check (`checked_head`)."""
        tee = SimulatedTdx(home)
        identity = boot_kms_tee(tee)
        state, _ = start_kms_state(tee, identity, now=int(time.time()), home=home / name)
        sealed = None
        if share is not None:
            save_share(share, tee, identity, home / name)
            sealed = load_share(tee, identity, home / name)
        reader = own_chain()
        return KmsServer(
            KmsService(
                state=state,
                identity=identity,
                tee=tee,
                chain=reader,
                collateral=StaticCollateral(tee.collateral),
                audit=AuditLog(kms_dir(home / name) / "audit.jsonl"),
                config=KmsConfig(dev_mode=True),
                dev_root_der=tee.dev_root_der(),
                block_number=reader.checked_head,
                os_image_reference=simulated_os_image_reference,
                root_keys=LocalRootKeys(state) if sealed is not None else None,
                challenges=BootChallenges(),
                threshold=ThresholdEvaluator(sealed) if sealed is not None else None,
            )
        ).start()

    shares = local_joint_feldman(3, 5)
    servers = {s.index: kms(f"node-{s.index}", s) for s in shares}
    single = kms("single")

    def client(server: KmsServer):  # type: ignore[no-untyped-def]
        return connect_kms(
            server.url,
            collateral_for=lambda _q, _n: dev.collateral(),
            dev_root_der=dev.dev_root_der(),
            expected_ca_pubkey_der=server.service.keys.ca_public_key_der,
        )

    group = ThresholdGroup(1, 3, shares[0].commitments, {i: srv.url for i, srv in servers.items()})
    threshold = ThresholdKeyProvider(group, {i: client(srv) for i, srv in servers.items()}, hedge_s=60.0)
    one = client(single)

    def release(provider: Any) -> float:
        boot = SimulatedTdx(home)
        iid = os.urandom(20)
        for name, payload in (
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", compose),
            ("instance-id", iid),
            ("boot-nonce", provider.boot_nonce()),
            ("boot-mr-done", b""),
            ("os-image-hash", boot.os_image_hash),
        ):
            boot.emit_event(name, payload)
        split = _Cpu({})  # the client's own threads (this one and the provider's fan-out threads)
        split.start()
        c0, t0 = time.process_time(), time.perf_counter()
        provider.get_app_keys(boot, app_id, iid)
        took = (time.perf_counter() - t0) * 1000
        cpu[provider is threshold].append((time.process_time() - c0) * 1000)
        split.stop()
        client_cpu[provider is threshold].append(split.rows[0]["client"])
        return took

    # CPU ms per release of this whole process (client, every KMS, the chain's RPC server): one interpreter
    # holds them all here, so the process's CPU clock is the release's total CPU
    cpu: dict[bool, list[float]] = {False: [], True: []}
    client_cpu: dict[bool, list[float]] = {False: [], True: []}
    try:
        release(one), release(threshold)  # warm: server certificates checked once per client
        got: dict[str, list[float]] = {"single": [], "threshold": []}
        cpu[False].clear(), cpu[True].clear(), client_cpu[False].clear(), client_cpu[True].clear()
        for _ in range(releases):
            got["single"].append(release(one))
            got["threshold"].append(release(threshold))
    finally:
        for server in [single, *servers.values()]:
            server.stop()
        rpc.stop()
    rows = []
    for name, label in (
        ("single", "repeat boot, single KMS (GetAppKey), chain over HTTP, threads"),
        ("threshold", "repeat boot, threshold 3 of 5 (ThresholdEvaluate), chain over HTTP, threads"),
    ):
        xs = sorted(got[name])
        rows.append((label, statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]))
    rows.append(("  threshold minus single (p50, ms)", rows[1][1] - rows[0][1], float("nan")))
    rows.append(("  ratio threshold / single (p50)", rows[1][1] / rows[0][1], float("nan")))
    single_cpu, threshold_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
    rows.append(("  CPU ms per release, whole process (p50): single", single_cpu, float("nan")))
    rows.append(("  CPU ms per release, whole process (p50): threshold", threshold_cpu, float("nan")))
    rows.append(("  CPU ms per release: threshold minus single", threshold_cpu - single_cpu, float("nan")))
    single_client, threshold_client = (
        statistics.median(client_cpu[False]),
        statistics.median(client_cpu[True]),
    )
    rows.append(("  client's CPU ms per release (p50): single", single_client, float("nan")))
    rows.append(("  client's CPU ms per release (p50): threshold", threshold_client, float("nan")))
    rows.append(
        (
            "  client's CPU ms per release: threshold minus single",
            threshold_client - single_client,
            float("nan"),
        )
    )
    rows.append(("load average (1 min) at the end", os.getloadavg()[0], float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--releases", type=int, default=30)
    ap.add_argument("--crypto-iters", type=int, default=200)
    ap.add_argument("--signatures-only", action="store_true", help="only the threshold ECDSA / ECDH rows")
    ap.add_argument("--env-only", type=int, default=0, metavar="APPS", help="only the env-key ceremony rows")
    ap.add_argument("--processes", action="store_true", help="only part 4 (nodes as separate processes)")
    ap.add_argument("--threads-http", action="store_true", help="only the in-process chain-over-HTTP rows")
    ap.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="with --processes: profiles to DIR"
    )
    ap.add_argument("--py-spy-on-cpu", action="store_true", help="with --py-spy: on-CPU samples only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tkms-") as tmp:
        os.environ["TEECLOUD_HOME"] = tmp
        print("| case | p50 ms | p99 ms |\n|---|---|---|")
        if args.env_only:
            for label, p50, p99 in env_ceremony(args.env_only):
                print(f"| {label} | {p50:.2f} | {p99:.2f} |", flush=True)
            return
        if args.threads_http:
            for label, p50, p99 in threads_http(args.releases):
                tail = "—" if p99 != p99 else f"{p99:.2f}"
                print(f"| {label} | {p50:.2f} | {tail} |", flush=True)
            return
        if args.processes:
            for label, p50, p99 in processes(
                args.releases, spy_dir=args.py_spy, spy_idle=not args.py_spy_on_cpu
            ):
                tail = "—" if p99 != p99 else f"{p99:.2f}"
                print(f"| {label} | {p50:.2f} | {tail} |", flush=True)
            return
        rows = signatures(args.crypto_iters)
        if not args.signatures_only:
            rows = crypto(args.crypto_iters) + rows + end_to_end(args.releases)
        for label, p50, p99 in rows:
            tail = "—" if p99 != p99 else f"{p99:.2f}"  # NaN: a single run
            print(f"| {label} | {p50:.2f} | {tail} |", flush=True)


if __name__ == "__main__":
    main()
