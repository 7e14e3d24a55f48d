"""The pieces the verifying proxy passes on (teecloud.ai._upstream.UpstreamResponse.aiter_raw, read by the
proxy's stream directly since AI round 8): every chunk one read of the upstream brought goes on joined in one
piece (a proxy that fell behind catches up in one write), a lone chunk at once (nothing waits for more),
every byte in order whatever the chunking and the reads."""

from __future__ import annotations

import asyncio
import random

import pytest

from teecloud.ai._upstream import UpstreamClient
from tests.ai.test_upstream_client import _SSE_HEAD, Scripted, _read_request, run


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_the_chunks_of_one_read_go_on_joined_and_a_lone_chunk_at_once() -> None:
    got_first, got_lone = asyncio.Event(), asyncio.Event()

    async def script(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        # The head and five events in one write: one read of the client brings them all.
        writer.write(_SSE_HEAD + b"\r\n" + b"".join(_chunk(b"data: %d\n\n" % i) for i in range(5)))
        await writer.drain()
        await got_first.wait()
        writer.write(_chunk(b"data: 5\n\n"))  # a lone event: passed on before anything else comes
        await writer.drain()
        await got_lone.wait()
        writer.write(_chunk(b"data: 6\n\n") + _chunk(b"data: 7\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Scripted(script) as srv:
            client = UpstreamClient(srv.url)
            resp = await client.post("/v1/x", b"{}", {})
            pieces = []
            async for piece in resp.aiter_raw():
                pieces.append(piece)
                (got_first if len(pieces) == 1 else got_lone).set()
            assert pieces == [
                b"".join(b"data: %d\n\n" % i for i in range(5)),
                b"data: 5\n\n",
                b"data: 6\n\ndata: 7\n\n",
            ]
            assert len(client._idle) == 1  # ended cleanly: the connection is kept

    run(main())


@pytest.mark.parametrize("seed", range(6))
def test_every_byte_in_order_whatever_the_chunks_and_the_writes(seed: int) -> None:
    rng = random.Random(seed)
    events = [b"data: %d %s\n\n" % (i, b"x" * rng.randrange(0, 300)) for i in range(200)]
    body = b"".join(events)
    framed, at = b"", 0
    while at < len(body):  # chunks that do not follow the events
        size = rng.randrange(1, 700)
        framed += _chunk(body[at : at + size])
        at += size
    framed += b"0\r\n\r\n"

    async def script(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _answer in range(2):
            await _read_request(reader)
            writer.write(_SSE_HEAD + b"\r\n")
            at = 0
            while at < len(framed):  # writes that do not follow the chunks
                size = rng.randrange(1, 2000)
                writer.write(framed[at : at + size])
                await writer.drain()
                at += size
                if rng.random() < 0.3:
                    await asyncio.sleep(0.001)
        await reader.read()

    async def main() -> None:
        async with Scripted(script) as srv:
            client = UpstreamClient(srv.url)
            for _ in range(2):  # the kept connection serves the next answer alike
                resp = await client.post("/v1/x", b"{}", {})
                pieces = [p async for p in resp.aiter_raw()]
                assert all(pieces) and b"".join(pieces) == body
            assert srv.connections == 1

    run(main())
