"""`teecloud ai`: the client side of confidential inference.

teecloud ai proxy --upstream URL --kms-root HEX ...   a verifying OpenAI-compatible endpoint on localhost
teecloud ai verify RECEIPT --kms-root HEX ...         check a receipt (and its log inclusion) offline
teecloud ai collateral fetch --dir DIR ...           fill the offline NVIDIA collateral cache (OCSP, RIMs)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(
    name="ai",
    help="Confidential inference: the verifying proxy and offline receipt checks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)
_out = Console()
_MAX_RECEIPT_FILE = 1024 * 1024


def _fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _hex(value: str | None, name: str, size: int | None = None) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        _fail(f"{name} must be hex", 2)
    if size is not None and len(raw) != size:
        _fail(f"{name} must be {size} bytes", 2)
    return raw


def _kms_root(value: str) -> bytes:
    raw = _hex(value, "--kms-root")
    assert raw is not None
    if len(raw) not in (33, 65):
        _fail("--kms-root is the KMS root's secp256k1 public key (33 or 65 bytes of hex)", 2)
    return raw


@app.callback()
def _ai() -> None:
    """Confidential inference: the verifying proxy and offline receipt checks."""


@app.command("proxy")
def proxy(
    upstream: Annotated[str, typer.Option("--upstream", help="The attested inference app's base URL.")],
    kms_root: Annotated[
        str, typer.Option("--kms-root", help="KMS root k256 public key (hex) the app's keys must chain to.")
    ],
    port: Annotated[int, typer.Option("--port", help="Local port (127.0.0.1).")] = 8089,
    app_id: Annotated[str | None, typer.Option("--app-id", help="Expected app id (hex).")] = None,
    compose_hash: Annotated[
        list[str] | None, typer.Option("--compose-hash", help="An allowed compose hash (hex); repeatable.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Expected model id.")] = None,
    weights_sha256: Annotated[
        str | None, typer.Option("--weights-sha256", help="Expected sha256 of the weights (hex).")
    ] = None,
    trust_dev_root: Annotated[
        bool,
        typer.Option("--trust-dev-root", help="Accept this installation's SIMULATED TEE (development only)."),
    ] = False,
    pccs_url: Annotated[str | None, typer.Option("--pccs-url", help="PCCS for TDX collateral.")] = None,
    no_e2ee: Annotated[bool, typer.Option("--no-e2ee", help="Send prompts without E2EE.")] = False,
    secp256k1: Annotated[
        bool,
        typer.Option("--secp256k1", help="Seal prompts to the key set's secp256k1 E2EE key (not X25519)."),
    ] = False,
    allow_http: Annotated[
        bool,
        typer.Option("--allow-http", help="Accept a plain-HTTP upstream (no TLS key to pin; development)."),
    ] = False,
    require_gpu: Annotated[
        bool, typer.Option("--require-gpu", help="Refuse an upstream without verified GPU evidence.")
    ] = False,
    gpu_root: Annotated[
        list[Path] | None, typer.Option("--gpu-root", help="A trusted NVIDIA device identity root (DER/PEM).")
    ] = None,
    receipts: Annotated[
        str,
        typer.Option(
            "--receipts",
            help="How each answer's receipt reaches the proxy: 'inline' (sent with the answer; the default) "
            "or 'fetch' (GET /v1/receipts/{id} per answer, for inference apps that predate inline receipts).",
        ),
    ] = "inline",
) -> None:
    """Serve a verifying OpenAI-compatible endpoint on 127.0.0.1:PORT in front of UPSTREAM: it checks the
    upstream's quote, event log, app, compose hash and key chain, pins its keys, encrypts prompts and checks
    every answer's receipt; it refuses (502, with the failing step) on any failure."""
    from teecloud.ai._http import Listener
    from teecloud.ai.e2ee import ALG_K256, ALG_X25519
    from teecloud.ai.proxy import ProxyPolicy, make_proxy_app, proxy_event_loop
    from teecloud.cli._peers import MISSING, verifier_from_flags

    if not 0 <= port <= 65535:
        _fail("--port must be 0..65535", 2)
    if secp256k1 and no_e2ee:
        _fail("--secp256k1 chooses the E2EE key: it cannot go with --no-e2ee", 2)
    if receipts not in ("inline", "fetch"):
        _fail("--receipts is 'inline' or 'fetch'", 2)
    allowed = frozenset(h for h in (_hex(c, "--compose-hash", 32) for c in compose_hash or []) if h)
    gpu_roots: list[bytes] = []
    for path in gpu_root or []:
        try:
            gpu_roots.append(path.read_bytes()[:65536])
        except OSError as exc:
            _fail(f"cannot read --gpu-root {path}: {exc.strerror}", 2)
    if trust_dev_root:
        from teecloud.ai.gpu import SimulatedGpu

        gpu_roots.append(SimulatedGpu().root_der())
    policy = ProxyPolicy(
        kms_root_public_key=_kms_root(kms_root),
        expected_app_id=_hex(app_id, "--app-id", 20),
        allowed_compose_hashes=allowed or None,
        expected_model=model,
        expected_weights_sha256=_hex(weights_sha256, "--weights-sha256", 32),
        e2ee=not no_e2ee,
        e2ee_alg=ALG_K256 if secp256k1 else ALG_X25519,
        allow_plain_http=allow_http,
        gpu_trust_anchors=tuple(gpu_roots),
        require_gpu=require_gpu,
        receipts=receipts,
    )
    if not upstream.startswith(("https://", "http://")):
        _fail("--upstream must be an http:// or https:// URL", 2)
    if upstream.startswith("http://") and not allow_http:
        _fail("--upstream is plain HTTP: there is no TLS key to pin (give --allow-http for development)", 2)
    verifier = verifier_from_flags(trust_dev_root, pccs_url, _err)
    if verifier is None:
        _fail(MISSING, 2)
    listener = Listener(
        make_proxy_app(upstream, verifier, policy),
        name="teecloud-ai-proxy",
        port=port,
        loop=proxy_event_loop(),
    )
    _out.print(f"teecloud ai proxy: http://127.0.0.1:{port}/v1 -> {upstream} (verifying)", highlight=False)
    listener.run_forever()


def _check_on_chain(
    doc: dict[str, Any], index: int, head: Any, signer: str, rpc_url: str, address: str
) -> None:
    """The receipt is anchored in the head ReceiptRoots holds for (app, signing address)."""
    from teecloud.ai.roots import check_anchored
    from teecloud.chain import ChainConnection, ChainError
    from teecloud.chain.receiptroots import ReceiptRoots
    from teecloud.chain.transport import HttpTransport

    consistency = None
    c = doc.get("consistency")
    try:
        with ChainConnection(HttpTransport(rpc_url), label=rpc_url) as conn:
            roots = ReceiptRoots(conn, address)
            # the head checked on chain up to the KMS root (publish_verified) if there is one, else the one
            # this receipt's signing key published (its key set was checked against --kms-root above)
            on_chain = roots.verified_head(head.app_id)
            if on_chain.tree_size == 0:
                on_chain = roots.head(head.app_id, signer)
    except (ChainError, ValueError) as exc:
        _fail(f"cannot read the receipt root on chain: {exc}")
    if isinstance(c, dict) and c.get("first") == on_chain.tree_size:
        proof = c.get("proof")
        if not isinstance(proof, list) or len(proof) > 128 or not all(isinstance(p, str) for p in proof):
            _fail("the consistency proof is malformed")
        consistency = [bytes.fromhex(p) for p in proof]
    check_anchored(index, head, on_chain.tree_size, on_chain.root, consistency)


@app.command("verify")
def verify(
    receipt: Annotated[Path, typer.Argument(help="A receipt JSON (or the GET /v1/receipts/{id} answer).")],
    kms_root: Annotated[str, typer.Option("--kms-root", help="KMS root k256 public key (hex).")],
    app_id: Annotated[str | None, typer.Option("--app-id", help="Expected app id (hex).")] = None,
    request: Annotated[Path | None, typer.Option("--request", help="The request body sent.")] = None,
    response: Annotated[Path | None, typer.Option("--response", help="The response body received.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="With --receipt-roots: the chain's JSON-RPC URL.")
    ] = None,
    receipt_roots: Annotated[
        str | None,
        typer.Option(
            "--receipt-roots",
            help="ReceiptRoots contract: also check the receipt is anchored in the root published on chain "
            "(fetch the receipt with ?since=<on-chain size> when the log grew since).",
        ),
    ] = None,
) -> None:
    """Check a receipt offline: its key set's chain to the KMS root, its signature, its app, optionally the
    request and response bytes, and (for a GET /v1/receipts answer) its inclusion in the signed log and,
    with --receipt-roots, in the root the app published on chain."""
    from teecloud.ai import AiError, SignedReceipt, TreeHead, verify_inclusion, verify_receipt
    from teecloud.ai.receiptlog import leaf_hash

    root = _kms_root(kms_root)
    if (rpc_url is None) != (receipt_roots is None):
        _fail("--rpc-url and --receipt-roots go together", 2)
    _hex(receipt_roots, "--receipt-roots", 20)  # an address

    def read(p: Path | None, what: str) -> bytes | None:
        if p is None:
            return None
        try:
            with open(p, "rb") as f:
                data = f.read(_MAX_RECEIPT_FILE * 16 + 1)
        except OSError as exc:
            _fail(f"cannot read {what} {p}: {exc.strerror}", 2)
        if len(data) > _MAX_RECEIPT_FILE * 16:
            _fail(f"{what} {p} is too large", 2)
        return data

    raw = read(receipt, "receipt") or b""
    try:
        doc: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        _fail(f"{receipt} is not JSON", 2)
    inner = doc.get("receipt", doc) if isinstance(doc, dict) else doc
    steps: list[str] = []
    try:
        parsed = SignedReceipt.from_json(inner)
        body = verify_receipt(
            parsed,
            kms_root_public_key=root,
            expected_app_id=_hex(app_id, "--app-id", 20),
            request_body=read(request, "request"),
            response_body=read(response, "response"),
        )
        steps += ["keyset_chain", "keyset_binding", "signature"]
        steps += [
            s for s, given in (("app_id", app_id), ("request", request), ("response", response)) if given
        ]
        if isinstance(doc, dict) and "tree_head" in doc:
            head = TreeHead.from_json(doc["tree_head"])
            head.verify(parsed.keyset.signing_public_key)
            proof_hex = doc.get("inclusion_proof")
            index = doc.get("leaf_index")
            if not isinstance(proof_hex, list) or len(proof_hex) > 64 or not isinstance(index, int):
                _fail("the inclusion proof is malformed")
            proof = [bytes.fromhex(p) for p in proof_hex if isinstance(p, str)]
            if not verify_inclusion(
                leaf_hash(body.body_sha256()), index, head.tree_size, proof, head.root_hash
            ):
                _fail("refused: receipt_log: the receipt is not in the signed log")
            steps += ["tree_head", "inclusion"]
            if receipt_roots is not None and rpc_url is not None:
                _check_on_chain(doc, index, head, parsed.keyset.signing_address, rpc_url, receipt_roots)
                steps.append("on_chain")
        elif receipt_roots is not None:
            _fail("refused: on_chain: give the whole GET /v1/receipts/{id} answer (with its tree head)")
    except AiError as exc:
        if as_json:
            _out.print_json(json.dumps({"ok": False, "reason": str(exc)}))
            raise typer.Exit(1) from None
        _fail(f"refused: {exc}")
    except ValueError as exc:
        _fail(f"refused: malformed receipt: {exc}")
    verdict = {
        "ok": True,
        "steps": steps,
        "receipt_id": body.id,
        "app_id": body.app_id.hex(),
        "model": body.model,
        "weights_sha256": body.weights_sha256.hex(),
        "signing_address": parsed.keyset.signing_address,
    }
    if as_json:
        _out.print_json(json.dumps(verdict))
    else:
        _out.print(
            f"receipt {body.id}: verified ({', '.join(steps)}); app {body.app_id.hex()}, model {body.model}, "
            f"signed by {parsed.keyset.signing_address}",
            highlight=False,
        )


collateral_app = typer.Typer(
    name="collateral",
    help="Offline NVIDIA collateral (OCSP answers and RIMs) for the GPU gate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(collateral_app, name="collateral")


def _read_pem_or_der(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {what} {path}: {exc.strerror}", 2)
    if len(data) > 65536:
        _fail(f"{what} {path} is over 64 KiB", 2)
    return data


@collateral_app.command("fetch")
def collateral_fetch(
    directory: Annotated[Path, typer.Option("--dir", help="The cache directory (NvidiaCollateralCache).")],
    chain: Annotated[
        Path | None,
        typer.Option("--chain", help="A GPU device certificate chain (PEM, leaf first): OCSP for each."),
    ] = None,
    rim: Annotated[list[str] | None, typer.Option("--rim", help="A RIM id to fetch; repeatable.")] = None,
    trust_root: Annotated[
        list[Path] | None,
        typer.Option("--trust-root", help="A trusted RIM signing root (DER/PEM); repeatable."),
    ] = None,
    trust_dev_root: Annotated[
        bool, typer.Option("--trust-dev-root", help="Trust this installation's SIMULATED GPU root (dev).")
    ] = False,
    ocsp_url: Annotated[str | None, typer.Option("--ocsp-url", help="OCSP responder URL.")] = None,
    rim_url: Annotated[str | None, typer.Option("--rim-url", help="RIM service URL.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request.")] = 10.0,
) -> None:
    """Fetch OCSP answers for a device chain from NVIDIA's OCSP responder and RIMs by id from NVIDIA's RIM
    service into DIR; each is checked (signature, dates, the certificate or id asked for) before it is cached,
    and a refused answer leaves the cache as it was."""
    import time

    from cryptography import x509

    from teecloud.collateral.errors import CollateralError
    from teecloud.collateral.nvidia import NvidiaCollateralCache
    from teecloud.collateral.nvidia_fetch import NVIDIA_OCSP_URL, NVIDIA_RIM_URL, NvidiaCollateralClient

    if chain is None and not rim:
        _fail("nothing to fetch: give --chain and/or --rim", 2)
    if not 0 < timeout <= 120:
        _fail("--timeout is 0..120 seconds", 2)
    anchors = [_read_pem_or_der(p, "--trust-root") for p in trust_root or []]
    if trust_dev_root:
        from teecloud.ai.gpu import SimulatedGpu

        anchors.append(SimulatedGpu().root_der())
    if rim and not anchors:
        _fail("--rim needs a trusted RIM signing root (--trust-root, or --trust-dev-root for development)", 2)
    certs: list[x509.Certificate] = []
    if chain is not None:
        try:
            certs = x509.load_pem_x509_certificates(_read_pem_or_der(chain, "--chain"))
        except ValueError:
            _fail(f"--chain {chain} is not a PEM certificate chain", 2)
    client = NvidiaCollateralClient(
        NvidiaCollateralCache(directory),
        ocsp_url=ocsp_url or NVIDIA_OCSP_URL,
        rim_url=rim_url or NVIDIA_RIM_URL,
        timeout_s=timeout,
    )
    failed = 0
    now = int(time.time())
    try:
        if certs:
            try:
                for got in client.fetch_ocsp_chain(certs, now=now):
                    e = got.entry
                    _out.print(
                        f"ocsp {e.status} serial {e.serial:x} ({got.subject}), valid until {e.next_update}",
                        highlight=False,
                    )
            except CollateralError as exc:
                failed += 1
                _err.print(f"[bold red]refused:[/] ocsp: {exc}", highlight=False)
        for rim_id in rim or []:
            try:
                got_rim = client.fetch_rim(rim_id, trust_anchors=anchors, now=now)
                _out.print(f"rim {rim_id}: version {got_rim.version}", highlight=False)
            except ValueError as exc:
                failed += 1
                _err.print(f"[bold red]refused:[/] rim {rim_id!r}: {exc}", highlight=False)
            except CollateralError as exc:
                failed += 1
                _err.print(f"[bold red]refused:[/] rim {rim_id}: {exc}", highlight=False)
    finally:
        client.close()
    if failed:
        raise typer.Exit(1)
