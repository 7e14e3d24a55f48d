"""Authorization: turn verified evidence into dstack's `boot_info` and ask the chain, failing closed.

    require_boot_time(evidence)       the RTMR3 log ends at the boot measurement (keys only while booting)
    ChainAuthorizer.app_allowed(bi)   KmsAuth.isAppAllowed, cached for at most one block
    ChainAuthorizer.kms_allowed(bi)   KmsAuth.isKmsAllowed, same cache rule

Every failure to get a clear "yes" from the chain — unreachable RPC, revert, wrong chain, an unexpected
exception — is a denial (`AccessDenied(step="chain")`): the KMS never releases keys on a guess.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

from teecloud.attestation.models import VerifiedEvidence
from teecloud.chain.api import BootInfo
from teecloud.kms.errors import AccessDenied

__all__ = [
    "BOOT_MR_DONE_EVENT",
    "KMS_MODE_BOOT_EVENTS",
    "AuthChain",
    "ChainAuthorizer",
    "FreshBlockNumber",
    "boot_info_to_json",
    "require_boot_time",
]

BOOT_MR_DONE_EVENT = "boot-mr-done"
# What dstack measures after `boot-mr-done` and before it asks the KMS for keys, in KMS mode
# (reference/dstack.md §4 step 6; `mr-kms` is gone at dstack HEAD). Each at most once.
KMS_MODE_BOOT_EVENTS = frozenset({"mr-kms", "os-image-hash"})


class AuthChain(Protocol):
    """The part of teecloud.chain.ChainClient the KMS uses."""

    def is_app_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...

    def is_kms_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...


def require_boot_time(evidence: VerifiedEvidence) -> None:
    """Keys are released only to a CVM that is booting: its RTMR3 log must end at the boot measurement
    (`boot-mr-done`, then only the KMS-mode events). Any quote the CVM can produce later — after
    `key-provider`, `system-ready` or an app-emitted event — is refused, so a quote over caller-chosen
    report_data from a running app (GetQuote, an app's /quote route) can never carry a key request: the
    "quote oracle" (docs/threat-model.md). The guest asks for its keys before it extends `key-provider`,
    and nothing else runs in it before that point."""
    info = evidence.app_info
    if info is None:
        raise AccessDenied("the evidence carries no replayed event log (no app info)", step="boot_time")
    names = [name for name, _ in info.events]
    if BOOT_MR_DONE_EVENT not in names:
        raise AccessDenied(
            f"the event log has no '{BOOT_MR_DONE_EVENT}' event: the boot measurement is incomplete",
            step="boot_time",
        )
    after = names[names.index(BOOT_MR_DONE_EVENT) + 1 :]
    for i, name in enumerate(after):
        if name not in KMS_MODE_BOOT_EVENTS or name in after[:i]:
            raise AccessDenied(
                f"the event log goes on past the boot measurement ('{name[:64]}' after "
                f"'{BOOT_MR_DONE_EVENT}'): keys are released only while a CVM boots, never on a quote "
                "taken after it (its keys were fetched then; a later quote may bind anyone's key)",
                step="boot_time",
            )


def boot_info_to_json(boot_info: BootInfo) -> dict[str, Any]:
    """Hex strings for bytes; used in audit records and logs (contains no secrets)."""
    out: dict[str, Any] = {}
    for key, value in asdict(boot_info).items():
        if isinstance(value, bytes | bytearray):
            out[key] = bytes(value).hex()
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


class FreshBlockNumber:
    """The chain's block number, read at or after the moment of the call, shared by concurrent callers.

    A caller never gets a number read before it arrived: it waits for a read that *starts* after its arrival
    (the next one if one is already running), and every caller waiting at that moment shares it. So a
    change mined before a request arrived is always seen by that request, while under load one RPC read
    serves many requests instead of one each. A failed read fails every caller that shares it.
    """

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read
        self._cv = threading.Condition()
        self._started = 0  # reads started so far (numbered 1, 2, ...)
        self._running = False
        self._done_no = 0  # number of the last finished read
        self._done: int | BaseException = 0
        self.reads = 0

    def __call__(self) -> int:
        with self._cv:
            need = self._started + 1  # the first read that starts after now
            while self._done_no < need:
                if not self._running:
                    self._running = True
                    self._started += 1
                    mine = self._started
                    break
                self._cv.wait()
            else:
                return self._result(self._done)
        value: int | BaseException
        try:
            value = int(self._read())
        except Exception as exc:
            value = exc
        with self._cv:
            self._running = False
            self._done_no, self._done = mine, value
            self.reads += 1
            self._cv.notify_all()
        return self._result(value)

    @staticmethod
    def _result(value: int | BaseException) -> int:
        if isinstance(value, BaseException):
            raise value
        return value


class ChainAuthorizer:
    """Asks the chain, caching each answer for at most one block.

    `block_number` returns the chain's current block (read per request, shared by concurrent requests through
    `FreshBlockNumber`); an answer is reused only while the chain is at the block it was read at, so any
    on-chain change (which needs a new block) is seen by the next request. Without `block_number` nothing
    is cached.
    """

    def __init__(
        self,
        chain: AuthChain,
        *,
        block_number: Callable[[], int] | None = None,
        max_entries: int = 4096,
    ) -> None:
        self.chain = chain
        self._block_number = FreshBlockNumber(block_number) if block_number is not None else None
        self._max = max_entries
        self._cache: OrderedDict[tuple[str, BootInfo], tuple[int, bool, str]] = OrderedDict()
        self._lock = threading.Lock()

    def app_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("app", boot_info)

    def kms_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("kms", boot_info)

    def _ask(self, kind: str, boot_info: BootInfo) -> str:
        """Returns the chain's reason when allowed; raises AccessDenied otherwise."""
        try:
            block = self._block_number() if self._block_number is not None else None
            cached = None
            if block is not None:
                with self._lock:
                    cached = self._cache.get((kind, boot_info))
            if cached is not None and cached[0] == block:
                ok, reason = cached[1], cached[2]
            else:
                fn = self.chain.is_app_allowed if kind == "app" else self.chain.is_kms_allowed
                ok, reason = fn(boot_info)
                if block is not None:
                    with self._lock:
                        self._cache[(kind, boot_info)] = (block, bool(ok), str(reason))
                        self._cache.move_to_end((kind, boot_info))
                        while len(self._cache) > self._max:
                            self._cache.popitem(last=False)
        except AccessDenied:
            raise
        except Exception as exc:  # fail closed on anything the chain client raises
            raise AccessDenied(
                f"cannot read the authorization from the chain ({type(exc).__name__}: {exc}); failing closed",
                step="chain",
            ) from exc
        if ok is not True:
            what = "app" if kind == "app" else "KMS"
            raise AccessDenied(f"KmsAuth refuses this {what}: {reason or 'no reason given'}", step="chain")
        return str(reason)
