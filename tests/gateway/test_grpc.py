"""`g` names through real HAProxy: a real gRPC client (grpcio, TLS validating the dev CA) reaches a gRPC
server that speaks HTTP/2 cleartext (h2c) behind the gateway; the plain (HTTP/1.1) name does not reach it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from teecloud.gateway.routing import Route
from tests.gateway.conftest import APP, BASE, INST1, Gateway

METHOD = "/teecloud.test.Echo/Echo"


@pytest.fixture
def grpc_backend() -> Iterator[tuple[int, list[bytes]]]:
    seen: list[bytes] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(request)
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "teecloud.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")  # h2c: what `g` names speak to the CVM
    server.start()
    yield port, seen
    server.stop(grace=None)


def call(gw: Gateway, host: str, payload: bytes) -> bytes:
    creds = grpc.ssl_channel_credentials(root_certificates=gw.ca.cert_pem.encode())
    options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
    with grpc.secure_channel(f"127.0.0.1:{gw.port}", creds, options=options) as channel:
        rpc = channel.unary_unary(METHOD)
        return bytes(rpc(payload, timeout=10))


def test_grpc_name_reaches_an_h2c_backend(gateway: Gateway, grpc_backend: tuple[int, list[bytes]]) -> None:
    port, seen = grpc_backend
    gateway.driver.apply([Route(APP, INST1, 50051, f"127.0.0.1:{port}")])
    assert call(gateway, f"{APP}-50051g.{BASE}", b"hello") == b"echo:hello"
    assert call(gateway, f"{INST1}-50051g.{BASE}", b"pinned") == b"echo:pinned"
    assert seen == [b"hello", b"pinned"]
    # the plain name forwards HTTP/1.1, which a gRPC server does not speak: no RPC reaches it
    with pytest.raises(grpc.RpcError):
        call(gateway, f"{APP}-50051.{BASE}", b"h1")
    # an unregistered port: refused by the gateway, nothing forwarded
    with pytest.raises(grpc.RpcError) as exc:
        call(gateway, f"{APP}-50052g.{BASE}", b"nobody")
    assert exc.value.code() != grpc.StatusCode.OK
    gateway.driver.apply([])
    with pytest.raises(grpc.RpcError):
        call(gateway, f"{APP}-50051g.{BASE}", b"gone")
    assert seen == [b"hello", b"pinned"]
