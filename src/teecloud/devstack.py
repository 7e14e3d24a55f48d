"""The composition root of the local cloud behind `teecloud up` — the one place that builds the real
parts in one process: embedded chain (served over JSON-RPC), one KMS, one
worker node, all on 127.0.0.1, all state under data_home().

Start-up procedure (`LocalCloud.start`), every step idempotent so a restart loses nothing:
  (1) prerequisites: Docker engine + Compose, gocryptfs, FUSE (each missing item named with its install hint)
  (2) chain: open the embedded chain (state replayed from its journal), serve it on 127.0.0.1, deploy
      teecloud's contracts once
  (3) KMS: boot its simulated TEE (measured), unseal its root keys (generated on first start), publish on
      chain what it takes to trust it (OS image, KMS measurement and device, root public keys), listen
  (4) node: a KMS client that verifies the KMS's RA-TLS certificate (dev root, chain's isKmsAllowed),
      registration in NodeRegistry (once), the node API, then every CVM that should run boots again
  (5) endpoints.json records where everything listens (the CLI reads it)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write_json, data_home
from teecloud.cloud.endpoints import CloudEndpoints, endpoints_path, read_endpoints
from teecloud.node.errors import NodeError, RuntimeUnavailable

__all__ = ["CloudEndpoints", "LocalCloud", "check_prerequisites", "endpoints_path", "read_endpoints"]

log = logging.getLogger("teecloud.devstack")


def check_prerequisites() -> list[str]:
    """Everything missing for `teecloud up`, each with how to fix it."""
    from teecloud.agent.storage import check_prerequisites as storage_prereqs
    from teecloud.node.runtime.docker import DockerRuntime

    missing: list[str] = []
    try:
        DockerRuntime().check()
    except RuntimeUnavailable as exc:
        missing.append(str(exc))
    missing.extend(storage_prereqs())
    import shutil

    if shutil.which("busybox") is None:
        missing.append("busybox is missing (passes env vars into containers): apt-get install busybox-static")
    return missing


class LocalCloud:
    def __init__(
        self,
        home: Path | None = None,
        *,
        chain_port: int = 0,
        kms_port: int = 0,
        node_port: int = 0,
        dev_time_travel: bool = False,
    ):
        self.home = Path(home) if home is not None else data_home()
        self.ports = (chain_port, kms_port, node_port)
        self.dev_time_travel = dev_time_travel  # serve evm_increaseTime/evm_mine on the chain's RPC
        self._stack = contextlib.ExitStack()
        self.endpoints: CloudEndpoints | None = None
        self.node: Any = None
        self.chain: Any = None
        self.timings: dict[str, float] = {}

    def start(self, *, check: bool = True, resume: bool = True) -> CloudEndpoints:
        try:
            return self._start(check=check, resume=resume)
        except BaseException:
            self.stop()
            raise

    def _start(self, *, check: bool, resume: bool) -> CloudEndpoints:
        t = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            self.timings[name] = now - t
            t = now

        # (1)
        if check:
            missing = check_prerequisites()
            if missing:
                raise RuntimeUnavailable("missing prerequisites:\n  - " + "\n  - ".join(missing))
        mark("prerequisites")

        # (2)
        from teecloud.chain.client import ChainClient, HttpTransport
        from teecloud.chain.embedded import DEV_KEYS, EmbeddedChain
        from teecloud.chain.rpcserver import ChainRpcServer

        embedded = EmbeddedChain(self.home / "chain")
        self._stack.callback(embedded.close)
        rpc = ChainRpcServer(embedded, port=self.ports[0], time_travel=self.dev_time_travel).start()
        self._stack.callback(rpc.stop)
        chain = ChainClient(
            HttpTransport(rpc.url), DEV_KEYS[0], home=self.home, label=f"embedded via {rpc.url}"
        )
        self.chain = chain
        contracts = chain.deploy()
        mark("chain")

        # (3)
        from teecloud.kms.launcher import KmsLaunch, launch_kms
        from teecloud.peer import StaticCollateral
        from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference

        kms_tee = SimulatedTdx(self.home)

        def publish(keys: Any, identity: Any, _created: bool) -> str:
            self._publish_kms(chain, kms_tee, identity, keys)
            return ""

        running = launch_kms(
            KmsLaunch(
                tee=kms_tee,
                chain=chain,
                collateral=StaticCollateral(kms_tee.collateral),
                dev=True,
                home=self.home,
                os_image_reference=simulated_os_image_reference,
                port=self.ports[1],
                kms_contract=str(contracts.get("KmsAuth", "")),
                on_keys=publish,
            )
        )
        if running.publish_error:
            raise NodeError(f"could not publish the KMS to KmsAuth: {running.publish_error}")
        kms = running.server
        self._stack.callback(kms.stop)
        mark("kms")

        # (4)
        from teecloud.kms.client import connect_kms
        from teecloud.node.registry import ensure_registered
        from teecloud.node.service import Node, NodeServer, load_or_create_token

        platform = SimulatedTdx(self.home)
        key_provider = connect_kms(
            kms.url,
            collateral_for=lambda _quote, _now: platform.collateral(),
            dev_root_der=platform.dev_root_der(),
            chain=chain,
        )
        node_id = ensure_registered(chain, platform, home=self.home)
        node = Node(
            key_provider=key_provider,
            tee_factory=lambda: SimulatedTdx(self.home),
            home=self.home,
            kms_urls=[kms.url],
            node_id=node_id,
        )
        self.node = node
        self._stack.callback(node.close)
        token = load_or_create_token(self.home)
        server = NodeServer(node, token=token, port=self.ports[2]).start()
        self._stack.callback(server.stop)
        if resume:
            node.resume()
        mark("node")

        # (5)
        from teecloud.node.instance import node_home

        self.endpoints = CloudEndpoints(
            chain_rpc=rpc.url,
            kms=kms.url,
            kms_admin=kms.admin_url,
            node=server.url,
            pid=os.getpid(),
            node_token_file=str(node_home(self.home) / "admin-token"),
            contracts={k: v for k, v in contracts.items() if isinstance(v, str | int)},
        )
        atomic_write_json(endpoints_path(self.home), self.endpoints.__dict__, mode=0o644)
        self._stack.callback(lambda: endpoints_path(self.home).unlink(missing_ok=True))
        return self.endpoints

    def _publish_kms(self, chain: Any, tee: Any, identity: Any, keys: Any) -> None:
        """What KmsAuth must know to trust this KMS and the CVMs it serves (once per chain and key set): the
        simulated OS image, this KMS build's measurement and device, and its root public keys."""
        from teecloud.kms.bootstrap import publish_kms_info

        marker = self.home / "cloud" / "kms-published.json"
        key = f"{chain.chain_key}:{identity.mr_aggregated.hex()}:{keys.k256_public_key.hex()}"
        try:
            if key in json.loads(marker.read_text()).get("published", []):
                return
        except (OSError, ValueError, AttributeError):
            pass
        chain.add_os_image(tee.os_image_hash)
        chain.add_kms_mr(identity.mr_aggregated)
        chain.add_kms_mr(identity.boot_mr_aggregated)  # its onboarding quotes (boot-time evidence)
        chain.add_kms_device(tee.device_id)
        publish_kms_info(chain, keys, tee, self.home)
        atomic_write_json(marker, {"published": [key]})

    def stop(self) -> None:
        try:
            self._stack.close()
        except NodeError as exc:
            log.warning("while stopping: %s", exc)

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
