"""Boot challenges: what binds a key request to one boot.

A booting CVM asks each KMS node for a challenge (`GET /prpc/KMS.GetBootChallenge`, public) and measures
them into RTMR3 as the `boot-nonce` event before `boot-mr-done` (teecloud.attestation.boottime). A KMS
releases keys only for a boot-nonce that holds one of its own challenges, issued at most `window_s` ago, and
for at most `max_uses` requests. So a genuine boot-time quote captured or leaked once is useless once the
window has passed, and a restarted CVM (a new boot) has a new nonce: the old quote's keys are not released
again.

Token (65 bytes; a boot-nonce payload is 1..MAX_TOKENS tokens concatenated, one per KMS node):

    version (1) = 0x01 ‖ node tag (8) ‖ issued_at (8, big-endian Unix seconds) ‖ random (16) ‖
    HMAC-SHA256(node secret, the 33 bytes before it) (32)

The node secret is random per KMS process and never leaves it: a restart of the KMS also voids every
outstanding challenge (a booting CVM then fails and is re-booted). Issuing costs an HMAC and keeps no state;
state (use counts) is kept only for challenges that passed the whole attestation, and only for the window.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable

from teecloud.kms.errors import AccessDenied

__all__ = ["MAX_TOKENS", "TOKEN_SIZE", "BootChallenges"]

_VERSION = b"\x01"
TOKEN_SIZE = 65
MAX_TOKENS = 16
_SIGNED = 33


class BootChallenges:
    def __init__(
        self,
        *,
        window_s: int = 600,
        max_uses: int = 8,
        max_entries: int = 65536,
        clock: Callable[[], float] = time.time,
        secret: bytes | None = None,
    ) -> None:
        self._secret = secret if secret is not None else os.urandom(32)
        self.tag = hashlib.sha256(b"teecloud-boot-challenge-tag:" + self._secret).digest()[:8]
        self.window_s = window_s
        self.max_uses = max_uses
        self._max_entries = max_entries
        self._clock = clock
        self._uses: dict[bytes, tuple[int, int]] = {}  # token -> (issued_at, uses)
        self._lock = threading.Lock()

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._secret, signed, hashlib.sha256).digest()

    def issue(self) -> bytes:
        signed = _VERSION + self.tag + int(self._clock()).to_bytes(8, "big") + os.urandom(16)
        return signed + self._mac(signed)

    def redeem(self, boot_nonce: bytes | None) -> None:
        """Count one key request against this node's challenge in `boot_nonce`. Raises AccessDenied (step
        `boot_nonce`) when it holds none, or a forged, expired or used-up one."""
        if not boot_nonce:
            raise AccessDenied(
                "the boot measurement has no boot-nonce: keys are released only to a boot that measured a "
                "fresh challenge of this KMS (a quote from another boot must not release them)",
                step="boot_nonce",
            )
        if len(boot_nonce) % TOKEN_SIZE or not 1 <= len(boot_nonce) // TOKEN_SIZE <= MAX_TOKENS:
            raise AccessDenied(
                f"the boot-nonce is {len(boot_nonce)} bytes, not 1..{MAX_TOKENS} challenges of "
                f"{TOKEN_SIZE} bytes",
                step="boot_nonce",
            )
        tokens = [boot_nonce[i : i + TOKEN_SIZE] for i in range(0, len(boot_nonce), TOKEN_SIZE)]
        mine = [t for t in tokens if t[:1] == _VERSION and t[1:9] == self.tag]
        if len(mine) != 1:
            raise AccessDenied(
                "the boot-nonce holds no challenge of this KMS (issued by another KMS, or by this one before "
                "it restarted)"
                if not mine
                else "the boot-nonce holds more than one challenge of this KMS",
                step="boot_nonce",
            )
        token = mine[0]
        if not hmac.compare_digest(self._mac(token[:_SIGNED]), token[_SIGNED:]):
            raise AccessDenied("the boot-nonce's challenge was not issued by this KMS", step="boot_nonce")
        issued_at = int.from_bytes(token[9:17], "big")
        now = int(self._clock())
        if now - issued_at > self.window_s:
            raise AccessDenied(
                f"the boot-nonce's challenge was issued {now - issued_at} s ago; a boot has "
                f"{self.window_s} s to ask for its keys (a quote from an earlier boot is never enough)",
                step="boot_nonce",
            )
        with self._lock:
            for old in [t for t, (at, _) in self._uses.items() if now - at > self.window_s]:
                del self._uses[old]
            _, uses = self._uses.get(token, (issued_at, 0))
            if uses >= self.max_uses:
                raise AccessDenied(
                    f"this boot has already made {uses} key requests (at most {self.max_uses})",
                    step="boot_nonce",
                )
            if token not in self._uses and len(self._uses) >= self._max_entries:
                raise AccessDenied("too many boots in progress; retry shortly", step="boot_nonce")
            self._uses[token] = (issued_at, uses + 1)
