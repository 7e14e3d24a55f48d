# pragma version 0.4.3
"""
@title FunctionOracle
@notice Calling a function on chain: `request` (with a deposit) emits `Requested`; a function runtime runs
        the function for that request id and anyone holding the signed result calls `fulfill`, which checks
        it through FunctionResultVerifier (this oracle is the consumer: one answer per request), calls the
        requester's callback with a bounded gas, pays the caller the gas it spent from the deposit and
        refunds the rest. A request nobody answered can be cancelled by its requester after TIMEOUT.
"""

MAX_OUTPUT: constant(uint256) = 4096
MAX_INPUT: constant(uint256) = 1024
MAX_CALLBACK_GAS: constant(uint256) = 500_000
TIMEOUT: constant(uint256) = 3600
# gas of fulfill not seen by msg.gas accounting (intrinsic, calldata, the refund transfers), paid flat
FULFILL_OVERHEAD: constant(uint256) = 60_000

struct FunctionResult:
    request_id: bytes32
    function_id: address
    function_hash: bytes32
    input_hash: bytes32
    output: Bytes[MAX_OUTPUT]
    expiry: uint256
    runtime_app_id: address
    runtime_compose_hash: bytes32
    signature: Bytes[65]
    result_key: Bytes[64]
    app_signature: Bytes[65]
    app_key: Bytes[64]
    kms_signature: Bytes[65]
    kms_root_key: Bytes[64]

struct Request:
    requester: address
    function_id: address
    input_hash: bytes32
    callback: address
    callback_gas: uint256
    deposit: uint256
    created: uint256
    state: uint8  # 1 pending, 2 fulfilled, 3 cancelled


interface IVerifier:
    def verify(r: FunctionResult) -> Bytes[MAX_OUTPUT]: nonpayable


event Requested:
    request_id: indexed(bytes32)
    function_id: indexed(address)
    requester: indexed(address)
    input: Bytes[MAX_INPUT]
    callback: address
    deposit: uint256

event Fulfilled:
    request_id: indexed(bytes32)
    relayer: indexed(address)
    paid: uint256
    callback_ok: bool

event Cancelled:
    request_id: indexed(bytes32)


verifier: public(address)
requests: public(HashMap[bytes32, Request])
nonce: public(uint256)
# request ids: ORACLE_ID_TAG (8 bytes, the same for every FunctionOracle), the high 128 bits of
# keccak256(this oracle ‖ chain id), then the nonce (64 bits). Unique across oracles and chains, and
# consecutive, so the verifier's replay record (a bit per id, 256 consecutive ids to a word) costs a fresh
# slot once per 256 requests. The tag marks the oracles' id space: a function runtime refuses every id in it
# from any caller but its own oracle watcher (teecloud.functions.result.ORACLE_ID_TAG, docs/functions.md),
# so no one can obtain a signed result for a request id an oracle will hand out.
ORACLE_ID_TAG: constant(uint256) = 8386659554505486961  # 0x7463666e2e6f7271, ASCII "tcfn.orq"
ID_PREFIX: immutable(uint256)


@deploy
def __init__(verifier: address):
    assert verifier != empty(address), "no verifier"
    self.verifier = verifier
    ID_PREFIX = (ORACLE_ID_TAG << 192) | ((convert(keccak256(abi_encode(self, chain.id)), uint256) >> 128) << 64)


@external
@payable
def request(function_id: address, input: Bytes[MAX_INPUT], callback: address, callback_gas: uint256) -> bytes32:
    assert msg.value > 0, "a deposit pays the fulfilment"
    assert callback_gas <= MAX_CALLBACK_GAS, "callback gas above the maximum"
    n: uint256 = self.nonce
    assert n < 2**64, "request ids used up"
    request_id: bytes32 = convert(ID_PREFIX | n, bytes32)
    self.nonce = n + 1
    self.requests[request_id] = Request(
        requester=msg.sender,
        function_id=function_id,
        input_hash=keccak256(input),
        callback=callback,
        callback_gas=callback_gas,
        deposit=msg.value,
        created=block.timestamp,
        state=1,
    )
    log Requested(
        request_id=request_id, function_id=function_id, requester=msg.sender, input=input, callback=callback,
        deposit=msg.value
    )
    return request_id


@external
def fulfill(r: FunctionResult):
    start: uint256 = msg.gas
    req: Request = self.requests[r.request_id]
    assert req.state == 1, "no pending request"
    assert r.function_id == req.function_id, "result of another function"
    assert r.input_hash == req.input_hash, "result for another input"
    self.requests[r.request_id].state = 2  # before any external call
    out: Bytes[MAX_OUTPUT] = extcall IVerifier(self.verifier).verify(r)
    ok: bool = False
    if req.callback != empty(address):
        ok = raw_call(
            req.callback,
            abi_encode(r.request_id, r.function_id, r.input_hash, out, method_id=method_id("on_function_result(bytes32,address,bytes32,bytes)")),
            gas=req.callback_gas,
            revert_on_failure=False,
        )
    fee: uint256 = min((start - msg.gas + FULFILL_OVERHEAD) * tx.gasprice, req.deposit)
    if fee > 0:
        send(msg.sender, fee)
    if req.deposit > fee:
        send(req.requester, req.deposit - fee)
    log Fulfilled(request_id=r.request_id, relayer=msg.sender, paid=fee, callback_ok=ok)


@external
def cancel(request_id: bytes32):
    """@notice The requester takes its deposit back from a request nobody answered within TIMEOUT."""
    req: Request = self.requests[request_id]
    assert req.state == 1, "no pending request"
    assert msg.sender == req.requester, "caller is not the requester"
    assert block.timestamp > req.created + TIMEOUT, "request not timed out yet"
    self.requests[request_id].state = 3
    send(req.requester, req.deposit)
    log Cancelled(request_id=request_id)
