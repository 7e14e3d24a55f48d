"""What the chain command groups (`chain`, `app`, `node`, `escrow`) share: the --rpc-url/--key-file options,
the chain client they open, argument parsing, error reporting and output formatting.

The public development key is the default signer on the embedded chain of data_home() only; any other
--rpc-url needs --key-file or $TEECLOUD_CHAIN_KEY for a command that sends a transaction. Keys are never
printed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from teecloud import ids
from teecloud.errors import Error

if TYPE_CHECKING:
    from teecloud.chain import ChainClient
    from teecloud.chain.api import DeploymentEscrow

__all__ = [
    "DepId",
    "JsonOpt",
    "NodeId",
    "client",
    "err",
    "fmt_wei",
    "friendly",
    "group",
    "out",
    "parse_amount",
    "parse_hash",
    "print_json",
    "when",
]

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

RpcOpt = typer.Option(
    None, "--rpc-url", envvar="TEECLOUD_RPC_URL", help="Ethereum JSON-RPC URL (default: embedded)"
)
KeyOpt = typer.Option(None, "--key-file", help="signer key file (hex or keystore); else $TEECLOUD_CHAIN_KEY")
NodeId = typer.Argument(..., min=0, help="node id (from `node register`)")
DepId = typer.Argument(..., min=0, help="deployment id (from `escrow open`)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def group(help: str) -> typer.Typer:
    """A command group whose callback takes --rpc-url and --key-file."""
    t = typer.Typer(help=help, no_args_is_help=True)

    @t.callback()
    def _options(ctx: typer.Context, rpc_url: str | None = RpcOpt, key_file: Path | None = KeyOpt) -> None:
        ctx.ensure_object(dict)
        ctx.obj["rpc_url"] = rpc_url
        ctx.obj["key_file"] = key_file

    return t


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def friendly(fn: F) -> F:
    """Clear message and exit 1 for every expected failure; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eth_abi.exceptions import EncodingError

        from teecloud.chain import ChainError, InsufficientFunds

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except InsufficientFunds as exc:
            _fail(_insufficient(exc, [*args, *kwargs.values()]))
        except ChainError as exc:
            _fail(exc.diagnostics())
        except EncodingError:  # a value the contract's ABI cannot carry (e.g. a number above 2**256)
            _fail("a number is out of range for the contract (at most 2**256 - 1)")
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        except Error as exc:  # any other error teecloud raises on purpose (cloud, node, keys, ...)
            _fail(exc.diagnostics())

    return wrapper  # type: ignore[return-value]


def _insufficient(exc: Exception, args: list[Any]) -> str:
    """'insufficient funds' with the signer's address and balance (never its key)."""
    # the command's context (Typer hands over its click context class, so match it by shape)
    obj: dict[str, Any] = next((a.obj for a in args if isinstance(getattr(a, "obj", None), dict)), {})
    c = obj.get("client")
    if c is not None and c.address:
        try:
            balance = c.balance(c.address)
        except Exception:  # the chain went away while reporting: the plain message is enough
            balance = None
        have = f" (balance {fmt_wei(balance)})" if balance is not None else ""
        return f"insufficient funds: {c.address}{have} cannot pay for the gas and the value sent"
    return f"insufficient funds: {exc}"


def client(ctx: typer.Context) -> ChainClient:
    """The chain the command talks to (see the module docstring for the default signer)."""
    from teecloud._fs import data_home
    from teecloud.chain import ChainClient, load_signer_key
    from teecloud.chain.client import running_rpc_url

    obj = ctx.find_root().obj or {}
    for c in (ctx, ctx.parent):
        if c is not None and isinstance(c.obj, dict):
            obj = c.obj
    key = load_signer_key(obj.get("key_file"))
    url = obj.get("rpc_url")
    embedded_url = running_rpc_url(data_home())
    if url and (embedded_url is None or url.rstrip("/") != embedded_url.rstrip("/")):
        chain = ChainClient.rpc(url, key)
    else:
        chain = ChainClient.embedded(None, key)
    if isinstance(ctx.obj, dict):
        ctx.obj["client"] = chain  # for error reports (balance on insufficient funds)
    return chain


def parse_hash(text: str, what: str = "hash") -> bytes:
    return ids.parse_hash(text, name=what)


def parse_address(text: str, what: str) -> str:
    from eth_utils.address import is_address, to_checksum_address

    if not is_address(text.strip()):
        raise ValueError(f"{what} must be 20 bytes of hex (40 hex digits)")
    return str(to_checksum_address(text.strip()))


_UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18, "ether": 10**18}


def parse_amount(text: str) -> int:
    """'1000' (wei), '1.5eth', '20gwei'."""
    from decimal import Decimal, InvalidOperation

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in ({""} | set(_UNITS)):
        raise ValueError(f"not an amount: {text!r} (e.g. 1000, 20gwei, 0.5eth)")
    try:
        value = Decimal(m.group(1)) * _UNITS.get(m.group(2).lower() or "wei", 1)
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of wei")
    if value >= 2**256:
        raise ValueError(f"{text!r} is more than an EVM amount can hold (2**256 wei)")
    return int(value)


def print_json(obj: Any) -> None:
    def conv(v: Any) -> Any:
        if isinstance(v, bytes):
            return "0x" + v.hex()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return conv(dataclasses.asdict(v))
        return v

    sys.stdout.write(json.dumps(conv(obj), indent=2) + "\n")


def fmt_wei(wei: int) -> str:
    from decimal import Decimal

    if wei == 0:
        return "0 wei"
    eth = format((Decimal(wei) / Decimal(10**18)).normalize(), "f")
    return f"{wei} wei ({eth} ETH)"


def when(ts: int, now: int) -> str:
    if ts <= now:
        return f"unix time {ts} (passed)"
    return f"unix time {ts} (in {ts - now} s)"


def deployments_lines(rows: list[DeploymentEscrow], now: int) -> None:
    # plain lines, not a table: addresses must stay whole so they can be copied
    if not rows:
        out.print("no deployments")
    for d in rows:
        out.print(
            f"deployment {d.deployment_id}  node {d.node_id}  {d.state(now)}  "
            f"escrow {d.balance} wei  price {d.price_per_hour} wei/h  served {d.served_seconds} s  "
            f"paid {d.paid} wei  user {d.user}",
            highlight=False,
        )
