"""Where a CVM's keys come from. In production the KMS client implements `KeyProvider`; for local app
development `LocalDevKeyProvider` keeps root keys in a file on this machine — NOT protected by any TEE,
and reported as such in key_provider_info (and so measured into RTMR3 as the `key-provider` event).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from teecloud._fs import atomic_write, data_home
from teecloud.errors import Error
from teecloud.keys.appkeys import AppKeys, RootKeys, derive_app_keys
from teecloud.keys.errors import KeysError
from teecloud.tee.base import TeePlatform

__all__ = ["DEV_PROVIDER_NAME", "KeyProvider", "KeyProviderError", "LocalDevKeyProvider"]

log = logging.getLogger(__name__)

DEV_PROVIDER_NAME = "local-dev (INSECURE: no KMS)"
_ROOT_FILE = "root-keys.pem"


class KeyProviderError(Error):
    """The key provider could not produce keys (unreachable KMS, refused, corrupt local state)."""


@runtime_checkable
class KeyProvider(Protocol):
    """Hands a booting CVM its AppKeys. `info()` is dstack's key_provider_info: {"name", "id"}.
    `boot_nonce()` is called once per boot, before `boot-mr-done`: what it returns is measured into RTMR3 as
    the `boot-nonce` event and binds this boot's key requests to this boot (a KMS's challenges; empty for a
    provider that needs none)."""

    @property
    def name(self) -> str: ...

    def boot_nonce(self) -> bytes: ...

    def get_app_keys(self, tee: TeePlatform, app_id: bytes, instance_id: bytes) -> AppKeys: ...

    def info(self) -> dict[str, Any]: ...


class LocalDevKeyProvider:
    """Root keys under `<home>/dev-key-provider/root-keys.pem` (created once, atomically, mode 0600; never
    overwritten). Anyone with access to this machine's data directory can read every app's keys."""

    name = DEV_PROVIDER_NAME

    def __init__(self, home: Path | None = None) -> None:
        self._dir = (Path(home) if home is not None else data_home()) / "dev-key-provider"
        self._root = self._load_or_create()
        log.warning("using the local development key provider: keys are NOT protected by a KMS or a TEE")

    @property
    def root_keys_path(self) -> Path:
        return self._dir / _ROOT_FILE

    @property
    def root(self) -> RootKeys:
        return self._root

    def _load_or_create(self) -> RootKeys:
        path = self.root_keys_path
        if not path.exists():
            # Create-if-absent without a race: write a temp file atomically, then hard-link it into place
            # (link fails if another process won); either way everybody then reads the same file.
            tmp = self._dir / f".{_ROOT_FILE}.{os.getpid()}.new"
            atomic_write(tmp, RootKeys.generate().to_pem())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        try:
            return RootKeys.from_pem(path.read_bytes())
        except (OSError, KeysError) as exc:
            raise KeyProviderError(
                f"dev key provider root keys at {path} are unreadable or corrupt ({exc}); "
                "they are never regenerated silently — move the file away to start over"
            ) from exc

    def boot_nonce(self) -> bytes:
        return b""  # no KMS to bind a request to

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "id": self._root.ca_public_key_der.hex()}

    def get_app_keys(self, tee: TeePlatform, app_id: bytes, instance_id: bytes) -> AppKeys:
        os_image_hash = tee.os_image_hash
        return derive_app_keys(
            self._root,
            app_id,
            instance_id,
            now=int(time.time()),
            key_provider_info=self.info(),
            os_image_hash=os_image_hash if isinstance(os_image_hash, bytes) else b"",
        )
