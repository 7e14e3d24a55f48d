"""`teecloud` command line (Typer + Rich). Each command group lives in a module of its own."""

from __future__ import annotations

import importlib
import sys

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="teecloud",
    help="teecloud: run unchanged docker-compose apps in attested confidential VMs, governed on-chain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (module, attribute) pairs; a module registers commands on `app` or exposes a Typer sub-app.
_GROUPS: list[tuple[str, str | None, str | None]] = [
    ("teecloud.cli.verify_cmd", None, None),  # `teecloud verify`, `teecloud trust ...`
    ("teecloud.cli.tee_cmd", "app", "tee"),
    ("teecloud.cli.agent_cmd", "app", "agent"),
    ("teecloud.cli.chain_cmd", None, None),  # `teecloud chain ...`, `teecloud app ...`, `teecloud node ...`
    ("teecloud.cli.kms_cmd", "app", "kms"),
    ("teecloud.cli.cloud_cmd", None, None),  # `teecloud up`, `deploy`, `ps`, `logs`, ...
]


def _register() -> None:
    for module_name, attr, name in _GROUPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # group not built yet
            raise
        if attr is not None:
            app.add_typer(getattr(module, attr), name=name)
        elif hasattr(module, "register"):
            module.register(app)


@app.callback()
def _root() -> None:
    """teecloud: run unchanged docker-compose apps in attested confidential VMs, governed on-chain."""


_register()


@app.command("version")
def version() -> None:
    """Print teecloud's version."""
    from teecloud import __version__

    typer.echo(__version__)


def main() -> None:
    sys.exit(app())
