"""`teecloud tee`: produce evidence on this machine (real TEE or the simulated TDX platform).

With the simulated platform, each command is a fresh process, so the simulated CVM's runtime events are
kept in `data_home()/simulated-tee/cli-cvm.json` (written atomically under a lock) and replayed into a new
SimulatedTdx on every invocation; `teecloud tee reset` starts the CVM afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from teecloud._fs import atomic_write, atomic_write_json
from teecloud.tee import (
    SevSnpPlatform,
    SimulatedTdx,
    TdxPlatform,
    TeeError,
    TeePlatform,
    TeeUsageError,
    detect,
)

__all__ = ["app"]

app = typer.Typer(
    name="tee",
    help="Produce TEE evidence here: quotes, runtime events, the simulated platform's dev root.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)

CLI_STATE_FILE = "cli-cvm.json"
MAX_REPORT_DATA = 64


def _fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _parse_hex(value: str, what: str, max_bytes: int | None = None) -> bytes:
    text = value.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        data = bytes.fromhex(text)
    except ValueError:
        _fail(f"{what} must be hex (e.g. 'deadbeef'), got {value!r}", 2)
    if max_bytes is not None and len(data) > max_bytes:
        _fail(f"{what} is at most {max_bytes} bytes, got {len(data)}", 2)
    return data


def _state_path(tee: SimulatedTdx) -> Path:
    return tee.state_dir / CLI_STATE_FILE


@contextlib.contextmanager
def _locked(tee: SimulatedTdx) -> Iterator[None]:
    lock = tee.state_dir / "cli-cvm.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_cli_events(tee: SimulatedTdx) -> list[dict[str, str]]:
    path = _state_path(tee)
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
        events = doc["events"]
        if doc.get("os_image") != tee.os_image:
            _fail(
                f"{path} belongs to a simulated CVM running {doc.get('os_image')!r}, not {tee.os_image!r}; "
                f"run `teecloud tee reset` to start a new one"
            )
        for e in events:
            tee.emit_event(str(e["event"]), bytes.fromhex(e["payload"]))
    except (ValueError, KeyError, TypeError) as exc:
        _fail(f"{path} is corrupt ({exc}); run `teecloud tee reset` to start a new simulated CVM")
    return list(events)


def _select(kind: str | None) -> TeePlatform:
    """--tee KIND, else detect() (which honours $TEECLOUD_TEE)."""
    try:
        if kind is None:
            return detect()
        if kind == "simulated":
            return SimulatedTdx()
        if kind == "tdx":
            return TdxPlatform()
        if kind == "sev_snp":
            return SevSnpPlatform()
    except TeeError as exc:
        _fail(str(exc), 2 if isinstance(exc, TeeUsageError) else 1)
    _fail(f"--tee must be simulated, tdx or sev_snp, not {kind!r}", 2)


def _open_tee(kind: str | None) -> TeePlatform:
    tee = _select(kind)
    if isinstance(tee, SimulatedTdx):
        with _locked(tee):
            _load_cli_events(tee)
    return tee


TeeOption = Annotated[
    str | None,
    typer.Option("--tee", help="simulated | tdx | sev_snp (default: $TEECLOUD_TEE, else detected)"),
]


@app.command("quote")
def quote_cmd(
    report_data: Annotated[str, typer.Option("--report-data", help="hex, at most 64 bytes (zero-padded)")],
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON here instead of stdout")] = None,
    tee_kind: TeeOption = None,
) -> None:
    """Get a quote binding REPORT_DATA; prints dstack-style JSON: quote, event_log, report_data, vm_config."""
    rd = _parse_hex(report_data, "--report-data", MAX_REPORT_DATA)
    tee = _open_tee(tee_kind)
    try:
        quote = tee.quote(rd)
        log = [e.to_json() for e in tee.event_log()]
    except TeeError as exc:
        _fail(str(exc))
    vm_config: dict[str, Any] = tee.vm_config() if isinstance(tee, SimulatedTdx) else {}
    doc = {
        "quote": quote.hex(),
        "event_log": json.dumps(log, separators=(",", ":")),
        "report_data": rd.ljust(64, b"\x00").hex(),
        "vm_config": json.dumps(vm_config, separators=(",", ":")),
    }
    if out is not None:
        try:
            atomic_write(out, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)
        except OSError as exc:
            _fail(f"cannot write {out}: {exc.strerror or exc}", 2)
        _err.print(f"wrote {out} ({tee.kind} quote, {len(quote)} bytes)", highlight=False)
    else:
        typer.echo(json.dumps(doc, indent=2))


@app.command("emit-event")
def emit_event_cmd(
    name: Annotated[str, typer.Argument(help="event name (no ':')")],
    payload_hex: Annotated[str, typer.Argument(help="payload as hex ('' for none)")],
    tee_kind: TeeOption = None,
) -> None:
    """Measure a runtime event into RTMR3 and append it to the event log."""
    payload = _parse_hex(payload_hex, "PAYLOAD_HEX")
    tee = _select(tee_kind)
    try:
        if isinstance(tee, SimulatedTdx):
            with _locked(tee):
                events = _load_cli_events(tee)
                tee.emit_event(name, payload)
                events.append({"event": name, "payload": payload.hex()})
                atomic_write_json(
                    _state_path(tee), {"version": 1, "os_image": tee.os_image, "events": events}
                )
        else:
            tee.emit_event(name, payload)
    except TeeUsageError as exc:
        _fail(str(exc), 2)
    except TeeError as exc:
        _fail(str(exc))
    typer.echo(f"rtmr3 = {tee.measurements()['rtmr3'].hex()}")


@app.command("reset")
def reset_cmd() -> None:
    """Forget the simulated CVM's runtime events (RTMR3 back to zero). The dev root is kept."""
    tee = SimulatedTdx()
    with _locked(tee):
        _state_path(tee).unlink(missing_ok=True)
    typer.echo("simulated CVM reset: RTMR3 is zero, no runtime events")


@app.command("info")
def info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    tee_kind: TeeOption = None,
) -> None:
    """Show which TEE this is and its current measurements."""
    tee = _open_tee(tee_kind)
    try:
        measurements = {k: v.hex() for k, v in tee.measurements().items()}
        events = len(tee.event_log())
    except TeeError as exc:
        _fail(str(exc))
    info: dict[str, Any] = {"kind": tee.kind, "measurements": measurements, "event_log_entries": events}
    if isinstance(tee, SimulatedTdx):
        root = tee.dev_root_der()
        info.update(
            {
                "state_dir": str(tee.state_dir),
                "dev_root_sha256": hashlib.sha256(root).hexdigest(),
                "fmspc": tee.fmspc,
                "device_id": tee.device_id.hex(),
                "os_image": tee.os_image,
                "os_image_hash": tee.os_image_hash.hex(),
                "vm_config": tee.vm_config(),
                "warning": "simulated TEE: quotes are signed by a local development root, not by Intel",
            }
        )
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for k, v in value.items():
                typer.echo(f"  {k}: {v}")
        else:
            typer.echo(f"{key}: {value}")


@app.command("dev-root")
def dev_root_cmd(
    export: Annotated[
        Path, typer.Option("--export", help="directory to write root_ca.der + collateral.json")
    ],
) -> None:
    """Export the simulated platform's dev root CA and current collateral (QuoteCollateralV3 JSON), e.g. for
    `dcap_qvl.verify_with_root_ca` or `teecloud verify --trust-dev-root`."""
    try:
        tee = SimulatedTdx()
        collateral = tee.collateral()
    except TeeError as exc:
        _fail(str(exc))
    try:
        if export.exists() and not export.is_dir():
            _fail(f"{export} exists and is not a directory", 2)
        atomic_write(export / "root_ca.der", tee.dev_root_der(), mode=0o644)
        atomic_write(export / "collateral.json", collateral, mode=0o644)
    except OSError as exc:
        _fail(f"cannot write to {export}: {exc.strerror or exc}", 2)
    typer.echo(f"wrote {export / 'root_ca.der'} (sha256 {hashlib.sha256(tee.dev_root_der()).hexdigest()})")
    typer.echo(f"wrote {export / 'collateral.json'} (FMSPC {tee.fmspc})")


@app.callback()
def _tee_root() -> None:
    """Produce TEE evidence here: quotes, runtime events, the simulated platform's dev root."""
