"""The gateway's check of a node's vouch statement (the format: teecloud.node.vouch).

`VouchChecker.check(vouch, app_id=, instance_id=, endpoints=)`, after the CVM's certificate was verified (its
attested app_id and instance_id), fails closed with RegistrationRefused(step="vouch"):
  (1) form        the statement's purpose; its app_id and instance_id are the attested ones
  (2) window      issued_at ≤ now + skew < expires_at + skew, and expires_at - issued_at ≤ max_lifetime_s
  (3) signature   the EIP-191 signature over sha256(canonical statement) recovers to the statement's operator
  (4) node        NodeRegistry (through `NodeDirectory`; `ChainNodes` reads it through the chain gate at its
                  finality depth): node_id is an active node whose operator that is
  (5) launch      sha256(launch_seed(operator, launch_nonce) ‖ app_id)[:20] is the attested instance_id: this
                  operator's node launched the CVM (no other node can vouch for it)
  (6) replay      issued_at is not older than the newest statement already taken for this instance (an old
                  statement cannot bring back an address the node has since changed)
  (7) endpoints   every endpoint of the registration is one the statement lists (same app port, host, host
                  port): the CVM and its node both stand behind each route
`accept(...)` records (6) once the registration went through.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from eth_account import Account
from eth_account.messages import encode_defunct

from teecloud.gateway import api
from teecloud.gateway.errors import RegistrationRefused
from teecloud.node.vouch import VOUCH_PURPOSE, launch_seed, operator_bytes, vouch_digest
from teecloud.peer import ChainGate, PeerRejected

__all__ = ["MAX_VOUCH_LIFETIME_S", "ChainNodes", "NodeDirectory", "StaticNodes", "VouchChecker"]

MAX_VOUCH_LIFETIME_S = 600
CLOCK_SKEW_S = 30


class NodeDirectory(Protocol):
    def operator_of(self, node_id: int) -> str | None:
        """The operator address (lowercase 0x hex) of an active registered node; None otherwise."""
        ...


class ChainNodes:
    """NodeRegistry on chain (teecloud.chain's facade), read through the chain gate (`ChainGate`) at its
    finality depth: `operator_of(node_id)` is the operator of a node that is registered and active, with that
    same operator, at the head and at each of the `finality_depth` blocks below it (walked by parent hash;
    the chain id checked around each read). An operator registered in the last d blocks is not trusted yet;
    a deactivation counts at once (the head says no). Answers are kept `cache_s` (a node deactivated or
    slashed out stops vouching within that bound); a refusal is never cached."""

    def __init__(
        self,
        chain: Any,
        *,
        finality_depth: int = 0,
        cache_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.chain = chain
        self.cache_s = cache_s
        self.clock = clock
        # a ChainConnection names its head by hash after checking the chain id; a bare reader by number
        head = getattr(chain, "checked_head", None) or getattr(chain, "block_number", None)
        self.gate = ChainGate(chain, block_number=head, finality_depth=finality_depth)
        self._cache: dict[int, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def operator_of(self, node_id: int) -> str | None:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(node_id)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        try:
            registry = self.chain.registry
            if not 0 <= node_id < registry.node_count():
                return None
            info = registry.node(node_id)
            if not info.active:
                return None
            operator = str(info.operator).lower()

            def same_operator(**at: Any) -> tuple[bool, str]:
                if not 0 <= node_id < registry.node_count(**at):
                    return False, f"node {node_id} is not registered"
                there = registry.node(node_id, **at)
                if not there.active or str(there.operator).lower() != operator:
                    return False, f"node {node_id} is not active under operator {operator}"
                return True, operator

            self.gate.holds("node", node_id.to_bytes(32, "big") + operator_bytes(operator), same_operator)
        except PeerRejected as exc:  # not final yet, or the gate could not read: refused, not cached
            raise RegistrationRefused(f"NodeRegistry: {exc}", step="vouch") from exc
        except Exception as exc:  # a chain read failing refuses (fail closed), and is not cached
            raise RegistrationRefused(f"cannot read NodeRegistry: {exc}", step="vouch") from exc
        with self._lock:
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[node_id] = (now, operator)
        return operator


class StaticNodes:
    """A fixed node_id -> operator table (tests, or a gateway configured with its nodes by hand)."""

    def __init__(self, operators: dict[int, str]) -> None:
        self.operators = {int(k): v.lower() for k, v in operators.items()}

    def operator_of(self, node_id: int) -> str | None:
        return self.operators.get(node_id)


def _refuse(reason: str) -> RegistrationRefused:
    return RegistrationRefused(reason, step="vouch")


class VouchChecker:
    def __init__(
        self,
        nodes: NodeDirectory,
        *,
        clock: Callable[[], float] = time.time,
        max_lifetime_s: int = MAX_VOUCH_LIFETIME_S,
        max_tracked: int = 16384,
    ) -> None:
        self.nodes = nodes
        self.clock = clock
        self.max_lifetime_s = max_lifetime_s
        self.max_tracked = max_tracked
        self._newest: dict[str, int] = {}  # instance_id hex -> newest issued_at taken
        self._lock = threading.Lock()

    def check(
        self,
        vouch: api.NodeVouch | None,
        *,
        app_id: bytes,
        instance_id: bytes,
        endpoints: Sequence[api.Endpoint],
    ) -> None:
        if vouch is None:
            raise _refuse("the registration carries no statement from the node that launched the CVM")
        # (1)
        if vouch.purpose != VOUCH_PURPOSE:
            raise _refuse(f"not a node vouch statement ({vouch.purpose[:64]!r})")
        if vouch.app_id != app_id.hex() or vouch.instance_id != instance_id.hex():
            raise _refuse("the node's statement is for another instance")
        # (2)
        now = int(self.clock())
        if vouch.expires_at - vouch.issued_at > self.max_lifetime_s or vouch.expires_at <= vouch.issued_at:
            raise _refuse(f"the node's statement is valid for more than {self.max_lifetime_s} s")
        if vouch.issued_at > now + CLOCK_SKEW_S:
            raise _refuse("the node's statement is issued in the future")
        if now >= vouch.expires_at + CLOCK_SKEW_S:
            raise _refuse("the node's statement has expired")
        # (3)
        statement = vouch.model_dump(exclude={"signature"})
        statement["endpoints"] = [e.model_dump() for e in vouch.endpoints]
        try:
            signer = Account.recover_message(
                encode_defunct(primitive=vouch_digest(statement)), signature=bytes.fromhex(vouch.signature)
            )
        except Exception as exc:  # eth_keys raises its own errors on a malformed signature
            raise _refuse("the node's signature does not recover") from exc
        if signer.lower() != vouch.operator:
            raise _refuse("the statement is not signed by the operator it names")
        # (4)
        operator = self.nodes.operator_of(vouch.node_id)
        if operator is None:
            raise _refuse(f"node {vouch.node_id} is not an active registered node")
        if operator != vouch.operator:
            raise _refuse(f"the signer is not node {vouch.node_id}'s operator")
        # (5)
        seed = launch_seed(vouch.operator, bytes.fromhex(vouch.launch_nonce))
        if hashlib.sha256(seed + app_id).digest()[:20] != instance_id:
            raise _refuse(f"node {vouch.node_id} did not launch this instance")
        # (6)
        with self._lock:
            newest = self._newest.get(vouch.instance_id)
        if newest is not None and vouch.issued_at < newest:
            raise _refuse("the node's statement is older than one already taken (replayed)")
        # (7)
        vouched = {(e.port, e.host, e.host_port) for e in vouch.endpoints}
        for ep in endpoints:
            if (ep.port, ep.host, ep.host_port) not in vouched:
                raise _refuse(f"the node does not vouch for port {ep.port} at {ep.host}:{ep.host_port}")

    def newest(self, instance_id: str) -> int | None:
        """issued_at of the newest statement taken for an instance (hex id), if any."""
        with self._lock:
            return self._newest.get(instance_id)

    def accept(self, vouch: api.NodeVouch) -> None:
        """The registration went through: no older statement for this instance is taken again."""
        now = int(self.clock())
        with self._lock:
            if vouch.issued_at >= self._newest.get(vouch.instance_id, -1):
                self._newest[vouch.instance_id] = vouch.issued_at
            if len(self._newest) > self.max_tracked:
                # forget instances whose newest statement is older than any valid one can be: a statement
                # older than that is expired anyway, so forgetting loses no replay protection
                horizon = now - self.max_lifetime_s - 2 * CLOCK_SKEW_S
                self._newest = {k: v for k, v in self._newest.items() if v >= horizon}
