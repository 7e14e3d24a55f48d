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
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from teecloud._fs import atomic_write
from teecloud.kms.errors import AccessDenied

__all__ = ["MAX_TOKENS", "TOKEN_SIZE", "BootChallenges", "FirstUseLedger"]

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
            _, uses = self._uses.get(token, (issued_at, 0))
            if uses >= self.max_uses:
                raise AccessDenied(
                    f"this boot has already made {uses} key requests (at most {self.max_uses})",
                    step="boot_nonce",
                )
            if token not in self._uses and len(self._uses) >= self._max_entries:
                # Expired tokens are refused above before they are looked up, so they are dropped only
                # when their room is needed (not scanned on every request).
                for old in [t for t, (at, _) in self._uses.items() if now - at > self.window_s]:
                    del self._uses[old]
                if len(self._uses) >= self._max_entries:
                    raise AccessDenied("too many boots in progress; retry shortly", step="boot_nonce")
            self._uses[token] = (issued_at, uses + 1)


class FirstUseLedger:
    """What binds KMS onboarding (GetKmsKey) to one boot, where a boot-nonce cannot: KmsAuth pins a KMS
    build's whole measurement, which a per-boot value in RTMR3 would change (docs/threat-model.md). The
    onboarding request's report_data binds the new KMS's fresh RA-TLS key; this ledger remembers when each
    binding was first used and refuses it after `window_s` or `max_uses`, so a captured boot-time onboarding
    quote and key are useless later. Kept in a file (atomic replace) so a restart of this KMS does not
    forget; bounded to `max_entries` (a full ledger refuses new onboardings with a reason: onboardings are
    rare). A file that does not parse refuses every onboarding (fail closed) rather than starting afresh."""

    def __init__(
        self,
        path: Path | None,
        *,
        window_s: int = 600,
        max_uses: int = 4,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.window_s = window_s
        self.max_uses = max_uses
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._broken = ""
        self._seen: dict[str, list[int]] = {}  # hex(sha256(binding)) -> [first_seen, uses]
        if path is not None and path.exists():
            try:
                doc = json.loads(path.read_bytes())
                if not isinstance(doc, dict) or not all(
                    isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)
                    for v in doc.values()
                ):
                    raise ValueError("not a map of [first_seen, uses]")
                self._seen = {str(k): [int(v[0]), int(v[1])] for k, v in doc.items()}
            except (OSError, ValueError) as exc:
                self._broken = f"the onboarding ledger {path.name} is unreadable ({exc}); refusing onboarding"

    def redeem(self, binding: bytes) -> None:
        """Count one onboarding request for `binding` (the quote's report_data). Raises AccessDenied (step
        `boot_nonce`) when it was first used too long ago, too often, or the ledger cannot be trusted."""
        if self._broken:
            raise AccessDenied(self._broken, step="boot_nonce")
        key = hashlib.sha256(bytes(binding)).hexdigest()
        now = int(self._clock())
        with self._lock:
            first, uses = self._seen.get(key, [now, 0])
            if now - first > self.window_s:
                raise AccessDenied(
                    f"this onboarding evidence was first used {now - first} s ago; a KMS boot has "
                    f"{self.window_s} s to onboard (a captured onboarding quote is never enough)",
                    step="boot_nonce",
                )
            if uses >= self.max_uses:
                raise AccessDenied(
                    f"this onboarding evidence was already used {uses} times (at most {self.max_uses})",
                    step="boot_nonce",
                )
            if key not in self._seen and len(self._seen) >= self._max_entries:
                raise AccessDenied("the onboarding ledger is full; refusing onboarding", step="boot_nonce")
            self._seen[key] = [first, uses + 1]
            if self.path is not None:
                atomic_write(self.path, json.dumps(self._seen, sort_keys=True).encode())
