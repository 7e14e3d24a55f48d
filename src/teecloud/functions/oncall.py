"""Calls from the chain: watch a FunctionOracle's `Requested` events, run the function for that request id
and send `fulfill` with the signed result (the oracle pays the sender's gas from the requester's deposit).

The request id is claimed in the runtime's journal before the function runs (service.ClaimJournal), so a
runtime that restarts mid-request never answers it twice: it is answered once, or its requester cancels it
after the oracle's timeout. Oracle request ids (result.ORACLE_ID_TAG) are run only from here (`oracle=True`,
for a request read from the chain): no HTTP caller can take one in the journal first.

Before the first answer signed by a result key, the watcher certifies that key on the oracle's verifier
(`certify_key`: the key's chain up to the KMS root checked once, anyone may call it) and then sends every
answer of that key with its chain omitted (`without_chain`): the verifier reads the certification instead of
checking the chain's two ecrecovers (docs/functions.md, gas). A failed certification only costs gas: the
answer is still sent with its chain and checked in full."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from teecloud.chain import ChainError
from teecloud.chain.functions import FunctionOracle, without_chain

from .errors import FunctionError, NotAllowed, UnknownFunction
from .service import FunctionRuntime

__all__ = ["OracleWatcher", "PollReport", "relayer_key"]

log = logging.getLogger(__name__)
MAX_EVENTS_PER_POLL = 256


def relayer_key(runtime: FunctionRuntime) -> str:
    """The runtime's transaction key (fund its address to relay results): GetKey, like every key it has."""
    secret, _ = runtime.keys.source.get_key("teecloud-fn/relayer", "teecloud-fn-relayer")
    return "0x" + secret.hex()


@dataclass
class PollReport:
    fulfilled: list[bytes] = field(default_factory=list)
    skipped: list[tuple[bytes, str]] = field(default_factory=list)


class OracleWatcher:
    """`poll()` once per tick (the caller's loop): every pending request for a function this runtime holds."""

    def __init__(
        self,
        runtime: FunctionRuntime,
        oracle: FunctionOracle,
        *,
        from_block: int = 0,
        ttl_s: int = 600,
        certify: bool = True,
    ):
        self.runtime = runtime
        self.oracle = oracle
        self.next_block = from_block
        self.ttl_s = ttl_s
        self.certify = certify
        self._certified: set[tuple[bytes, bytes]] = set()  # (result key, KMS root) seen certified

    def poll(self) -> PollReport:
        rep = PollReport()
        head = self.oracle.conn.block_number()
        events = self.oracle.requested(self.next_block)[:MAX_EVENTS_PER_POLL]
        for e in events:
            rid = bytes(e["args"]["request_id"])
            try:
                self._one(rid, e["args"])
                rep.fulfilled.append(rid)
            except (FunctionError, ChainError) as exc:
                rep.skipped.append((rid, str(exc)))
                log.info("request 0x%s not fulfilled: %s", rid.hex(), exc)
        if len(events) < MAX_EVENTS_PER_POLL:
            self.next_block = head + 1
        else:
            self.next_block = int(events[-1]["block"])
        return rep

    def _one(self, rid: bytes, args: dict[str, Any]) -> None:
        req = self.oracle.get(rid)
        if not req.pending:
            raise NotAllowed("not pending")
        fid = str(args["function_id"]).lower()
        try:
            self.runtime.record(fid)
        except UnknownFunction as exc:
            raise UnknownFunction(f"function {fid} is not on this runtime") from exc
        inv = self.runtime.invoke(fid, bytes(args["input"]), request_id=rid, ttl_s=self.ttl_s, oracle=True)
        result = inv.result.to_abi()
        if self.certify and self._certify(result):
            result = without_chain(result)
        self.oracle.fulfill(result)

    def _certify(self, result: tuple[Any, ...]) -> bool:
        """Whether the result's key is certified on the oracle's verifier (certified here if it was not)."""
        # the result key and the KMS root its chain ends at (FunctionResult's field order, chain/functions.py)
        key = (bytes(result[9]), bytes(result[13]))
        if key in self._certified:
            return True
        try:
            verifier = self.oracle.verifier()
            if not verifier.is_certified(result):
                verifier.certify_key(result)
            self._certified.add(key)
            return True
        except ChainError as exc:
            log.warning(
                "could not certify result key %s… (its results stay checked in full): %s",
                key[0].hex()[:16],
                exc,
            )
            return False
