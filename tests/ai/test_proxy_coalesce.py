"""The verifying proxy's upstream reader (teecloud.ai.proxy._coalesced): pieces read ahead go on joined in
one write, a lone piece at once, in order and byte for byte; errors reach the reading side; read-ahead is
bounded; leaving early stops the reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from teecloud.ai.proxy import _COALESCE_DEPTH, _coalesced


def test_leaving_at_the_first_piece_ends_the_source() -> None:
    async def run() -> bool:
        closed = False

        async def upstream() -> AsyncIterator[bytes]:
            nonlocal closed
            try:
                yield b"data: 0\n\n"
                yield b"data: 1\n\n"
            finally:
                closed = True

        reader = _coalesced(upstream())
        assert await reader.__anext__() == b"data: 0\n\n"
        await reader.aclose()
        return closed

    assert asyncio.run(run())


def test_pieces_read_ahead_are_joined_and_a_lone_piece_goes_at_once() -> None:
    async def run() -> list[bytes]:
        more = asyncio.Event()

        async def upstream() -> AsyncIterator[bytes]:
            for i in range(5):  # one read of the network brought five events
                yield b"data: %d\n\n" % i
            await more.wait()  # the network again
            yield b"data: 5\n\n"
            yield b"data: 6\n\n"

        out: list[bytes] = []
        async for piece in _coalesced(upstream()):
            out.append(piece)
            if len(out) == 2:
                more.set()
        return out

    out = asyncio.run(run())
    # The first piece (the first token) goes on at once, read before the reader task starts; the pieces
    # of the same read behind it are joined, and so are those of the next read.
    assert out == [
        b"data: 0\n\n",
        b"".join(b"data: %d\n\n" % i for i in range(1, 5)),
        b"data: 5\n\ndata: 6\n\n",
    ]


def test_each_piece_goes_on_as_soon_as_it_is_read() -> None:
    async def run() -> list[tuple[bytes, int]]:
        step = 0

        async def upstream() -> AsyncIterator[bytes]:
            nonlocal step
            for i in range(3):
                step = i
                yield b"%d" % i
                await asyncio.sleep(0.01)  # nothing else read yet: the piece must not wait for the next

        return [(piece, step) async for piece in _coalesced(upstream())]

    assert asyncio.run(run()) == [(b"0", 0), (b"1", 1), (b"2", 2)]


def test_an_upstream_error_reaches_the_reader_after_the_pieces_before_it() -> None:
    async def run() -> tuple[list[bytes], BaseException | None]:
        async def upstream() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"
            raise httpx.ReadError("connection reset")

        got: list[bytes] = []
        try:
            async for piece in _coalesced(upstream()):
                got.append(piece)
        except httpx.ReadError as exc:
            return got, exc
        return got, None

    got, exc = asyncio.run(run())
    assert b"".join(got) == b"ab" and isinstance(exc, httpx.ReadError)


def test_read_ahead_is_bounded_and_leaving_early_stops_the_reader() -> None:
    async def run() -> tuple[int, bool]:
        produced, closed = 0, False

        async def upstream() -> AsyncIterator[bytes]:
            nonlocal produced, closed
            try:
                for _ in range(10 * _COALESCE_DEPTH):
                    produced += 1
                    yield b"x"
            finally:
                closed = True

        reader = _coalesced(upstream())
        first = await reader.__anext__()  # the first piece, read before the reader task starts
        assert first
        assert await reader.__anext__()  # the client takes one more write, then stops reading
        for _ in range(50):
            await asyncio.sleep(0)
        at_most = produced
        await reader.aclose()
        await asyncio.sleep(0)
        return at_most, closed

    at_most, closed = asyncio.run(run())
    assert at_most <= 2 * _COALESCE_DEPTH + 2
    assert closed


@pytest.mark.parametrize("n", [1, 7, 300])
def test_every_byte_in_order(n: int) -> None:
    async def run() -> bytes:
        async def upstream() -> AsyncIterator[bytes]:
            for i in range(n):
                yield b"%05d," % i
                if i % 3 == 0:
                    await asyncio.sleep(0)

        return b"".join([p async for p in _coalesced(upstream())])

    assert asyncio.run(run()) == b"".join(b"%05d," % i for i in range(n))
