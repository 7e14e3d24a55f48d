"""Questions bound to one block by hash (EIP-1898; review 3, R3-3 and R3-4): KmsAuth asks at the head's hash
and caches under it, a known hash reads that block's state, an unknown hash is an error (never "latest"),
and the chain gate's reads on both real EVMs (embedded, anvil) all name the head's hash."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.chain import ChainClient
from teecloud.chain.api import BlockRef
from teecloud.chain.embedded import EmbeddedChain, RpcError
from teecloud.chain.errors import ChainError
from teecloud.chain.kmsauth import KmsAuth
from teecloud.peer import ChainGate, PeerRejected

from .helpers import OS_IMAGE, boot_info, rand32


def _record(chain: ChainClient, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    calls: list[tuple[str, list[Any]]] = []
    real = chain.transport.request

    def request(method: str, params: list[Any]) -> Any:
        calls.append((method, list(params)))
        return real(method, params)

    monkeypatch.setattr(chain.transport, "request", request)
    real_batch = getattr(chain.transport, "request_batch", None)
    if real_batch is not None:  # HTTP (anvil): the head and the chain id in one request

        def request_batch(batch: list[tuple[str, list[Any]]]) -> list[Any]:
            calls.extend((m, list(p)) for m, p in batch)
            return real_batch(batch)  # type: ignore[no-any-return]

        monkeypatch.setattr(chain.transport, "request_batch", request_batch)
    return calls


def test_a_question_at_a_block_hash_reads_that_block(chain: ChainClient) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    before = chain.head()
    app_id = chain.register_app(None, h)
    after = chain.head()
    assert after.number > before.number and after.hash != before.hash
    assert chain.is_app_allowed(boot_info(app_id, h), at=after) == (True, "")
    ok, reason = chain.is_app_allowed(boot_info(app_id, h), at=before)  # before the registration
    assert ok is False and reason


def test_an_unknown_block_hash_is_an_error_never_the_head(chain: ChainClient) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    head = chain.head()
    assert chain.is_app_allowed(boot_info(app_id, h), at=head)[0] is True
    other_fork = BlockRef(head.number, "0x" + rand32().hex(), head.parent_hash)
    with pytest.raises(ChainError):
        chain.is_app_allowed(boot_info(app_id, h), at=other_fork)
    with pytest.raises(ChainError):
        chain.block_by_hash(other_fork.hash)


def test_the_gate_names_the_head_by_hash_and_checks_the_chain_id_after_the_answers(
    chain: ChainClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    for _ in range(3):
        chain.rpc_call("evm_mine")
    gate = ChainGate(chain, block_number=chain.checked_head, finality_depth=3)
    calls = _record(chain, monkeypatch)
    assert gate.app_allowed(boot_info(app_id, h)) == ""
    methods = [m for m, _ in calls]
    assert methods[:2] == ["eth_chainId", "eth_getBlockByNumber"] and methods[-1] == "eth_chainId"
    head = chain.head()
    blocks = [p[1] for m, p in calls if m == "eth_call"]
    assert len(blocks) == 4 and all(set(b) == {"blockHash", "requireCanonical"} for b in blocks)
    assert blocks[0]["blockHash"] == head.hash
    window = [head]
    for _ in range(3):
        window.append(chain.block_by_hash(window[-1].parent_hash))
    assert {b["blockHash"] for b in blocks} == {b.hash for b in window}


class _Endpoint:
    """A JSON-RPC endpoint whose head is replaced by another block at the same height (a reorg)."""

    def __init__(self) -> None:
        self.head_hash = "0x" + "aa" * 32
        self.calls: list[tuple[str, list[Any]]] = []

    def request(self, method: str, params: list[Any]) -> Any:
        self.calls.append((method, params))
        if method == "eth_chainId":
            return "0x1"
        if method == "eth_getBlockByNumber":
            return {"number": "0x64", "hash": self.head_hash, "parentHash": "0x" + "99" * 32}
        if method == "eth_call":
            from eth_abi.abi import encode

            return "0x" + encode(["bool", "string"], [True, ""]).hex()
        raise AssertionError(method)

    def close(self) -> None:
        pass


def test_kmsauth_caches_a_head_verdict_under_the_heads_hash() -> None:
    from teecloud.chain.connection import ChainConnection

    endpoint = _Endpoint()
    auth = KmsAuth(ChainConnection(endpoint), "0x" + "22" * 20)
    info = boot_info("0x" + "11" * 20, rand32())
    assert auth.is_app_allowed(info) == (True, "")
    assert auth.is_app_allowed(info) == (True, "")
    asked = [p[1] for m, p in endpoint.calls if m == "eth_call"]
    assert asked == [{"blockHash": "0x" + "aa" * 32, "requireCanonical": True}]  # one call, by hash
    endpoint.head_hash = "0x" + "bb" * 32  # same height, another block
    assert auth.is_app_allowed(info) == (True, "")
    asked = [p[1] for m, p in endpoint.calls if m == "eth_call"]
    assert len(asked) == 2 and asked[1]["blockHash"] == "0x" + "bb" * 32


@pytest.mark.parametrize(
    "head",
    [
        None,
        {"number": "0x1", "hash": "0x12"},
        {"number": "0x1", "hash": "0x" + "aa" * 32},
        {"number": "-0x1", "hash": "0x" + "aa" * 32, "parentHash": "0x" + "bb" * 32},
        {"number": "0x1", "hash": "0x" + "zz" * 32, "parentHash": "0x" + "bb" * 32},
    ],
)
def test_a_malformed_head_is_a_refusal(head: Any) -> None:
    from teecloud.chain.connection import ChainConnection

    endpoint = _Endpoint()
    conn = ChainConnection(endpoint, chain_id=1)
    endpoint.request = lambda method, params: "0x1" if method == "eth_chainId" else head  # type: ignore[method-assign]
    with pytest.raises(ChainError):
        conn.checked_head()
    gate = ChainGate(KmsAuth(conn, "0x" + "22" * 20), block_number=conn.checked_head)
    with pytest.raises(PeerRejected, match="failing closed"):
        gate.app_allowed(boot_info("0x" + "11" * 20, rand32()))


def test_the_embedded_chain_reads_eip1898_block_objects_strictly(embedded_chain: ChainClient) -> None:
    backend: EmbeddedChain = embedded_chain.transport.chain  # type: ignore[attr-defined]
    addr = embedded_chain.address
    genesis = embedded_chain.block_by_hash(
        embedded_chain.rpc_call("eth_getBlockByNumber", "0x0", False)["hash"]
    )
    head = embedded_chain.head()
    assert head.number > 0
    at_genesis = backend.request("eth_getBalance", [addr, {"blockHash": genesis.hash}])
    assert at_genesis == backend.request("eth_getBalance", [addr, "0x0"])
    assert backend.request("eth_getBalance", [addr, {"blockNumber": hex(head.number)}]) == backend.request(
        "eth_getBalance", [addr, "latest"]
    )
    assert backend.request("eth_getBalance", [addr, {"blockHash": head.hash.upper().replace("0X", "0x")}])
    for bad in (
        {"blockHash": "0x" + "ab" * 32},  # unknown: an error, never "latest"
        {"blockHash": "0x" + "ab" * 31},
        {"blockHash": 5},
        {"blockHash": head.hash, "requireCanonical": "yes"},
        {"blockHash": head.hash, "blockNumber": hex(head.number)},
        {"blockHash": head.hash, "extra": 1},
        {"blockNumber": "latest"},
        {"blockNumber": "0x01"},
        {},
    ):
        with pytest.raises(RpcError):
            backend.request("eth_getBalance", [addr, bad])
        with pytest.raises(ChainError):
            embedded_chain.rpc_call("eth_call", {"to": addr, "data": "0x"}, bad)


def test_the_embedded_chains_http_rpc_answers_a_bad_block_object_with_an_error(teecloud_home: Any) -> None:
    import httpx

    from teecloud.chain.rpcserver import ChainRpcServer

    chain = EmbeddedChain(teecloud_home / "chain")
    server = ChainRpcServer(chain).start()
    try:
        head = chain.request("eth_getBlockByNumber", ["latest", False])
        addr = "0x" + "00" * 20

        def ask(block: Any) -> Any:
            body = {"jsonrpc": "2.0", "id": 1, "method": "eth_getBalance", "params": [addr, block]}
            r = httpx.post(server.url, json=body, timeout=10)
            assert r.status_code == 200
            return r.json()

        assert ask({"blockHash": head["hash"], "requireCanonical": True})["result"] == "0x0"
        unknown = ask({"blockHash": "0x" + "ab" * 32})
        assert "result" not in unknown and unknown["error"]["code"] == -32001
        malformed = ask({"blockHash": head["hash"], "x": 1})
        assert "result" not in malformed and malformed["error"]["code"] == -32602
    finally:
        server.stop()
        chain.close()


def test_the_embedded_chain_answers_a_call_at_a_block_hash_once_and_anything_else_afresh(
    embedded_chain: ChainClient,
) -> None:
    """Several KMS nodes of `teecloud up` ask the one embedded chain the same isAppAllowed at the same head
    hash: it runs once. Another byte of the call, another block, or a change mined since (a new head) runs
    on the EVM again, and the answers are the EVM's."""
    chain = embedded_chain
    evm = chain.transport.chain  # type: ignore[attr-defined]
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    info = boot_info(app_id, h, instance_id=b"\x01" * 20)
    head = chain.checked_head()
    ran = evm.calls_executed
    assert chain.is_app_allowed(info, at=head) == (True, "")
    assert evm.calls_executed == ran + 1
    for _ in range(3):  # the same question at the same block: answered, not run
        assert chain.is_app_allowed(info, at=head) == (True, "")
    assert evm.calls_executed == ran + 1
    # one byte of the call changed (another instance): run afresh
    other = boot_info(app_id, h, instance_id=b"\x02" * 20)
    assert chain.is_app_allowed(other, at=head) == (True, "")
    assert evm.calls_executed == ran + 2
    # a change mined since: the new head runs afresh and sees it; the old block still answers as it was
    chain.retire_instance(app_id, b"\x01" * 20)
    new_head = chain.checked_head()
    assert new_head.hash != head.hash
    ok, reason = chain.is_app_allowed(info, at=new_head)
    assert ok is False and reason, reason
    assert evm.calls_executed == ran + 3
    assert chain.is_app_allowed(info, at=head) == (True, "")  # the kept answer of the older block
    evm._calls_at.clear()
    assert chain.is_app_allowed(info, at=head) == (True, "")  # ... is what the EVM answers there
    assert chain.is_app_allowed(info, at=new_head)[0] is False
    # by number, or at the head (latest), nothing is kept: each runs
    ran = evm.calls_executed
    chain.is_app_allowed(info, at=new_head.number)
    chain.is_app_allowed(info, at=new_head.number)
    assert evm.calls_executed == ran + 2


def _mock_endpoint(answer_batch: Any) -> tuple[Any, list[Any]]:
    """A ChainConnection over HttpTransport whose endpoint (httpx.MockTransport) answers single calls as a
    chain with id 1 and a batch with `answer_batch(payload)`; the payloads it received."""
    import httpx

    from teecloud.chain.connection import ChainConnection
    from teecloud.chain.transport import HttpTransport

    seen: list[Any] = []
    head = {"number": "0x64", "hash": "0x" + "aa" * 32, "parentHash": "0x" + "99" * 32}

    def handle(request: httpx.Request) -> httpx.Response:
        import json

        payload = json.loads(request.content)
        seen.append(payload)
        if isinstance(payload, list):
            return httpx.Response(200, json=answer_batch(payload))
        result = "0x1" if payload["method"] == "eth_chainId" else head
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": payload["id"], "result": result})

    transport = HttpTransport("http://127.0.0.1:9")
    transport._http = httpx.Client(transport=httpx.MockTransport(handle))
    transport._plain = None  # through the httpx client above, not the http.client fast path
    return ChainConnection(transport, chain_id=1), seen


def _answers(payload: list[Any], chain_id: str = "0x1") -> list[Any]:
    head = {"number": "0x64", "hash": "0x" + "aa" * 32, "parentHash": "0x" + "99" * 32}
    results = {"eth_chainId": chain_id, "eth_getBlockByNumber": head}
    return [{"jsonrpc": "2.0", "id": c["id"], "result": results[c["method"]]} for c in payload]


def test_the_head_and_the_chain_id_are_read_in_one_http_request_strictly() -> None:
    """checked_head over HTTP: one JSON-RPC batch (eth_chainId, eth_getBlockByNumber), answers matched by
    id (in any order); another chain id, a missing, doubled or foreign id, or an error object fails the
    read (the gate then refuses); an endpoint without batches is asked one call at a time."""
    from teecloud.chain.errors import WrongChainId

    conn, seen = _mock_endpoint(lambda p: list(reversed(_answers(p))))
    seen.clear()
    head = conn.checked_head()
    assert head.number == 100 and head.hash == "0x" + "aa" * 32
    assert len(seen) == 1 and [c["method"] for c in seen[0]] == ["eth_chainId", "eth_getBlockByNumber"]

    conn, _ = _mock_endpoint(lambda p: _answers(p, chain_id="0x2"))
    with pytest.raises(WrongChainId):
        conn.checked_head()
    gate = ChainGate(KmsAuth(conn, "0x" + "22" * 20), block_number=conn.checked_head)
    with pytest.raises(PeerRejected, match="failing closed"):
        gate.app_allowed(boot_info("0x" + "11" * 20, rand32()))

    def doubled(p: list[Any]) -> list[Any]:
        a = _answers(p)
        return [a[0], a[0]]

    def foreign(p: list[Any]) -> list[Any]:
        a = _answers(p)
        a[1]["id"] = a[1]["id"] + 7
        return a

    def error(p: list[Any]) -> list[Any]:
        a = _answers(p)
        a[1] = {"jsonrpc": "2.0", "id": a[1]["id"], "error": {"code": -32000, "message": "no"}}
        return a

    def text_id(p: list[Any]) -> list[Any]:
        a = _answers(p)
        a[0]["id"] = str(a[0]["id"])
        return a

    for bad in (lambda p: _answers(p)[:1], doubled, foreign, error, text_id, lambda p: [*_answers(p), 1]):
        conn, _ = _mock_endpoint(bad)
        with pytest.raises(ChainError):
            conn.checked_head()

    # no batch support (one error object for the batch): one call at a time, from then on
    conn, seen = _mock_endpoint(
        lambda p: {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "x"}}
    )
    seen.clear()
    assert conn.checked_head().number == 100
    assert conn.checked_head().number == 100
    assert [type(x).__name__ for x in seen] == ["list", "dict", "dict", "dict", "dict"]
