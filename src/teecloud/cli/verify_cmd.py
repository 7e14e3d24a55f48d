"""`teecloud verify` and `teecloud trust ...`.

Exit codes of `verify`: 0 = valid under the policy, 1 = evidence rejected, 2 = usage error or unreadable
input.

Trust: `--trust-anchor FILE` (repeatable; PEM bundles allowed) adds vendor roots, sorted by their subject
(Intel, AMD ARK/ASK, AWS Nitro, NVIDIA); every certificate file in `data_home()/trust/` is added too.
`--trust-dev-root` trusts the simulated TEE's development root (`--dev-root FILE` names another one; the
CLI parser has no optional-value options, so the path is a separate option).

Evidence files are autodetected: raw bytes, hex or base64 text, dstack JSON (also the dstack SDK's GetQuote
output), SEV-SNP report files; certificate files may be PEM bundles or DER (one or several concatenated).
`--crl FILE` / `--ocsp FILE` (repeatable) check the SEV-SNP / Nitro / NVIDIA chain offline, `--amd-kds-url`
fetches the ARK's CRL (cached until nextUpdate); without them the verdict says "revocation not checked".

`--cert-chain FILE` (repeatable) is the evidence's own chain: the VCEK (DER or PEM) for SEV-SNP (the ASK
may come from here or from the AMD anchors), the device chain (leaf first) for NVIDIA. TDX/SGX carry
their chain in the quote but need collateral: `--collateral FILE` or `--pccs-url URL` (cached under
data_home()/pccs-cache/).

`--measurement FILE` (an OS image's measurement.tdx.cbor, `teecloud image measure --out`) adds the image's
expected MRTD and RTMR0-2 for the CVM's vm_config (`--vm-config FILE`, or the dstack JSON's `vm_config`)
beside the quoted values, register by register; a register that differs makes the exit code 1. RTMR0's ACPI
events come from the replayed event log (dstack's lite verification; docs/node.md). For SEV-SNP evidence
the file is the image's measurement.snp.cbor (`image measure --snp-out`) and the vm_config's
`sev_snp_measurement` gives the launch shape: the expected MEASUREMENT is shown beside the signed one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from teecloud._fs import data_home

__all__ = ["register", "trust_app"]

trust_app = typer.Typer(help="Vendor trust anchors (roots) used by `teecloud verify`.", no_args_is_help=True)
_err = Console(stderr=True)


class _Usage(Exception):
    """A usage problem the CLI reports with exit code 2."""


def _read(path: Path, what: str, limit: int = 16 * 1024 * 1024) -> bytes:
    try:
        if path.stat().st_size > limit:
            raise _Usage(f"{what} {path} is larger than {limit} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise _Usage(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _parse_at(value: str | None) -> int:
    if value is None:
        return int(time.time())
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise _Usage(f"--at must be an ISO 8601 time such as 2025-07-04T00:00:00Z, got {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _fail_usage(message: str, as_json: bool) -> None:
    if as_json:  # scripts reading stdout get one object whatever happened
        typer.echo(json.dumps({"is_valid": False, "error": message}))
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _render(result: Any) -> None:
    out = Console()
    verdict = "[bold green]VALID[/]" if result.is_valid else "[bold red]REJECTED[/]"
    out.print(f"{verdict}  tee={result.tee or '?'}  reason: {result.reason}", highlight=False)
    ev = result.evidence
    if ev is not None:
        out.print(
            f"TCB status: {ev.tcb_status or '-'}  advisories: {', '.join(ev.advisory_ids) or 'none'}  "
            f"debug: {ev.debug}  simulated: {ev.simulated}",
            highlight=False,
        )
    steps = Table(title="Verification steps", show_lines=False)
    steps.add_column("step")
    steps.add_column("ok")
    steps.add_column("reason", overflow="fold")
    for s in result.steps:
        steps.add_row(s.name, "[green]✓[/]" if s.ok else "[red]✗[/]", s.reason)
    out.print(steps)
    if ev is not None:
        ms = Table(title="Measurements")
        ms.add_column("name")
        ms.add_column("value (hex)", overflow="fold")
        for name, value in ev.measurements.items():
            ms.add_row(name, value.hex())
        ms.add_row("report_data", ev.report_data.hex())
        out.print(ms)
        if ev.app_info is not None:
            app = Table(title="App (from the replayed event log)")
            app.add_column("field")
            app.add_column("value", overflow="fold")
            for key, value in ev.app_info.to_json().items():
                if key != "events":
                    app.add_row(key, str(value))
            out.print(app)


def verify_command(
    evidence: Annotated[
        Path | None, typer.Argument(help="Quote / report / document file, or dstack JSON.")
    ] = None,
    app_ref: Annotated[
        str | None,
        typer.Option(
            "--app",
            help="Verify a running app of the local cloud instead: fresh quote, event-log replay, "
            "compose hash against the chain (same as `teecloud attest APP`).",
        ),
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="tdx|sgx|snp|nitro|nvidia (default: autodetect)")
    ] = None,
    collateral: Annotated[
        Path | None, typer.Option("--collateral", help="QuoteCollateralV3 JSON for TDX/SGX.")
    ] = None,
    pccs_url: Annotated[
        str | None, typer.Option("--pccs-url", help="Fetch TDX/SGX collateral from this PCCS.")
    ] = None,
    cert_chain: Annotated[
        list[Path] | None,
        typer.Option("--cert-chain", help="Evidence certificate(s): SNP VCEK, NVIDIA chain."),
    ] = None,
    trust_anchor: Annotated[
        list[Path] | None, typer.Option("--trust-anchor", help="Vendor root certificate file (repeatable).")
    ] = None,
    trust_dev_root: Annotated[
        bool,
        typer.Option(
            "--trust-dev-root",
            help="UNSAFE for production: trust the simulated TEE's development root "
            "(data_home()/simulated-tee/root_ca.der, or the file given with --dev-root).",
        ),
    ] = False,
    dev_root: Annotated[
        Path | None,
        typer.Option(
            "--dev-root", help="Development root certificate (DER) to trust; implies --trust-dev-root."
        ),
    ] = None,
    event_log: Annotated[
        Path | None, typer.Option("--event-log", help="dstack JSON event log (TDX).")
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="Verification time, ISO 8601 (default: now).")
    ] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Policy file (TOML or JSON).")] = None,
    crl: Annotated[
        list[Path] | None,
        typer.Option("--crl", help="CRL (DER or PEM) to check the SEV-SNP / Nitro / NVIDIA chain against."),
    ] = None,
    ocsp: Annotated[
        list[Path] | None, typer.Option("--ocsp", help="OCSP response (DER) for a certificate of the chain.")
    ] = None,
    amd_kds_url: Annotated[
        str | None,
        typer.Option("--amd-kds-url", help="Fetch the ARK's CRL for SEV-SNP evidence from this AMD KDS."),
    ] = None,
    measurement: Annotated[
        Path | None,
        typer.Option(
            "--measurement", help="The OS image's measurement.tdx.cbor: show expected MRTD/RTMR0-2."
        ),
    ] = None,
    vm_config_file: Annotated[
        Path | None,
        typer.Option("--vm-config", help="The CVM's vm_config JSON (default: the dstack JSON's vm_config)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Verify TEE evidence and print the verdict. Exit 0 valid, 1 rejected, 2 usage/unreadable input."""
    if app_ref is not None:
        if evidence is not None:
            _fail_usage("give either EVIDENCE or --app, not both", as_json)
        from teecloud.cli.cloud_cmd import attest

        attest(app_ref, as_json)
        return
    if evidence is None:
        _fail_usage("missing EVIDENCE (a quote, report or document file) or --app APP", as_json)
        return
    from teecloud.attestation.dcap import parse_quote, pck_ca, pck_fmspc
    from teecloud.attestation.errors import AttestationError, UsageError, VerificationError
    from teecloud.attestation.models import TeeKind
    from teecloud.attestation.policy import Policy
    from teecloud.attestation.verifier import TrustAnchors, unwrap_evidence, verify
    from teecloud.cli._peers import pccs_client
    from teecloud.collateral import CollateralError, load_trust_directory

    try:
        now = _parse_at(at)
        data = _read(evidence, "evidence")
        pol = Policy.load(policy) if policy else Policy.default()
        anchor_blobs = [blob for _, blob in load_trust_directory()]
        anchor_blobs += [_read(p, "trust anchor") for p in trust_anchor or []]
        dev_root_der: bytes | None = None
        local_root = data_home() / "simulated-tee" / "root_ca.der"
        if trust_dev_root or dev_root is not None:
            dev_root_der = _read(dev_root if dev_root is not None else local_root, "development root")
            _err.print(
                "[yellow]warning:[/] trusting a teecloud development root: simulated evidence may pass",
                highlight=False,
            )
        anchors = TrustAnchors.from_certificates(anchor_blobs, dev_root_der=dev_root_der)
        chain = [_read(p, "certificate chain") for p in cert_chain or []]
        crls = [_read(p, "CRL") for p in crl or []]
        ocsps = [_read(p, "OCSP response") for p in ocsp or []]
        log = _read(event_log, "event log").decode("utf-8", "replace") if event_log else None
        if dev_root_der is not None:
            # Trusting a development root is the explicit choice to accept simulated evidence.
            pol = dataclasses.replace(pol, allow_simulated=True)
        col: bytes | None = _read(collateral, "collateral") if collateral else None
        try:
            found_kind, payload = unwrap_evidence(data)
        except VerificationError:
            found_kind, payload = None, b""  # verify() below says what is wrong with it
        if col is None and found_kind in (TeeKind.TDX, TeeKind.SGX):
            if pccs_url:
                tee = parse_quote(payload)["tee"]
                client = pccs_client(pccs_url)
                col = client.get_collateral(pck_fmspc(payload), ca=pck_ca(payload), tee=tee, now=now)
            elif trust_dev_root and dev_root is None:
                col = _local_simulated_collateral(payload, now=now, explicit_time=at is not None)
        if amd_kds_url and found_kind == TeeKind.SNP:
            crls.append(_amd_crl(amd_kds_url, payload, chain + anchor_blobs, now))
        result = verify(
            data,
            kind=kind,
            collateral=col,
            cert_chain=chain or None,
            event_log=log,
            anchors=anchors,
            policy=pol,
            now=now,
            crls=crls,
            ocsp_responses=ocsps,
        )
    except (_Usage, UsageError, CollateralError) as exc:
        _fail_usage(str(exc), as_json)
        return
    except VerificationError as exc:  # only from reading the quote for the PCCS lookup
        _fail_usage(f"cannot look up collateral: {exc.reason}", as_json)
        return
    except AttestationError as exc:
        _fail_usage(exc.diagnostics(), as_json)
        return
    reference: dict[str, Any] | None = None
    if measurement is not None:
        try:
            reference = _reference(result, _read(measurement, "measurement file"), data, vm_config_file)
        except _Usage as exc:
            _fail_usage(str(exc), as_json)
            return
    if as_json:
        doc = result.to_json()
        if reference is not None:
            doc["reference"] = reference
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _render(result)
        if reference is not None:
            _render_reference(reference)
    matches = reference is None or reference["status"] == "verified"
    raise typer.Exit(0 if result.is_valid and matches else 1)


def _reference(
    result: Any, measurement: bytes, evidence: bytes, vm_config_file: Path | None
) -> dict[str, Any]:
    """The image's expected registers beside the quoted ones: {status, reason, registers: {name: {expected,
    quoted, match}}}; status is `verified`, `failed` (a register differs) or `not applicable` (why)."""
    from teecloud import vmconfig
    from teecloud.attestation.models import TeeKind
    from teecloud.image import ImageError
    from teecloud.image.measurement import acpi_digests_of, expected_tdx_registers, parse

    if vm_config_file is not None:
        raw: object = _read(vm_config_file, "vm_config", vmconfig.MAX_VM_CONFIG_BYTES).decode(
            "utf-8", "replace"
        )
    else:
        try:
            raw = json.loads(evidence).get("vm_config")
        except (ValueError, AttributeError, RecursionError):
            raw = None
        if raw is None:
            raise _Usage(
                "--measurement needs the CVM's vm_config: --vm-config FILE (or dstack JSON evidence)"
            )
    try:
        config = vmconfig.parse(raw)
    except vmconfig.VmConfigError as exc:
        raise _Usage(str(exc)) from None
    ev = result.evidence
    if ev is not None and ev.kind is TeeKind.SNP:
        return _snp_reference(ev, measurement, config)
    try:
        m = parse(measurement)
    except ImageError as exc:
        raise _Usage(str(exc)) from None
    if ev is None or ev.app_info is None or "rtmr0" not in ev.measurements:
        why = "the evidence was not verified with its TDX event log (RTMR0's ACPI events come from it)"
        return {"status": "not applicable", "reason": why, "registers": {}}
    try:
        expected = expected_tdx_registers(m, config, acpi_digests_of(ev.app_info.rtmr0_log)).registers()
    except ImageError as exc:
        return {"status": "not applicable", "reason": str(exc), "registers": {}}
    registers = {
        name: {
            "expected": value.hex(),
            "quoted": ev.measurements[name].hex(),
            "match": ev.measurements[name] == value,
        }
        for name, value in expected.items()
    }
    differing = [n.upper() for n, r in registers.items() if not r["match"]]
    if differing:
        reason = f"{', '.join(differing)} differ from the image's reference for this vm_config"
        return {"status": "failed", "reason": reason, "registers": registers}
    return {"status": "verified", "reason": "MRTD and RTMR0-2 are the image's", "registers": registers}


def _snp_reference(ev: Any, measurement: bytes, config: Any) -> dict[str, Any]:
    """The SEV-SNP image's expected MEASUREMENT for the vm_config's launch shape, beside the signed one."""
    from teecloud.image import ImageError
    from teecloud.image.snp import expected_snp_measurement, parse_snp, parse_snp_shape

    try:
        m = parse_snp(measurement)
        if "sev_snp_measurement" not in config.extra:
            raise _Usage("vm_config has no sev_snp_measurement (vcpus, vcpu_type, guest_features)")
        shape = parse_snp_shape(config.extra["sev_snp_measurement"])
    except ImageError as exc:
        raise _Usage(str(exc)) from None
    if shape.vcpus != config.cpu_count:
        why = f"vm_config has {config.cpu_count} CPUs, its sev_snp_measurement {shape.vcpus} vCPUs"
        return {"status": "failed", "reason": why, "registers": {}}
    try:
        expected = expected_snp_measurement(m, shape)
    except ImageError as exc:
        return {"status": "not applicable", "reason": str(exc), "registers": {}}
    quoted = ev.measurements["measurement"]
    registers = {
        "measurement": {"expected": expected.hex(), "quoted": quoted.hex(), "match": quoted == expected}
    }
    shape_text = f"{shape.vcpus} {shape.vcpu_type} vCPUs, guest features {shape.guest_features:#x}"
    if quoted != expected:
        reason = f"MEASUREMENT differs from the image's reference for {shape_text}"
        return {"status": "failed", "reason": reason, "registers": registers}
    return {
        "status": "verified",
        "reason": f"MEASUREMENT is the image's for {shape_text}",
        "registers": registers,
    }


def _render_reference(reference: dict[str, Any]) -> None:
    out = Console()
    colour = {"verified": "green", "failed": "red"}.get(reference["status"], "yellow")
    out.print(f"[bold {colour}]reference: {reference['status']}[/]  {reference['reason']}", highlight=False)
    if not reference["registers"]:
        return
    table = Table(title="Reference measurements (the OS image's measurement file, this vm_config)")
    table.add_column("register")
    table.add_column("match")
    table.add_column("expected / quoted (hex)", overflow="fold")
    for name, r in reference["registers"].items():
        mark = "[green]✓[/]" if r["match"] else "[red]✗[/]"
        table.add_row(name, mark, f"{r['expected']}\n{r['quoted']}")
    out.print(table)


def _local_simulated_collateral(quote: bytes, *, now: int, explicit_time: bool) -> bytes | None:
    """This installation's simulated platform's collateral, made on demand (no `tee dev-root --export`
    needed first): its TCB info and QE identity are signed by this installation's development root, so they
    only verify quotes of this platform; for any other quote, None (and the verdict says why)."""
    from teecloud.attestation.dcap import pck_fmspc
    from teecloud.tee.simulated import STATE_DIR_NAME, SimulatedTdx

    home = data_home()
    if not (home / STATE_DIR_NAME / "root_ca.der").is_file():
        return None
    local = home / STATE_DIR_NAME / "collateral" / f"{pck_fmspc(quote)}.json"
    if local.is_file() and not explicit_time:
        return _read(local, "collateral")
    tee = SimulatedTdx(home)
    if tee.fmspc.upper() != pck_fmspc(quote).upper():
        return None
    return tee.collateral(now=now) if explicit_time else tee.collateral()


def _amd_crl(url: str, report: bytes, certs: list[bytes], now: int) -> bytes:
    """The ARK's CRL from an AMD KDS for this report's product line (from the ARK / ASK names given) and
    signing key (VCEK or VLEK chain), cached under data_home()/amd-kds-cache until its nextUpdate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from teecloud.attestation import snp
    from teecloud.attestation.verifier import split_certificates
    from teecloud.collateral import AmdKdsClient

    key = "vlek" if snp.parse_snp_report(report).signing_key == snp.SIGNING_KEY_VLEK else "vcek"
    product = ""
    for der in split_certificates(certs) if certs else []:
        cns = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        if cn.startswith("ARK-"):
            product = cn.removeprefix("ARK-")
            break
    if not product:
        raise _Usage("--amd-kds-url needs the AMD ARK certificate (--trust-anchor or the trust directory)")
    return AmdKdsClient(data_home() / "amd-kds-cache", base_url=url).crl(product, key=key, now=now)


@trust_app.command("fetch")
def trust_fetch(
    url_base: Annotated[
        str | None, typer.Option("--url-base", help="Fetch the vendor paths from this server (a mirror).")
    ] = None,
    dest: Annotated[
        Path | None, typer.Option("--dest", help="Directory (default: data_home()/trust).")
    ] = None,
) -> None:
    """Download the vendor roots (AMD ARK/ASK, AWS Nitro, NVIDIA, Intel) into the trust directory."""
    from teecloud.collateral import fetch_trust_anchors

    fetched, errors = fetch_trust_anchors(dest, url_base=url_base)
    out = Console()
    for a in fetched:
        out.print(f"[green]saved[/] {a.path}  from {a.url}", highlight=False)
        for subject, fp in zip(a.subjects, a.sha256, strict=True):
            out.print(f"    {subject}\n    sha256 {fp}", highlight=False)
    for e in errors:
        _err.print(f"[red]failed[/] {e}", highlight=False)
    out.print("Compare the fingerprints with the vendors' published ones before relying on them.")
    raise typer.Exit(0 if not errors else 1)


@trust_app.command("list")
def trust_list(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the certificates in the trust directory."""
    import json

    from cryptography import x509

    from teecloud.collateral import default_trust_dir, load_trust_directory

    files = load_trust_directory()
    rows: list[dict[str, object]] = []
    for path, blob in files:
        try:
            certs = (
                x509.load_pem_x509_certificates(blob)
                if b"BEGIN CERTIFICATE" in blob
                else [x509.load_der_x509_certificate(blob)]
            )
            rows.append({"file": path.name, "subjects": [c.subject.rfc4514_string() for c in certs]})
        except (ValueError, x509.InvalidVersion) as exc:
            rows.append({"file": path.name, "error": f"unreadable: {exc}"})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not files:
        Console().print(f"no trust anchors in {default_trust_dir()} (run `teecloud trust fetch`)")
        return
    for row in rows:
        names = ", ".join(row["subjects"]) if "subjects" in row else f"[red]{row['error']}[/]"  # type: ignore[arg-type]
        Console().print(f"{row['file']}: {names}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_command)
    app.add_typer(trust_app, name="trust")
