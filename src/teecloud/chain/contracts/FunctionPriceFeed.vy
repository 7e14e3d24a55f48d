# pragma version 0.4.3
"""
@title FunctionPriceFeed
@notice Example consumer: a price that only one function (one FunctionRegistry, so only its allowed code
        hashes), called with one input, may set; each result through FunctionResultVerifier, once.
        The output is an ABI uint256.
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
    function_hash: bytes32


verifier: public(address)
function_id: public(address)
input_hash: public(bytes32)
price: public(uint256)
updated_at: public(uint256)
updates: public(uint256)


@deploy
def __init__(verifier: address, function_id: address, input_hash: bytes32):
    self.verifier = verifier
    self.function_id = function_id
    self.input_hash = input_hash


@external
def submit(r: FunctionResult):
    assert r.function_id == self.function_id, "result of another function"
    assert r.input_hash == self.input_hash, "result for another input"
    out: Bytes[MAX_OUTPUT] = extcall IVerifier(self.verifier).verify(r)
    assert len(out) == 32, "output is not a uint256"
    self.price = convert(extract32(out, 0), uint256)
    self.updated_at = block.timestamp
    self.updates += 1
    log PriceUpdated(price=self.price, request_id=r.request_id, function_hash=r.function_hash)
