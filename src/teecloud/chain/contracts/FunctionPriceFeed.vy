# pragma version 0.4.3
"""
@title FunctionPriceFeed
@notice Example consumer: a price that only one function (one FunctionRegistry, so only its allowed code
        hashes), called with one input, may set; each result through FunctionResultVerifier, once —
        submitted directly (`submit`) or through a FunctionOracle request's callback. The output is an
        ABI uint256.
"""

MAX_OUTPUT: constant(uint256) = 4096

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


interface IVerifier:
    def verify(r: FunctionResult) -> Bytes[MAX_OUTPUT]: nonpayable


event PriceUpdated:
    price: uint256
    request_id: indexed(bytes32)


verifier: public(address)
# a FunctionOracle whose callbacks this feed takes (empty: only `submit`)
oracle: public(address)
function_id: public(address)
input_hash: public(bytes32)
price: public(uint256)
updated_at: public(uint256)
updates: public(uint256)


@deploy
def __init__(verifier: address, oracle: address, function_id: address, input_hash: bytes32):
    self.verifier = verifier
    self.oracle = oracle
    self.function_id = function_id
    self.input_hash = input_hash


@external
def submit(r: FunctionResult):
    assert r.function_id == self.function_id, "result of another function"
    assert r.input_hash == self.input_hash, "result for another input"
    out: Bytes[MAX_OUTPUT] = extcall IVerifier(self.verifier).verify(r)
    self._set(out, r.request_id)


@internal
def _set(out: Bytes[MAX_OUTPUT], request_id: bytes32):
    assert len(out) == 32, "output is not a uint256"
    self.price = convert(extract32(out, 0), uint256)
    self.updated_at = block.timestamp
    self.updates += 1
    log PriceUpdated(price=self.price, request_id=request_id)


@external
def on_function_result(request_id: bytes32, function_id: address, input_hash: bytes32, output: Bytes[MAX_OUTPUT]):
    """@notice The oracle's callback: the oracle checked the result (FunctionResultVerifier) already."""
    assert msg.sender == self.oracle and self.oracle != empty(address), "caller is not the oracle"
    assert function_id == self.function_id, "result of another function"
    assert input_hash == self.input_hash, "result for another input"
    self._set(output, request_id)
