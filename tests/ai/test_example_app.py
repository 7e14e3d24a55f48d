"""examples/llm/app.py run unchanged as a process, as the container runs it: keys and quotes through the guest
API socket (DSTACK_SIMULATOR_ENDPOINT, as under `teecloud agent simulate`), the engine as its child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from teecloud.ai._http import peer_spki_sha256
from tests.ai.conftest import MODEL_ID, ROOT, Stack, free_ports

pytestmark = pytest.mark.slow


def run_app(stack: Stack, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, engine_port = free_ports(2)
    full = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "DSTACK_SIMULATOR_ENDPOINT": str(stack.sock),
        "MODEL_PATH": str(stack.model),
        "MODEL_ID": MODEL_ID,
        "RECEIPTS_DIR": str(tmp_path / "receipts"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ENGINE_PORT": str(engine_port),
        "ENGINE_THREADS": "1",
        "N_CTX": "256",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "llm" / "app.py")],
        env=full,
        stdout=open(tmp_path / "app.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, port, engine_port


def test_the_example_app_serves_with_keys_from_the_guest_api(stack: Stack, tmp_path: Path) -> None:
    proc, port, engine_port = run_app(
        stack,
        tmp_path,
        MODEL_SHA256=stack.config.weights_sha256.hex(),
        TLS_NAMES="localhost",
        TLS_DIR=str(tmp_path / "tls"),
    )
    http = httpx.Client(verify=False, timeout=60)  # the chain ends at the app CA; the key is checked below
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            try:
                if http.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()
            time.sleep(0.2)
        r = http.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        rid = r.headers["x-receipt-id"]
        receipt = http.get(f"{url}/v1/receipts/{rid}").json()["receipt"]
        # The same keys as the in-process front (both derive them through the same guest API), plus the TLS
        # key it serves with, by SPKI hash.
        tls_spki = receipt["keyset"].pop("tls_spki_sha256")
        expected = stack.keys.keyset.to_json()
        del expected["tls_spki_sha256"]
        assert receipt["keyset"] == expected
        assert (
            tls_spki == peer_spki_sha256(r).hex()
            and (tmp_path / "tls" / "tls-key.pem").stat().st_mode & 0o077 == 0
        )
        assert rid.encode() in (tmp_path / "receipts" / "receipts.jsonl").read_bytes()
    finally:
        http.close()
        os.killpg(proc.pid, signal.SIGTERM)  # the app process this test started
        proc.wait(timeout=30)
    # The engine (in a session of its own) does not outlive the app.
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{engine_port}/v1/models", timeout=1)
        except httpx.HTTPError:
            break
        assert time.monotonic() < deadline, "the engine outlived the app"
        time.sleep(0.2)


def test_the_example_app_refuses_weights_that_are_not_the_pinned_ones(stack: Stack, tmp_path: Path) -> None:
    proc, _, _ = run_app(stack, tmp_path, MODEL_SHA256="00" * 32)
    assert proc.wait(timeout=60) == 2
    assert "MODEL_SHA256" in (tmp_path / "app.log").read_text()


def test_the_example_app_publishes_its_receipt_root_on_chain(stack: Stack, tmp_path: Path) -> None:
    from teecloud.chain import DEV_KEYS, ChainClient, ChainRpcServer
    from teecloud.chain.receiptroots import ReceiptRoots

    with ChainClient.embedded(tmp_path / "chain-home", DEV_KEYS[0]) as chain:
        roots = ReceiptRoots.deploy(chain)
        signer = stack.keys.keyset.signing_address
        chain.send(signer, b"", value=10**18)  # the app's gas money
        rpc = ChainRpcServer(chain.transport.chain).start()  # type: ignore[attr-defined]
        proc, port, _ = run_app(
            stack, tmp_path, RECEIPT_ROOTS_ADDRESS=roots.address, CHAIN_RPC_URL=rpc.url, ROOT_INTERVAL="0.3"
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "app.log").read_text()
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()
                time.sleep(0.2)
            for _ in range(2):
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
                assert r.status_code == 200, r.text
            head = httpx.get(url + "/v1/receipts/root", timeout=10).json()["tree_head"]
            deadline = time.monotonic() + 30
            while roots.head(stack.app_id, signer).tree_size < 2:
                assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()
                time.sleep(0.2)
            on_chain = roots.head(stack.app_id, signer)
            assert on_chain.tree_size == head["tree_size"] == 2 and on_chain.root.hex() == head["root_hash"]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the app process this test started
            proc.wait(timeout=30)
            rpc.stop()
