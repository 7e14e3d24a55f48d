"""Fuzz every evidence parser of teecloud.attestation for N seconds.

    python3 fuzz/run.py --seconds 30

Uses atheris (libFuzzer for Python; `pip install atheris==3.0.0`, the `fuzz` extra) seeded with the real
vectors in ../shared/vectors. Without atheris it falls back to a random-mutation loop over the same seeds
and says so. Exits 0 when nothing but teecloud's own error types came out, 1 on the first crash (the
input is written to fuzz/crash-<sha256>.bin).

Targets (the first input byte picks one): DCAP quote parse + verify, collateral, dstack event log,
dstack JSON / autodetection through verify(), SEV-SNP, Nitro and NVIDIA through verify(), policy text.
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from teecloud.attestation import dcap, eventlog  # noqa: E402
from teecloud.attestation.errors import AttestationError  # noqa: E402
from teecloud.attestation.policy import Policy  # noqa: E402
from teecloud.attestation.verifier import TrustAnchors, verify  # noqa: E402

VECTORS = ROOT.parent / "shared" / "vectors"
NOW = calendar.timegm((2025, 7, 4, 0, 0, 0))


def _read(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


TDX_COL = _read("tdx/tdx_quote_collateral.json")
VCEK = _read("snp/go-sev-guest_vcek.testcer")
ANCHORS = TrustAnchors.from_certificates(
    [
        _read("snp/go-sev-guest_ask_ark_milan.pem"),
        _read("nitro/AWS_NitroEnclaves_Root-G1.pem"),
        _read("nvidia/nvtrust_lgv_verifier_device_root.pem"),
    ]
)
NV_CHAIN = _read("nvidia/nvtrust_lgv_hopperCertChain.txt")


def _quote(data: bytes) -> None:
    dcap.parse_quote(data)
    dcap.verify_dcap_quote(data, TDX_COL, now=NOW)


def _collateral(data: bytes) -> None:
    dcap.verify_dcap_quote(_read("tdx/tdx_quote"), data, now=NOW)


def _event_log(data: bytes) -> None:
    entries = eventlog.parse_event_log(data)
    eventlog.verify_event_log(entries, eventlog.replay_rtmrs(entries))


def _verify_any(data: bytes) -> None:
    verify(data, collateral=TDX_COL, cert_chain=[VCEK], anchors=ANCHORS, now=NOW)


def _nvidia(data: bytes) -> None:
    verify(data, kind="nvidia", cert_chain=NV_CHAIN, anchors=ANCHORS, now=NOW)


def _policy(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    Policy.from_text(text, fmt="toml")
    Policy.from_text(text, fmt="json")


TARGETS: list[tuple[Callable[[bytes], None], list[bytes]]] = [
    (_quote, [_read("tdx/tdx_quote"), _read("tdx/tdx_quote_outdated"), _read("sgx/sgx_quote")]),
    (_collateral, [TDX_COL]),
    (_event_log, [json.loads(_read("tdx/dstack_quote_report.json"))["event_log"].encode()]),
    (_verify_any, [_read("tdx/dstack_quote_report.json"), _read("snp/go-sev-guest_attestation.bin")]),
    (_verify_any, [_read("nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor")]),
    (_nvidia, [_read("nvidia/nvtrust_lgv_hopperAttestationReport.txt")]),
    (_policy, [b'version = 1\nallowed_tee = ["tdx"]\n[measurements]\nmrtd = "00"\n']),
]


def one_input(data: bytes) -> None:
    if not data:
        return
    target, _ = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except AttestationError:
        pass  # the only acceptable way to refuse input


def _crash(data: bytes, exc: BaseException) -> int:
    path = ROOT / "fuzz" / f"crash-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    print(f"CRASH: {type(exc).__name__}: {exc}\ninput saved to {path}", file=sys.stderr)
    return 1


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif op == 3:
            del data[pos : pos + rng.randint(1, 128)]
        elif data:
            data[min(pos, len(data) - 1)] = rng.choice([0, 0xFF, 0x7F, 0x80])
    return bytes(data)


def random_loop(seconds: float) -> int:
    print(
        "atheris is not installed: falling back to a random-mutation loop over the vectors", file=sys.stderr
    )
    rng = random.Random(0)
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        index = rng.randrange(len(TARGETS))
        data = bytes([index]) + _mutate(rng, rng.choice(TARGETS[index][1]))
        try:
            one_input(data)
        except Exception as exc:
            return _crash(data, exc)
        runs += 1
    print(f"random-mutation loop: {runs} inputs in {seconds:.0f}s, no crash")
    return 0


def atheris_loop(seconds: float, corpus: Path) -> int:
    import atheris

    corpus.mkdir(parents=True, exist_ok=True)
    for i, (_, seeds) in enumerate(TARGETS):
        for j, seed in enumerate(seeds):
            (corpus / f"seed-{i}-{j}").write_bytes(bytes([i]) + seed)
    atheris.instrument_all()  # coverage feedback for every loaded Python module (teecloud, cbor2, ...)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            "-max_len=65536",
            "-rss_limit_mb=4096",
            f"-artifact_prefix={ROOT / 'fuzz'}/",
            str(corpus),
        ],
        one_input,
    )
    atheris.Fuzz()  # exits the process itself; a crash exits non-zero with the input saved by libFuzzer
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="Fuzz teecloud's evidence parsers.")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus directory (default: a new temp dir)")
    ap.add_argument("--no-atheris", action="store_true", help="use the random-mutation loop")
    args = ap.parse_args()
    if args.no_atheris:
        return random_loop(args.seconds, "--no-atheris")
    try:
        import atheris  # noqa: F401
    except ImportError:
        return random_loop(args.seconds, "atheris is not installed")
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="teecloud-fuzz-"))
    return atheris_loop(args.seconds, corpus)


if __name__ == "__main__":
    sys.exit(main())
