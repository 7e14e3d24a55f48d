"""The confidential-inference stack, as a user runs it, shared by a module's tests (starting the engine is
the slow part): a simulated CVM booted with the local dev key provider serving the guest API on a Unix
socket; llama-cpp-python's OpenAI server (the real engine) on a tiny GGUF model the test writes itself; the
teecloud.ai front reaching keys and quotes only through dstack-sdk; the verifying proxy before it."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from dstack_sdk import DstackClient

from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
from teecloud.ai._http import Listener
from teecloud.ai.engine import EngineProcess, llama_cpp_argv
from teecloud.ai.proxy import ProxyPolicy, make_proxy_app, proxy_event_loop
from teecloud.ai.server import (
    GuestKeyMaterial,
    InferenceConfig,
    keys_from_guest_api,
    make_inference_app,
    weights_sha256,
)
from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-llama"
COMPOSE = {
    "manifest_version": 2,
    "name": "llm",
    "runner": "docker-compose",
    "docker_compose_file": (ROOT / "examples" / "llm" / "docker-compose.yml").read_text(),
    "kms_enabled": True,
    "gateway_enabled": True,
    "public_logs": False,
    "public_sysinfo": True,
    "public_tcbinfo": True,
    "allowed_envs": [],
    "no_instance_id": False,
    "secure_time": False,
}


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What a relay in the middle (a gateway, a test's man in the middle) passes on of a completion request's
    headers: the content type and the inline-receipt request (teecloud.ai.server's INLINE)."""
    out = {"content-type": "application/json"}
    out |= {k: v for k, v in headers.items() if k.lower().startswith("x-teecloud-receipt")}
    return out


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def write_model(path: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinymodel", ROOT / "examples" / "llm" / "tinymodel.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_tiny_llama(path)  # type: ignore[no-any-return]


@dataclass
class Stack:
    home: Path
    tee: SimulatedTdx
    provider: LocalDevKeyProvider
    app_id: bytes
    compose_hash: bytes
    sock: Path
    model: Path
    engine: EngineProcess
    keys: GuestKeyMaterial
    front: Listener
    config: InferenceConfig
    guest: DstackClient
    quote: Callable[[bytes], dict[str, str]]

    def verifier(self) -> PeerVerifier:
        return PeerVerifier(PeerPolicy.dev(self.tee.dev_root_der()), StaticCollateral(self.tee.collateral))

    def policy(self, **kw: object) -> ProxyPolicy:
        kw.setdefault("kms_root_public_key", self.provider.root.k256_public_key)
        kw.setdefault("expected_app_id", self.app_id)
        kw.setdefault("allow_plain_http", True)  # the plain front; tests/ai/test_tls_pin.py covers HTTPS
        return ProxyPolicy(**kw)  # type: ignore[arg-type]

    def proxy(self, upstream: str | None = None, **kw: object) -> Listener:
        app = make_proxy_app(upstream or self.front.url, self.verifier(), self.policy(**kw))
        return Listener(app, name="test-ai-proxy", loop=proxy_event_loop())  # as `teecloud ai proxy` does


@contextmanager
def running_stack(
    home: Path, *, model: Path | None = None, threads: int = 1, embeddings: bool = False
) -> Iterator[Stack]:
    """The whole stack under `home` (also used by bench/bench_ai.py); everything it starts it stops."""
    sockdir = Path(tempfile.mkdtemp(prefix="tcai-", dir="/tmp"))
    tee = SimulatedTdx(home)
    provider = LocalDevKeyProvider(home)
    # As a node boots a CVM: the OS image is measured too (the peer verifier requires it in boot_info).
    state = boot(
        tee, json.dumps(COMPOSE), None, None, provider, extra_events=[("os-image-hash", tee.os_image_hash)]
    )
    runner = AgentRunner(state, dstack_sock=sockdir / "dstack.sock")
    runner.start()
    model = model or write_model(home / "tiny.gguf")
    port = free_port()
    engine = EngineProcess(
        llama_cpp_argv(model, port=port, alias=MODEL_ID, n_ctx=512, threads=threads, embedding=embeddings),
        f"http://127.0.0.1:{port}",
        log_path=home / "engine.log",
    ).start()
    front: Listener | None = None
    try:
        engine.wait_ready(timeout=120)
        guest = DstackClient(str(sockdir / "dstack.sock"), timeout=30)
        keys = keys_from_guest_api(guest)

        def quote(report_data: bytes) -> dict[str, str]:
            q = guest.get_quote(report_data)
            return {"quote": q.quote, "event_log": q.event_log, "vm_config": q.vm_config}

        config = InferenceConfig(
            MODEL_ID,
            weights_sha256(model),
            engine.url,
            home / "receipts",
            max_tokens=256,
            embeddings=embeddings,
        )
        front = Listener(make_inference_app(config, keys, quote), name="test-ai-front").start()
        yield Stack(
            home,
            tee,
            provider,
            state.app_id,
            state.compose_hash,
            sockdir / "dstack.sock",
            model,
            engine,
            keys,
            front,
            config,
            guest,
            quote,
        )
    finally:
        if front is not None:
            front.stop()
        engine.stop()
        runner.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("ai-home")) as s:
        yield s
