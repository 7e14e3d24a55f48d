"""The attested OpenAI-compatible inference app (a teecloud app like any other).

It gets its keys and quotes only through the guest API (dstack-sdk on /var/run/dstack.sock, or
DSTACK_SIMULATOR_ENDPOINT under `teecloud agent simulate`), starts the model engine (llama-cpp-python's
OpenAI server on CPU) as a supervised child on 127.0.0.1, and serves teecloud.ai's front on HOST:PORT.

Environment:
    MODEL_PATH        GGUF weights (required; on the app's encrypted volume or baked into the image)
    MODEL_ID          the model name clients use (default: the file name without .gguf)
    MODEL_SHA256      if set, the app refuses to start unless the weights hash to it (pin it in the
                      compose file, so the compose hash the quote carries names the weights)
    RECEIPTS_DIR      receipt store and Merkle log (default /data/receipts: the encrypted volume)
    HOST, PORT        listener (default 127.0.0.1:8000; the compose file sets HOST=0.0.0.0)
    TLS_NAMES         if set (comma-separated DNS names), serve HTTPS with a GetTlsKey key and certificate:
                      the key's SPKI hash goes into the attested key set, so clients pin it (use the gateway's
                      TLS passthrough, `<app_id>-<port>s.<base_domain>`, so TLS ends inside the CVM)
    TLS_DIR           where the TLS key is written for the listener (default /run/teecloud-ai, a tmpfs)
    ENGINE_PORT       the engine's loopback port (default 8081)
    GPU               "simulated": attach this installation's simulated GPU's SPDM evidence to each report
                      (development); unset: no GPU evidence (NVML on a real GPU is not implemented yet)
    RECEIPT_ROOTS_ADDRESS, CHAIN_RPC_URL
                      if both set, publish the receipt log's head to this ReceiptRoots contract every
                      ROOT_INTERVAL seconds (default 60) when it grew, in transactions sent from the
                      receipt-signing address (fund it with gas money)
    ENGINE_EMBEDDINGS "1": the engine serves /v1/embeddings too (llama.cpp's own, through the front with a
                      receipt like every answer; the AI agent uses them for its memory)
    ENGINE_THREADS, N_CTX, KEY_EPOCH
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dstack_sdk import DstackClient

    from teecloud.ai._http import Listener, fast_event_loop
    from teecloud.ai.engine import EngineProcess, llama_cpp_argv
    from teecloud.ai.server import (
        InferenceConfig,
        keys_from_guest_api,
        make_inference_app,
        tls_key_from_guest_api,
        weights_sha256,
    )

    if not os.environ.get("MODEL_PATH"):
        print("error: set MODEL_PATH to the GGUF weights", file=sys.stderr)
        return 2
    model_path = Path(os.environ["MODEL_PATH"])
    model_id = os.environ.get("MODEL_ID") or model_path.name.removesuffix(".gguf")
    try:
        digest = weights_sha256(model_path)
    except OSError as exc:
        print(f"error: cannot read MODEL_PATH {model_path}: {exc.strerror}", file=sys.stderr)
        return 2
    expected = os.environ.get("MODEL_SHA256", "").lower().removeprefix("0x")
    if expected and expected != digest.hex():
        print(f"error: {model_path} has sha256 {digest.hex()}, MODEL_SHA256 says {expected}", file=sys.stderr)
        return 2
    names = [n.strip() for n in os.environ.get("TLS_NAMES", "").split(",") if n.strip()]
    tls = None
    spki = bytes(32)
    try:
        guest = DstackClient(timeout=30)
        if names:
            chain, key, spki = tls_key_from_guest_api(
                guest, Path(os.environ.get("TLS_DIR", "/run/teecloud-ai")), names=names
            )
            tls = (chain, key)
        keys = keys_from_guest_api(guest, epoch=int(os.environ.get("KEY_EPOCH", "0")), tls_spki_sha256=spki)
    except Exception as exc:  # the guest API is the app's only source of keys: without it, say why and stop
        print(f"error: cannot get keys from the guest agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    def quote(report_data: bytes) -> dict[str, str]:
        q = guest.get_quote(report_data)
        return {"quote": q.quote, "event_log": q.event_log, "vm_config": q.vm_config}

    gpu = None
    if os.environ.get("GPU") == "simulated":
        from teecloud.ai.gpu import SimulatedGpu

        gpu = SimulatedGpu()
    publisher = None
    engine_port = int(os.environ.get("ENGINE_PORT", "8081"))
    embeddings = os.environ.get("ENGINE_EMBEDDINGS", "") == "1"
    engine = EngineProcess(
        llama_cpp_argv(
            model_path,
            port=engine_port,
            alias=model_id,
            n_ctx=int(os.environ.get("N_CTX", "2048")),
            threads=int(os.environ.get("ENGINE_THREADS", "2")),
            embedding=embeddings,
        ),
        f"http://127.0.0.1:{engine_port}",
    ).start()
    try:
        engine.wait_ready(timeout=300)
        config = InferenceConfig(
            model_id=model_id,
            weights_sha256=digest,
            engine_url=engine.url,
            receipts_dir=Path(os.environ.get("RECEIPTS_DIR", "/data/receipts")),
            embeddings=embeddings,
        )
        app = make_inference_app(config, keys, quote, gpu=gpu)
        if os.environ.get("RECEIPT_ROOTS_ADDRESS") and os.environ.get("CHAIN_RPC_URL"):
            from teecloud.ai.roots import RootPublisher, chain_proof
            from teecloud.chain import ChainConnection
            from teecloud.chain.receiptroots import ReceiptRoots
            from teecloud.chain.transport import HttpTransport

            conn = ChainConnection(
                HttpTransport(os.environ["CHAIN_RPC_URL"]),
                "0x" + keys.signing_secret.hex(),
                label="receipt roots",
            )
            roots = ReceiptRoots(conn, os.environ["RECEIPT_ROOTS_ADDRESS"])
            publish = roots.publish
            if int(roots.kms_auth(), 16):  # the contract checks the key's chain to the KMS root: send it
                proof = chain_proof(keys.keyset)

                def publish(app_id: bytes, size: int, root: bytes, sig: bytes) -> object:
                    return roots.publish_verified(app_id, size, root, sig, proof)

            publisher = RootPublisher(
                app.state.front.log,
                keys.keyset.app_id,
                keys.signing_secret,
                publish,
                interval=float(os.environ.get("ROOT_INTERVAL", "60")),
            ).start()
            print(f"publishing receipt roots to {roots.address}", flush=True)
        listener = Listener(
            app,
            name="teecloud-ai-front",
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", "8000")),
            tls=tls,
            loop=fast_event_loop(),  # uvloop where the image has it (docs/ai.md, performance)
        )
        print(
            f"serving {model_id} (weights sha256 {digest.hex()}) for app {keys.keyset.app_id.hex()}; "
            f"receipts signed by {keys.keyset.signing_address}",
            flush=True,
        )
        listener.run_forever()
    finally:
        if publisher is not None:
            publisher.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
