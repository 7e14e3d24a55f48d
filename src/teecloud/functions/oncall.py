"""Calls from the chain: watch a FunctionOracle's `Requested` events, run the function for that request id
and send `fulfill` with the signed result (the oracle pays the sender's gas from the requester's deposit).

The request id is claimed in the runtime's journal before the function runs (service.ClaimJournal), so a
runtime that restarts mid-request never answers it twice: it is answered once, or its requester cancels it
after the oracle's timeout."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from teecloud.chain import ChainError
from teecloud.chain.functions import FunctionOracle

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
        self, runtime: FunctionRuntime, oracle: FunctionOracle, *, from_block: int = 0, ttl_s: int = 600
    ):
        self.runtime = runtime
        self.oracle = oracle
        self.next_block = from_block
        self.ttl_s = ttl_s

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
        inv = self.runtime.invoke(fid, bytes(args["input"]), request_id=rid, ttl_s=self.ttl_s)
        self.oracle.fulfill(inv.result.to_abi())
