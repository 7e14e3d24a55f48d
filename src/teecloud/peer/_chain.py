"""The chain gate: is this attested peer's code allowed on chain? One home for the KMS, the KMS client and
the gateway (none of them imports another's internals to ask).

    ChainGate.app_allowed(boot_info)   KmsAuth.isAppAllowed, cached for at most one block
    ChainGate.kms_allowed(boot_info)   KmsAuth.isKmsAllowed, same cache rule
    FreshBlockNumber                   the chain's block number read at or after the call, shared

Finality: with `finality_depth` d > 0 the gate says yes only when the chain allows at the head AND at every
one of the d blocks below it. So a permission counts once d blocks sit on top of the block that granted it
(a reorg shorter than d cannot authorize a release or a route, also after a removal and a re-grant inside
the window), while a removal counts at once (the head says no). A cache miss costs d + 1 reads, so d is at
most MAX_FINALITY_DEPTH.
The chain id is the reader's concern: pass `ChainConnection.checked_head` as `block_number` and every
fresh read first checks that the endpoint still serves the chain it was opened on.

Every failure to get a clear "yes" from the chain — unreachable RPC, revert, wrong chain, an unexpected
exception — is a refusal (`PeerRejected(step="chain")`): nothing is released or routed on a guess.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from teecloud.chain.api import BootInfo
from teecloud.peer._verifier import PeerRejected

__all__ = ["MAX_FINALITY_DEPTH", "AuthChain", "ChainGate", "FreshBlockNumber"]

MAX_FINALITY_DEPTH = 256  # blocks; a cache miss asks the chain at each of them


class AuthChain(Protocol):
    """The part of teecloud.chain.ChainClient the chain gate uses (`at`: ask at that block; only used with a
    finality depth)."""

    def is_app_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...

    def is_kms_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...


class AuthChainAt(AuthChain, Protocol):
    def is_app_allowed(self, boot_info: BootInfo, *, at: int | None = None) -> tuple[bool, str]: ...

    def is_kms_allowed(self, boot_info: BootInfo, *, at: int | None = None) -> tuple[bool, str]: ...


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


class ChainGate:
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
        finality_depth: int = 0,
    ) -> None:
        if type(finality_depth) is not int or not 0 <= finality_depth <= MAX_FINALITY_DEPTH:
            raise ValueError(f"finality depth must be 0..{MAX_FINALITY_DEPTH} blocks, not {finality_depth!r}")
        if finality_depth and block_number is None:
            raise ValueError("a finality depth needs the chain's block number (block_number=)")
        self.chain = chain
        self.finality_depth = finality_depth
        self._block_number = FreshBlockNumber(block_number) if block_number is not None else None
        self._max = max_entries
        self._cache: OrderedDict[tuple[str, BootInfo], tuple[int, bool, str]] = OrderedDict()
        self._lock = threading.Lock()

    def app_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("app", boot_info)

    def kms_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("kms", boot_info)

    def _ask(self, kind: str, boot_info: BootInfo) -> str:
        """Returns the chain's reason when allowed; raises PeerRejected(step="chain") otherwise."""
        try:
            block = self._block_number() if self._block_number is not None else None
            cached = None
            if block is not None:
                with self._lock:
                    cached = self._cache.get((kind, boot_info))
            if cached is not None and cached[0] == block:
                ok, reason = cached[1], cached[2]
            else:
                ok, reason = self._verdict(kind, boot_info, block)
                if block is not None:
                    with self._lock:
                        self._cache[(kind, boot_info)] = (block, bool(ok), str(reason))
                        self._cache.move_to_end((kind, boot_info))
                        while len(self._cache) > self._max:
                            self._cache.popitem(last=False)
        except PeerRejected:
            raise
        except Exception as exc:  # fail closed on anything the chain client raises
            raise PeerRejected(
                f"cannot read the authorization from the chain ({type(exc).__name__}: {exc}); failing closed",
                step="chain",
            ) from exc
        if ok is not True:
            what = "app" if kind == "app" else "KMS"
            raise PeerRejected(f"KmsAuth refuses this {what}: {reason or 'no reason given'}", step="chain")
        return str(reason)

    def _verdict(self, kind: str, boot_info: BootInfo, head: int | None) -> tuple[bool, str]:
        if not self.finality_depth:
            fn = self.chain.is_app_allowed if kind == "app" else self.chain.is_kms_allowed
            return fn(boot_info)
        assert head is not None  # the constructor requires block_number with a depth
        chain: AuthChainAt = self.chain  # type: ignore[assignment]
        ask = chain.is_app_allowed if kind == "app" else chain.is_kms_allowed
        depth = self.finality_depth
        if head < depth:
            return False, f"the chain is {head} blocks long, fewer than the finality depth {depth}"
        ok, reason = ask(boot_info, at=head)
        if ok is not True:
            return False, str(reason)
        for block in range(head - depth, head):  # every block of the window, oldest first
            final_ok, final_reason = ask(boot_info, at=block)
            if final_ok is not True:
                return False, (
                    f"allowed at the head (block {head}) but not at block {block} ({final_reason or 'no'}): "
                    f"a permission counts once it is {depth} blocks deep"
                )
        return True, str(reason)
