"""`teecloud agent`: run the guest agent locally for app development (simulated TEE, dev key provider)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(
    name="agent",
    help="The guest agent (dstack-compatible API on /var/run/dstack.sock).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)
_out = Console()


def _fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _agent() -> None:
    """The guest agent (dstack-compatible API on /var/run/dstack.sock)."""


@app.command("simulate")
def simulate(
    compose: Annotated[Path, typer.Option("--compose", "-c", help="app-compose.json to measure and serve.")],
    socket: Annotated[
        Path, typer.Option("--socket", help="dstack API socket (point DSTACK_SIMULATOR_ENDPOINT here).")
    ] = Path("./dstack.sock"),
    tappd_socket: Annotated[
        Path | None, typer.Option("--tappd-socket", help="Also serve the legacy tappd API on this socket.")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Also serve the dstack API on http://127.0.0.1:PORT.")
    ] = None,
    app_id: Annotated[
        str | None, typer.Option("--app-id", help="Hex app id (default: compose_hash[:20]).")
    ] = None,
) -> None:
    """Boot a simulated CVM for COMPOSE and serve its guest agent until Ctrl-C.

    The TEE is simulated (quotes under this machine's development root) and keys come from the local dev
    key provider — nothing here is protected; use it to develop apps, never for secrets."""
    import json

    from teecloud.agent import BootError, KeyProviderError, LocalDevKeyProvider, boot, serve_agent
    from teecloud.tee.errors import TeeError
    from teecloud.tee.simulated import SimulatedTdx

    try:
        text = compose.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {compose}: {exc}")
    aid: bytes | None = None
    if app_id:
        from teecloud.ids import HexError, parse_hex

        try:
            aid = parse_hex(app_id, name="--app-id")
        except HexError as exc:
            _fail(str(exc), 2)
    if port is not None and not 0 <= port <= 65535:
        _fail("--port must be 0..65535", 2)
    try:
        tee = SimulatedTdx()
        state = boot(tee, text, aid, None, LocalDevKeyProvider())
    except (BootError, KeyProviderError, TeeError, ValueError) as exc:
        _fail(str(exc))

    def ready(runner: object) -> None:
        from teecloud.agent.runner import AgentRunner

        assert isinstance(runner, AgentRunner)
        _out.print(
            f"[bold]teecloud guest agent[/] for app [cyan]{state.app_id.hex()}[/] "
            f"(compose_hash {state.compose_hash.hex()})",
            highlight=False,
        )
        _out.print("[yellow]simulated TEE + local dev key provider: INSECURE, for development only[/]")
        for line in runner.listening_on():
            _out.print(f"  listening: {line}", highlight=False)
        first = runner.dstack_sock or f"http://127.0.0.1:{runner.bound_port}"
        _out.print(f"  export DSTACK_SIMULATOR_ENDPOINT={first}", highlight=False)
        _out.print(f"  key_provider_info: {json.dumps(state.keys.key_provider_info)}", highlight=False)

    try:
        serve_agent(
            state, socket.absolute(), tappd_socket.absolute() if tappd_socket else None, port, on_ready=ready
        )
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(f"cannot serve the agent: {exc}")
