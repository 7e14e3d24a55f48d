"""Benchmark teecloud.chain: is_app_allowed calls/s (embedded in-process, embedded over JSON-RPC, anvil)
and gas used by each governance operation. Plain script: prints tables.

    python3 bench/bench_chain.py [--seconds 3] [--no-anvil]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from teecloud.chain import DEV_KEYS, BootInfo, ChainClient, ChainRpcServer, EmbeddedChain  # noqa: E402
from teecloud.chain.client import LocalTransport, abi_of  # noqa: E402

OS_IMAGE = b"\x05" * 32


def setup(c: ChainClient) -> BootInfo:
    c.deploy()
    h = os.urandom(32)
    c.add_os_image(OS_IMAGE)
    app = c.register_app(None, h)
    return BootInfo(
        bytes.fromhex(app[2:]),
        h,
        b"\0" * 20,
        b"\1" * 32,
        b"\2" * 32,
        b"\3" * 32,
        OS_IMAGE,
        "UpToDate",
        ("INTEL-SA-00837",),
    )


def rate(c: ChainClient, bi: BootInfo, seconds: float, cache: bool = False) -> float:
    c.read_cache = cache
    assert c.is_app_allowed(bi) == (True, "")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c.is_app_allowed(bi)
        n += 1
    return n / (time.perf_counter() - t0)


def gas_table(c: ChainClient, keys: list[str]) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []

    def g(name: str, receipt: dict[str, Any]) -> None:
        rows.append(
            (name, int(receipt["gasUsed"], 16) if isinstance(receipt["gasUsed"], str) else receipt["gasUsed"])
        )

    a, b = c, c.with_signer(keys[1])
    blueprint = c.send(
        None, __import__("teecloud.chain._compile", fromlist=["x"]).compiled("AppAuth").blueprint_bytecode
    )
    g("deploy AppAuth blueprint", blueprint)
    kms = abi_of("KmsAuth")
    r = c.transact(
        "KmsAuth",
        c.kms_auth,
        "deploy_and_register_app",
        c.address,
        False,
        False,
        True,
        b"\0" * 32,
        os.urandom(32),
    )
    g("register app (factory deploy + register)", r)
    app = c.event_of(r, "KmsAuth", "AppDeployed")["app_id"]
    g("add_compose_hash (owner = account)", c.add_compose_hash(app, os.urandom(32)))
    g("remove_compose_hash", c.remove_compose_hash(app, c.events("AppAuth", app)[-1]["args"]["compose_hash"]))
    g("KmsAuth add_os_image_hash", c.add_os_image(os.urandom(32)))
    g("retire_instance", c.retire_instance(app, os.urandom(20)))
    del kms
    ms_r = c.send(None, _ctor(c, "Multisig", [a.address, b.address], 2))
    g("deploy Multisig (2-of-2)", ms_r)
    ms = ms_r["contractAddress"]
    tl_r = c.send(None, _ctor(c, "Timelock", c.address, 3600))
    g("deploy Timelock", tl_r)
    tl = tl_r["contractAddress"]
    app_ms = c.register_app(ms, os.urandom(32))
    data = abi_of("AppAuth").encode_call("add_compose_hash", os.urandom(32))
    r = a.transact("Multisig", ms, "propose", app_ms, 0, data)
    g("multisig propose (+ proposer approval)", r)
    pid = c.event_of(r, "Multisig", "ProposalCreated")["proposal_id"]
    g("multisig approve", b.multisig_approve(ms, pid))
    g("multisig execute (add_compose_hash)", a.multisig_execute(ms, pid))
    app_tl = c.register_app(tl, os.urandom(32))
    data = abi_of("AppAuth").encode_call("add_compose_hash", os.urandom(32))
    salt = os.urandom(32)
    g("timelock queue", c.transact("Timelock", tl, "queue", app_tl, 0, data, salt, 3600))
    c.increase_time(3601)
    g("timelock execute (add_compose_hash)", c.transact("Timelock", tl, "execute", app_tl, 0, data, salt))
    op, user, ch = c.with_signer(keys[2]), c.with_signer(keys[3]), c.with_signer(keys[4])
    c.set_challenger(ch.address)
    r = op.transact(
        "NodeRegistry",
        c.node_registry,
        "register_node",
        "tdx",
        os.urandom(32),
        os.urandom(32),
        4,
        10**15,
        value=10**18,
    )
    g("node register (with stake)", r)
    nid = c.event_of(r, "NodeRegistry", "NodeRegistered")["node_id"]
    r = user.transact("NodeRegistry", c.node_registry, "open_deployment", nid, user.address, value=10**17)
    g("open deployment (escrow)", r)
    dep = c.event_of(r, "NodeRegistry", "DeploymentOpened")["deployment_id"]
    g(
        "claim (signed usage record)",
        op.transact("NodeRegistry", c.node_registry, "claim", dep, 3600, user.sign_usage(dep, 3600)),
    )
    g("withdraw", op.transact("NodeRegistry", c.node_registry, "withdraw"))
    g("slash", ch.transact("NodeRegistry", c.node_registry, "slash", nid, 10**17, os.urandom(32)))
    g("request unstake", op.request_unstake(nid, 10**17))
    return rows


def _ctor(c: ChainClient, name: str, *args: Any) -> bytes:
    from eth_abi import encode

    from teecloud.chain._compile import compiled
    from teecloud.chain.connection import _ctor_types

    comp = compiled(name)
    ctor = next(i for i in comp.abi if i["type"] == "constructor")
    return comp.bytecode + encode(_ctor_types(ctor), list(args))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-anvil", action="store_true")
    ns = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-chain-"))
    os.environ["TEECLOUD_HOME"] = str(home)
    results: list[tuple[str, float]] = []

    embedded = EmbeddedChain(home / "chain")
    c = ChainClient(LocalTransport(embedded), DEV_KEYS[0], home=home, label="embedded")
    bi = setup(c)
    results.append(("embedded, in-process", rate(c, bi, ns.seconds)))
    results.append(("embedded, in-process, block read cache", rate(c, bi, ns.seconds, True)))
    server = ChainRpcServer(embedded, "127.0.0.1", 0).start()
    c_http = ChainClient.rpc(server.url, DEV_KEYS[0], home=home)
    results.append(("embedded, JSON-RPC (127.0.0.1)", rate(c_http, bi, ns.seconds)))
    results.append(("embedded, JSON-RPC, block read cache", rate(c_http, bi, ns.seconds, True)))
    gas = gas_table(c, list(DEV_KEYS))
    server.stop()
    embedded.close()

    anvil_gas: dict[str, int] = {}
    if not ns.no_anvil:
        from tests.chain.conftest import Anvil, anvil_keys

        anvil = Anvil()
        try:
            keys = anvil_keys()
            ca = ChainClient.rpc(anvil.url, keys[0], home=home)
            bi_a = setup(ca)
            results.append(("anvil, JSON-RPC (127.0.0.1)", rate(ca, bi_a, ns.seconds)))
            results.append(("anvil, JSON-RPC, block read cache", rate(ca, bi_a, ns.seconds, True)))
            anvil_gas = dict(gas_table(ca, keys))
        finally:
            anvil.stop()

    print(f"\nis_app_allowed through teecloud.chain ({ns.seconds:.0f} s each, sequential, 1 client)")
    print(f"{'backend':<40} {'calls/s':>10} {'ms/call':>9}")
    for name, r in results:
        print(f"{name:<40} {r:>10.0f} {1000 / r:>9.2f}")
    print("\ngas used per operation")
    print(f"{'operation':<44} {'embedded':>10} {'anvil':>10}")
    for name, used in gas:
        other = anvil_gas.get(name)
        print(f"{name:<44} {used:>10} {other if other is not None else '-':>10}")


if __name__ == "__main__":
    main()
