"""Fuzz every evidence parser of teecloud.attestation.

    python3 fuzz/run.py --seconds 30                    # all targets at once (the CI's brief run)
    python3 fuzz/run.py --target nitro --seconds 600    # one target, its corpus in fuzz/corpus/nitro/

Uses atheris (libFuzzer for Python; `pip install atheris==3.0.0`, the `fuzz` extra) seeded with the real
vectors in ../shared/vectors and the kept corpus in fuzz/corpus/<target>/. Without atheris (or with
--no-atheris) it falls back to a random-mutation loop over the same seeds and says so. Exits 0 when nothing
but teecloud's own error types came out, 1 on the first crash (the input is written to
fuzz/crash-<sha256>.bin; keep it as fuzz/regressions/<target>/<name>.bin, which pytest replays).

Memory: every verifier cache is bounded in bytes (attestation._cache); the harness checks that their sum
stays inside the budget every 4096 inputs and fails (exit 1) when it does not, so a cache that grows without
bound is found as a crash, not as an out-of-memory kill after hours.

Targets: quote, collateral, eventlog, dstack_json, snp, nitro, nvidia, policy. Without --target, the first
input byte picks one.
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

from teecloud.attestation import _cache, _pck, _tcb, dcap, eventlog  # noqa: E402
from teecloud.attestation._limits import CACHE_BUDGETS, DEFAULT_LIMITS  # noqa: E402
from teecloud.attestation.errors import AttestationError  # noqa: E402
from teecloud.attestation.policy import Policy  # noqa: E402
from teecloud.attestation.verifier import TrustAnchors, verify  # noqa: E402

VECTORS = ROOT.parent / "shared" / "vectors"
CORPUS = ROOT / "fuzz" / "corpus"
REGRESSIONS = ROOT / "fuzz" / "regressions"
NOW = calendar.timegm((2025, 7, 4, 0, 0, 0))
CACHE_BUDGET = sum(b.max_bytes for b in CACHE_BUDGETS.values())
CHECK_EVERY = 4096


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
    # the platform-model path's exact DER reader, on every certificate block of the input
    for der in dcap._complete_blocks(data):
        _pck.masked_tbs(der)
    dcap.parse_quote(data)
    dcap.verify_dcap_quote(data, TDX_COL, now=NOW)


TDX_QUOTE = _read("tdx/tdx_quote")


def _collateral(data: bytes) -> None:
    # what is read from a collateral only from a platform's second sight on: its windows, the PCK CRL and
    # the TCB rules, evaluated for the vector's TCB values
    try:
        col = dcap._collateral(data, DEFAULT_LIMITS)
    except AttestationError:
        col = None
    if col is not None:
        _ = col.window, col.pck_crl
        if col.rules is not None:
            q = dcap._parse(TDX_QUOTE)
            _tcb.evaluate(
                col.rules,
                tdx=True,
                cpu_svn=bytes(16),
                pce_svn=13,
                qe_isvsvn=8,
                tee_tcb_svn=q.report["tee_tcb_svn"],
                mr_signer_seam=q.report["mrsignerseam"],
                seam_attributes=q.report["seam_attributes"],
            )
    dcap.verify_dcap_quote(TDX_QUOTE, data, now=NOW)


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


Target = Callable[[bytes], None]
TARGETS: dict[str, tuple[Target, list[bytes]]] = {
    "quote": (_quote, [_read("tdx/tdx_quote"), _read("tdx/tdx_quote_outdated"), _read("sgx/sgx_quote")]),
    "collateral": (_collateral, [TDX_COL]),
    "eventlog": (_event_log, [json.loads(_read("tdx/dstack_quote_report.json"))["event_log"].encode()]),
    "dstack_json": (_verify_any, [_read("tdx/dstack_quote_report.json")]),
    "snp": (_verify_any, [_read("snp/go-sev-guest_attestation.bin")]),
    "nitro": (_verify_any, [_read("nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor")]),
    "nvidia": (_nvidia, [_read("nvidia/nvtrust_lgv_hopperAttestationReport.txt")]),
    "policy": (_policy, [b'version = 1\nallowed_tee = ["tdx"]\n[measurements]\nmrtd = "00"\n']),
}
NAMES = list(TARGETS)


class CacheBudgetExceeded(Exception):
    """The verifier's caches hold more bytes than their budget: a cache that is not bounded."""


def run_target(name: str, data: bytes) -> None:
    """One input to one target; teecloud's own errors are the only acceptable way to refuse it."""
    try:
        TARGETS[name][0](data)
    except AttestationError:
        pass


_runs = [0]


def _check_memory() -> None:
    _runs[0] += 1
    if _runs[0] % CHECK_EVERY == 0:
        held = sum(s.bytes for s in _cache.all_caches())
        if held > CACHE_BUDGET:
            raise CacheBudgetExceeded(f"verifier caches hold {held} bytes, budget {CACHE_BUDGET}")


def one_input(data: bytes) -> None:
    """All targets at once: the first byte picks one."""
    if not data:
        return
    run_target(NAMES[data[0] % len(NAMES)], data[1:])
    _check_memory()


def _one_target(name: str) -> Callable[[bytes], None]:
    def fuzz(data: bytes) -> None:
        run_target(name, data)
        _check_memory()

    return fuzz


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


def _seeds(name: str) -> list[bytes]:
    kept = sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []
    return TARGETS[name][1] + [p.read_bytes() for p in kept if p.is_file()]


def random_loop(seconds: float, reason: str, target: str | None = None) -> int:
    print(f"{reason}: falling back to a random-mutation loop over the seeds", file=sys.stderr)
    rng = random.Random(0)
    deadline = time.monotonic() + seconds
    names = [target] if target else NAMES
    seeds = {n: _seeds(n) for n in names}
    runs = 0
    while time.monotonic() < deadline:
        name = rng.choice(names)
        data = _mutate(rng, rng.choice(seeds[name]))
        try:
            run_target(name, data)
            _check_memory()
        except Exception as exc:
            return _crash(bytes([NAMES.index(name)]) + data if target is None else data, exc)
        runs += 1
    print(f"random-mutation loop: {runs} inputs in {seconds:.0f}s, no crash")
    return 0


def atheris_loop(seconds: float, corpus: Path, target: str | None, extra: list[str]) -> int:
    import atheris

    corpus.mkdir(parents=True, exist_ok=True)
    names = [target] if target else NAMES
    for name in names:
        prefix = b"" if target else bytes([NAMES.index(name)])
        for j, seed in enumerate(_seeds(name)):
            (corpus / f"seed-{name}-{j}").write_bytes(prefix + seed)
    atheris.instrument_all()  # coverage feedback for every loaded Python module (teecloud, cbor2, ...)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            "-max_len=65536",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={ROOT / 'fuzz'}/",
            *extra,
            str(corpus),
        ],
        _one_target(target) if target else one_input,
    )
    atheris.Fuzz()  # exits the process itself; a crash exits non-zero with the input saved by libFuzzer
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="Fuzz teecloud's evidence parsers.")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--target", choices=NAMES, default=None, help="fuzz one target (default: all)")
    ap.add_argument("--corpus", type=Path, default=None, help="working corpus directory (default: temp)")
    ap.add_argument("--no-atheris", action="store_true", help="use the random-mutation loop")
    ap.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags, after --")
    args = ap.parse_args()
    if args.no_atheris:
        return random_loop(args.seconds, "--no-atheris", args.target)
    try:
        import atheris  # noqa: F401
    except ImportError:
        return random_loop(args.seconds, "atheris is not installed", args.target)
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="teecloud-fuzz-"))
    return atheris_loop(args.seconds, corpus, args.target, args.libfuzzer_args)


if __name__ == "__main__":
    sys.exit(main())
