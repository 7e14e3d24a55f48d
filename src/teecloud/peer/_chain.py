"""The chain gate: is this attested peer's code allowed on chain? One home for the KMS, the KMS client and
the gateway (none of them imports another's internals to ask).

    ChainGate.app_allowed(boot_info)   KmsAuth.isAppAllowed, cached for at most one block
    ChainGate.kms_allowed(boot_info)   KmsAuth.isKmsAllowed, same cache rule
    ChainGate.app_deployed(app_id)     KmsAuth.deployed_apps (the threshold env-key gate), same rules
    ChainGate.holds(kind, key, ask)    any other yes/no question `ask(at=block)` (e.g. the gateway's
                                       NodeRegistry read), same cache and finality rules
    FreshBlockNumber                   the chain's head read at or after the call, shared

Finality: with `finality_depth` d > 0 the gate says yes only when the chain allows at the head AND at every
one of the d blocks below it. So a permission counts once d blocks sit on top of the block that granted it
(a reorg shorter than d cannot authorize a release or a route, also after a removal and a re-grant inside
the window), while a removal counts at once (the head says no). A cache miss costs d + 1 reads, so d is at
most MAX_FINALITY_DEPTH.
One block, by hash: pass `ChainConnection.checked_head` as `block_number`. Each fresh read then checks the
chain id and reads the head as (number, hash) in one request; every question is asked at a block named by
its hash (EIP-1898), the finality window's blocks are found by walking parent hashes down from the head (so
they are that head's ancestors, not whatever the endpoint holds at those numbers), a verdict is cached under
the head's hash (a reorg at the same height is a miss), and after the answers the chain id is checked again:
answers read while the endpoint switched chains are discarded (review 3, R3-3 and R3-4). A reader that
returns a bare block number (tests, simple fakes) keys the cache by number and asks by number.

Every failure to get a clear "yes" from the chain — unreachable RPC, revert, wrong chain, an unexpected
exception — is a refusal (`PeerRejected(step="chain")`): nothing is released or routed on a guess.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from teecloud.chain.api import BlockRef, BootInfo
from teecloud.peer._verifier import PeerRejected

__all__ = ["MAX_FINALITY_DEPTH", "AuthChain", "ChainGate", "FreshBlockNumber"]

MAX_FINALITY_DEPTH = 256  # blocks; a cache miss asks the chain at each of them

Head = int | BlockRef  # a block named by number only (simple readers), or by number and hash
Subject = BootInfo | bytes  # what a question is about: an attested peer's boot_info, or an app id


class AuthChain(Protocol):
    """The part of teecloud.chain.ChainClient the chain gate uses (`at`: ask at that block; only used with a
    finality depth)."""

    def is_app_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...

    def is_kms_allowed(self, boot_info: BootInfo) -> tuple[bool, str]: ...


class AuthChainAt(AuthChain, Protocol):
    def is_app_allowed(
        self, boot_info: BootInfo, *, at: int | BlockRef | None = None
    ) -> tuple[bool, str]: ...

    def is_kms_allowed(
        self, boot_info: BootInfo, *, at: int | BlockRef | None = None
    ) -> tuple[bool, str]: ...


class DeployedApps(Protocol):
    """What `ChainGate.app_deployed` asks (KmsAuth and ChainClient have it)."""

    def is_app_deployed(self, app_id: bytes, *, at: int | BlockRef | None = None) -> tuple[bool, str]: ...


class AuthChainByHash(AuthChainAt, Protocol):
    """What the gate needs when the head is a BlockRef (KmsAuth and ChainClient have it)."""

    def block_by_hash(self, block_hash: str) -> BlockRef: ...

    def check_chain_id(self) -> None: ...


class FreshBlockNumber:
    """The chain's head (a block number or a BlockRef), read at or after the moment of the call, shared by
    concurrent callers.

    A caller never gets a number read before it arrived: it waits for a read that *starts* after its arrival
    (the next one if one is already running), and every caller waiting at that moment shares it. So a
    change mined before a request arrived is always seen by that request, while under load one RPC read
    serves many requests instead of one each. A failed read fails every caller that shares it.
    """

    def __init__(self, read: Callable[[], Head]) -> None:
        self._read = read
        self._cv = threading.Condition()
        self._started = 0  # reads started so far (numbered 1, 2, ...)
        self._running = False
        self._done_no = 0  # number of the last finished read
        self._done: Head | BaseException = 0
        self.reads = 0

    def __call__(self) -> Head:
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
        value: Head | BaseException
        try:
            value = self._read()
            if not isinstance(value, BlockRef):
                value = int(value)
        except Exception as exc:
            value = exc
        with self._cv:
            self._running = False
            self._done_no, self._done = mine, value
            self.reads += 1
            self._cv.notify_all()
        return self._result(value)

    @staticmethod
    def _result(value: Head | BaseException) -> Head:
        if isinstance(value, BaseException):
            raise value
        return value


class ChainGate:
    """Asks the chain, caching each answer for at most one block.

    `block_number` returns the chain's current head (read per request, shared by concurrent requests through
    `FreshBlockNumber`): a BlockRef (`ChainConnection.checked_head`) or a bare number. An answer is reused
    only while the chain is at the block it was read at (same hash for a BlockRef), so any on-chain change
    (which needs a new block) is seen by the next request. Without `block_number` nothing is cached.
    """

    def __init__(
        self,
        chain: AuthChain,
        *,
        block_number: Callable[[], Head] | None = None,
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
        # (kind, boot_info or app_id) -> (the head's hash, or its number for a bare-number reader; ok; reason)
        self._cache: OrderedDict[tuple[str, Subject], tuple[str | int, bool, str]] = OrderedDict()
        self._lock = threading.Lock()

    def app_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("app", boot_info)

    def kms_allowed(self, boot_info: BootInfo) -> str:
        return self._ask("kms", boot_info)

    def app_deployed(self, app_id: bytes) -> str:
        """KmsAuth created `app_id` itself from its app blueprint (`deployed_apps`), at the head and, with a
        finality depth, at every block of the window (a deployment counts once it is that deep)."""
        if type(app_id) is not bytes or len(app_id) != 20:
            raise PeerRejected("an app id is 20 bytes", step="chain")
        return self._ask("deployed", app_id)

    def holds(self, kind: str, key: bytes, ask: Callable[..., tuple[bool, str]]) -> str:
        """Another yes/no question under the same rules: `ask(at=block)` -> (ok, reason) at that block (a
        BlockRef or a number), asked at the head and, with a finality depth, at every block of the window;
        cached per (kind, key) for at most one block. `kind` must not be one of the gate's own."""
        if kind in ("app", "kms", "deployed"):
            raise ValueError(f"{kind!r} is one of the gate's own questions")
        return self._decide(kind, key, ask)

    def _ask(self, kind: str, subject: Subject) -> str:
        return self._decide(kind, subject, None)

    def _decide(self, kind: str, subject: Subject, ask: Callable[..., tuple[bool, str]] | None) -> str:
        """Returns the chain's reason when allowed; raises PeerRejected(step="chain") otherwise."""
        try:
            head = self._block_number() if self._block_number is not None else None
            key = head.hash if isinstance(head, BlockRef) else head
            cached = None
            if key is not None:
                with self._lock:
                    cached = self._cache.get((kind, subject))
            if cached is not None and cached[0] == key:
                ok, reason = cached[1], cached[2]
            else:
                ok, reason = self._verdict(kind, subject, head, ask)
                if isinstance(head, BlockRef):
                    # R3-4: answers read while the endpoint switched to another chain are discarded
                    by_hash: AuthChainByHash = self.chain  # type: ignore[assignment]
                    by_hash.check_chain_id()
                if key is not None:
                    with self._lock:
                        self._cache[(kind, subject)] = (key, bool(ok), str(reason))
                        self._cache.move_to_end((kind, subject))
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
            what = {"app": "app", "kms": "KMS", "deployed": "app an env key"}.get(kind)
            if what is None:
                raise PeerRejected(f"the chain says no ({kind}): {reason or 'no reason given'}", step="chain")
            raise PeerRejected(f"KmsAuth refuses this {what}: {reason or 'no reason given'}", step="chain")
        return str(reason)

    def _asker(self, kind: str, subject: Subject) -> Callable[..., tuple[bool, str]]:
        """The chain's question of `kind`, bound to its subject; called with `at=` (or without: the head)."""
        if kind == "deployed":
            deployed: DeployedApps = self.chain  # type: ignore[assignment]
            return lambda **at: deployed.is_app_deployed(subject, **at)  # type: ignore[arg-type]
        chain: AuthChainAt = self.chain  # type: ignore[assignment]
        fn = chain.is_app_allowed if kind == "app" else chain.is_kms_allowed
        return lambda **at: fn(subject, **at)  # type: ignore[arg-type]

    def _verdict(
        self,
        kind: str,
        subject: Subject,
        head: Head | None,
        ask: Callable[..., tuple[bool, str]] | None = None,
    ) -> tuple[bool, str]:
        depth = self.finality_depth
        question = ask if ask is not None else self._asker(kind, subject)
        if head is None or (not depth and not isinstance(head, BlockRef)):  # the chain's own head
            return question()
        number = head.number if isinstance(head, BlockRef) else head
        if number < depth:
            return False, f"the chain is {number} blocks long, fewer than the finality depth {depth}"
        ok, reason = question(at=head)
        if ok is not True or not depth:
            return ok, str(reason)
        for block in self._window(head, depth):  # every block of the window, oldest first
            final_ok, final_reason = question(at=block)
            if final_ok is not True:
                at = block.number if isinstance(block, BlockRef) else block
                return False, (
                    f"allowed at the head (block {number}) but not at block {at} ({final_reason or 'no'}): "
                    f"a permission counts once it is {depth} blocks deep"
                )
        return True, str(reason)

    def _window(self, head: Head, depth: int) -> list[Head]:
        """The `depth` blocks below the head, oldest first. Below a BlockRef head each is read by its hash,
        the parent hash of the block above it, so all are that head's ancestors on one fork."""
        if not isinstance(head, BlockRef):
            return list(range(head - depth, head))
        chain: AuthChainByHash = self.chain  # type: ignore[assignment]
        blocks: list[Head] = []
        child = head
        for _ in range(depth):
            parent = chain.block_by_hash(child.parent_hash)
            if parent.hash != child.parent_hash or parent.number != child.number - 1:
                raise ValueError(
                    f"block {child.number}'s parent {child.parent_hash} came back as block {parent.number} "
                    f"{parent.hash}"
                )
            blocks.append(parent)
            child = parent
        return blocks[::-1]
