"""`teecloud` command line (Typer + Rich). Each command group lives in a module of its own.

Errors: every error teecloud raises on purpose derives from `teecloud.errors.Error`; the root command group
(`ErrorsToExit`) turns one that a command did not handle into "error: <diagnostics>" and exit status 1, so a
user never sees a traceback for it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer import _click as click  # typer 0.29 vendors click; its Context is the one commands get
from typer.core import TyperGroup

from teecloud.cli import (
    agent_cmd,
    ai_cmd,
    chain_cmd,
    cloud_cmd,
    fn_cmd,
    gateway_cmd,
    image_cmd,
    kms_cmd,
    tee_cmd,
    verify_cmd,
)
from teecloud.errors import Error

__all__ = ["ErrorsToExit", "app", "main"]


class ErrorsToExit(TyperGroup):
    """A command group that reports teecloud errors as one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Error as exc:
            click.echo(f"error: {exc.diagnostics()}", err=True)
            ctx.exit(1)


app = typer.Typer(
    name="teecloud",
    help="teecloud: run unchanged docker-compose apps in attested confidential VMs, governed on-chain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=ErrorsToExit,
)

verify_cmd.register(app)  # `teecloud verify`, `teecloud trust ...`
app.add_typer(tee_cmd.app, name="tee")
app.add_typer(agent_cmd.app, name="agent")
chain_cmd.register(app)  # `teecloud chain ...`, `teecloud app ...`, `teecloud node ...`
app.add_typer(kms_cmd.app, name="kms")
app.add_typer(ai_cmd.app, name="ai")  # --- confidential AI
cloud_cmd.register(app)  # `teecloud up`, `deploy`, `ps`, `logs`, ...
app.add_typer(fn_cmd.app, name="fn")  # `teecloud fn ...` (docs/functions.md)
app.add_typer(gateway_cmd.app, name="gateway")  # `teecloud gateway check-cert` (docs/gateway.md)
app.add_typer(image_cmd.app, name="image")  # `teecloud image measure` (docs/node.md, qemu backend)


@app.callback()
def _root() -> None:
    """teecloud: run unchanged docker-compose apps in attested confidential VMs, governed on-chain."""


@app.command("version")
def version() -> None:
    """Print teecloud's version."""
    from teecloud import __version__

    typer.echo(__version__)


def main() -> None:
    sys.exit(app())
