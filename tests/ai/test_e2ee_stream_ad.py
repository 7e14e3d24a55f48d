"""A streamed answer's per-event associated data (teecloud.ai.e2ee._StreamAd, AI round 8) is byte for byte
the RFC 8785 bytes `_ad` makes, for every model name (quotes, backslashes, the key names themselves,
non-ASCII), algorithm, seq (0 to 2**53 - 1) and final; outside that range it falls back to `_ad`; and a
sealed stream still refuses reordered, dropped, truncated and foreign events."""

from __future__ import annotations

import os

import pytest

from teecloud.ai.e2ee import ALG_K256, ALG_X25519, ClientSession, ServerKey, _ad, _StreamAd
from teecloud.ai.errors import EnvelopeRejected, MalformedInput

MODELS = [
    "tiny-llama",
    "",
    'a "quoted" \\ model',
    '"final":false,"seq":9007199254740991',
    "ünïcödé \u2028 \x01",
    "x" * 500,
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("alg", [ALG_X25519, ALG_K256])
def test_the_per_event_bytes_are_jcs_of_the_whole(model: str, alg: str) -> None:
    epk, nonce = os.urandom(33 if alg == ALG_K256 else 32), os.urandom(12)
    make = _StreamAd(model, 1_700_000_000, epk, nonce, alg)
    for seq in [0, 1, 9, 10, 99, 100, 12345, 2**31, 2**53 - 1]:
        for final in (False, True):
            assert make(seq, final) == _ad(
                model, "response-stream", 1_700_000_000, epk, nonce, (seq, final), alg=alg
            )


def test_outside_the_range_it_is_made_whole() -> None:
    epk, nonce = os.urandom(32), os.urandom(12)
    make = _StreamAd("m", 5, epk, nonce, ALG_X25519)
    assert make(-1, True) == _ad("m", "response-stream", 5, epk, nonce, (-1, True))
    for ad in (make, lambda seq, final: _ad("m", "response-stream", 5, epk, nonce, (seq, final))):
        with pytest.raises(MalformedInput):  # beyond JSON's safe integers: refused alike
            ad(2**53, True)


def test_a_sealed_stream_still_refuses_reordering_truncation_and_another_request() -> None:
    server = ServerKey(os.urandom(32))
    client = ClientSession(server.public_key, "m", now=100)
    opened = server.open_request(client.seal_request(b"{}"), model="m", now=100)
    events = [server.seal_stream_event(opened, i, b"data: %d\n\n" % i, final=i == 2) for i in range(3)]
    assert client.open_stream_event(events[0], 0) == (b"data: 0\n\n", False)
    with pytest.raises(EnvelopeRejected):  # dropped: event 2 where 1 was due
        client.open_stream_event(events[2], 1)
    forged = {**events[1], "final": True}  # truncation: a middle event claimed final
    with pytest.raises(EnvelopeRejected):
        client.open_stream_event(forged, 1)
    forged = {**events[1], "seq": 0}  # replayed at another position
    with pytest.raises(EnvelopeRejected):
        client.open_stream_event(forged, 0)
    other = ClientSession(server.public_key, "m", now=100)  # another request's session
    with pytest.raises(EnvelopeRejected):
        other.open_stream_event(events[1], 1)
    assert client.open_stream_event(events[1], 1) == (b"data: 1\n\n", False)
    assert client.open_stream_event(events[2], 2) == (b"data: 2\n\n", True)
