"""Review 10: the DkgBoard listener over HTTP (a dealer on a real listener, `teecloud._serve` limits):
malformed, oversized and unauthenticated posts are a client error (400/403/413/422), never a 500, and a
well-formed post without the caller's RA-TLS certificate is refused before the board is read."""

from __future__ import annotations

import json

import httpx
import pytest

from teecloud.kms import api
from teecloud.kms.server import KmsServer

GOOD = {"session": "ab" * 16, "index": 1, "board_token": "cd" * 32, "complaints": [2]}


@pytest.mark.slow
def test_malformed_or_oversized_board_posts_are_client_errors(dealers: dict[int, KmsServer]) -> None:
    server = dealers[1]
    bodies: list[bytes] = [
        b"",
        b"{",
        b"[]",
        b"null",
        json.dumps({**GOOD, "complaints": list(range(1, 100_000))}).encode(),
        json.dumps({**GOOD, "complaints": [[1]] * 10}).encode(),
        b'{"session": "' + b"ab" * 16 + b'", "index": 1' + b"0" * 5000 + b"}",  # a 5000-digit index
        json.dumps({**GOOD, "session": "ab" * 100_000}).encode(),
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"\xff\xfe" * 1000,
        json.dumps({**GOOD, "confirm": None, "complaints": None}).encode(),  # a read, unauthenticated
        json.dumps(GOOD).encode(),
    ]
    with httpx.Client(verify=False, timeout=30) as http:
        for body in bodies:
            r = http.post(
                server.url + api.PATH_DKG_BOARD, content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code in (400, 403, 413, 422), (body[:60], r.status_code, r.text[:200])
    # a refusal of the well-formed ones is the board's rule: no round here, and no attested caller
    denied = [rec for rec in server.service.audit.read() if rec.endpoint == api.PATH_DKG_BOARD]
    assert denied and all(rec.decision == "denied" for rec in denied)
