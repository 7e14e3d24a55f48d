"""Where a signer key comes from: a key file (hex text or an eth keystore) or $TEECLOUD_CHAIN_KEY.
The key itself is never printed, logged or put in an error message."""

from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account

from .errors import ChainError

__all__ = ["KEY_ENV", "PASSWORD_ENV", "load_signer_key"]

KEY_ENV = "TEECLOUD_CHAIN_KEY"
PASSWORD_ENV = "TEECLOUD_CHAIN_KEY_PASSWORD"  # noqa: S105 (the name of a variable, not a password)


def load_signer_key(key_file: Path | str | None = None) -> str | None:
    """The signer's private key (0x hex) from a key file (hex text, or an eth keystore JSON with the
    password in TEECLOUD_CHAIN_KEY_PASSWORD) or from $TEECLOUD_CHAIN_KEY; None when neither is given."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ChainError(f"cannot read key file {path}: {exc.strerror}") from None
        if text.startswith("{"):
            password = os.environ.get(PASSWORD_ENV, "")
            try:
                return "0x" + bytes(Account.decrypt(json.loads(text), password)).hex()
            except Exception:
                raise ChainError(f"cannot decrypt keystore {path} ({PASSWORD_ENV}?)") from None
        return _check_key(text, str(path))
    env = os.environ.get(KEY_ENV)
    if env:
        return _check_key(env.strip(), f"${KEY_ENV}")
    return None


def _check_key(text: str, where: str) -> str:
    hexpart = text.removeprefix("0x")
    if len(hexpart) != 64:
        raise ChainError(f"{where} does not hold a 32-byte hex private key")  # the key itself is never shown
    try:
        bytes.fromhex(hexpart)
    except ValueError:
        raise ChainError(f"{where} does not hold a 32-byte hex private key") from None
    return "0x" + hexpart.lower()
