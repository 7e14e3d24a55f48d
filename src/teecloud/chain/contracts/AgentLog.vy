# pragma version 0.4.3
"""
@title AgentLog
@notice The AI agent example's decision log (examples/ai-agent, docs/ai.md): every agent records its
        decisions under its own address (msg.sender: the wallet the KMS derived for the agent's app), so a
        reader knows which agent decided what, and nobody can record under another agent's address.
        Anyone may record; what an address is worth is what its key proves (the agent's GetKey chain).
"""

MAX_MEMO: constant(uint256) = 256


event Decision:
    agent: indexed(address)
    seq: indexed(uint256)
    decision_hash: bytes32
    memo: String[MAX_MEMO]


# decisions recorded per agent, and the hash of the latest one
count: public(HashMap[address, uint256])
last_decision: public(HashMap[address, bytes32])


@external
def record(decision_hash: bytes32, memo: String[MAX_MEMO]) -> uint256:
    """Record one decision (its hash, and a short public memo) under the sender; returns its sequence number."""
    assert decision_hash != empty(bytes32), "empty decision hash"
    seq: uint256 = self.count[msg.sender]
    self.count[msg.sender] = seq + 1
    self.last_decision[msg.sender] = decision_hash
    log Decision(agent=msg.sender, seq=seq, decision_hash=decision_hash, memo=memo)
    return seq
