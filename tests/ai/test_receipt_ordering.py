"""The receipt's write ordering on the answer path: the answer's last bytes do not wait for the receipt log's
fsyncs, but a receipt is served (`/v1/receipts/{id}`, `/v1/signature/{id}`) only once its append is durable,
and a receipt whose append failed is never served; the verifying proxy then refuses to complete the answer.
The log's own ordering: an id's line never outlives a failed or crashed append to shift later receipts."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from teecloud.ai import receiptlog
from teecloud.ai._http import Listener
from teecloud.ai.receiptlog import ReceiptLog, leaf_hash, verify_inclusion
from teecloud.ai.receipts import ReceiptBody, SignedReceipt, sign_receipt
from teecloud.ai.server import InferenceConfig, make_inference_app
from tests.ai._keys import app_keys
from tests.ai.conftest import MODEL_ID, Stack

_CHUNK = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "t"}}]}


def synthetic_engine() -> FastAPI:
    """A stand-in for the engine (not a model): three OpenAI-shaped chunks, then [DONE]."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {}}]}

        async def gen() -> Any:
            for _ in range(3):
                yield b"data: " + json.dumps(_CHUNK).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


class GatedLog:
    """Wraps a ReceiptLog's append: it blocks until `gate` is set, then appends (or raises, if told to)."""

    def __init__(self, log: ReceiptLog, *, fail: bool = False) -> None:
        self.real = log.append
        self.gate = threading.Event()
        self.fail = fail
        self.durable: set[str] = set()
        log.append = self.append  # type: ignore[method-assign]

    def append(self, receipt: Any) -> int:
        assert self.gate.wait(20)
        if self.fail:
            raise OSError(28, "No space left on device")
        index = self.real(receipt)
        self.durable.add(receipt.body.id)
        return index


@pytest.fixture()
def engine() -> Iterator[Listener]:
    with Listener(synthetic_engine(), name="test-synthetic-engine") as e:
        yield e


def logged_bytes(directory: Path) -> bytes:
    path = directory / "receipts.jsonl"
    return path.read_bytes() if path.exists() else b""


def front_on(engine_url: str, home: Path, keys: Any, quote: Any) -> tuple[FastAPI, Any]:
    app = make_inference_app(InferenceConfig(MODEL_ID, bytes(32), engine_url, home / "receipts"), keys, quote)
    return app, app.state.front


def no_quote(report_data: bytes) -> dict[str, str]:
    raise AssertionError("no quote in these tests")


BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def stream_all(url: str) -> tuple[str, list[str]]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=BODY | {"stream": True}, timeout=10) as r:
        assert r.status_code == 200
        return r.headers["x-receipt-id"], [line for line in r.iter_lines() if line]


def get_later(url: str, seen: dict[str, Any], log: GatedLog, rid: str) -> threading.Thread:
    def run() -> None:
        resp = httpx.get(url, timeout=30)
        seen["status"], seen["durable_when_answered"] = resp.status_code, rid in log.durable
        seen["json"] = resp.json()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("route", ["/v1/receipts/{}", "/v1/signature/{}"])
def test_answer_ends_before_the_fsyncs_and_the_receipt_is_served_only_once_durable(
    engine: Listener, tmp_path: Path, route: str
) -> None:
    app, front = front_on(engine.url, tmp_path, app_keys(), no_quote)
    gated = GatedLog(front.log)
    with Listener(app, name="test-ai-front") as f:
        # The whole answer, [DONE] and the end of the stream included, while the append is held back.
        rid, lines = stream_all(f.url)
        assert lines[-1] == "data: [DONE]" and len(lines) == 4
        assert rid in front.pending and rid not in gated.durable
        seen: dict[str, Any] = {}
        t = get_later(f.url + route.format(rid), seen, gated, rid)
        t.join(0.5)
        assert t.is_alive() and not seen, "the receipt route answered before the receipt was durable"
        assert rid.encode() not in logged_bytes(tmp_path / "receipts")
        gated.gate.set()
        t.join(10)
        assert seen["status"] == 200 and seen["durable_when_answered"], seen
        assert rid.encode() in logged_bytes(tmp_path / "receipts")
        assert rid not in front.pending
        if route.startswith("/v1/receipts"):
            assert seen["json"]["receipt"]["body"]["id"] == rid and seen["json"]["leaf_index"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_receipt_whose_append_failed_is_never_served(
    engine: Listener, tmp_path: Path, stream: bool
) -> None:
    app, front = front_on(engine.url, tmp_path, app_keys(), no_quote)
    gated = GatedLog(front.log, fail=True)
    gated.gate.set()
    with Listener(app, name="test-ai-front") as f:
        if stream:
            rid, _ = stream_all(f.url)
        else:
            resp = httpx.post(f.url + "/v1/chat/completions", json=BODY, timeout=10)
            assert resp.status_code == 200
            rid = resp.headers["x-receipt-id"]
        for route in ("/v1/receipts/{}", "/v1/signature/{}"):
            resp = httpx.get(f.url + route.format(rid), timeout=10)
            assert resp.status_code == 503 and resp.json()["error"]["type"] == "receipt_unavailable"
        assert len(front.log) == 0 and rid not in front.pending


@pytest.mark.slow
@pytest.mark.parametrize("receipts", ["inline", "fetch"])
def test_proxy_refuses_to_complete_an_answer_whose_receipt_was_not_logged(
    stack: Stack, engine: Listener, tmp_path: Path, receipts: str
) -> None:
    app, front = front_on(engine.url, tmp_path, stack.keys, stack.quote)
    gated = GatedLog(front.log, fail=True)
    gated.gate.set()
    with Listener(app, name="test-ai-front") as f, stack.proxy(f.url, e2ee=False, receipts=receipts) as p:
        _, lines = stream_all(p.url)
        assert "data: [DONE]" not in lines
        err = json.loads(lines[-1].removeprefix("data: "))
        # Inline: the front sends no receipt it could not log; fetched: the receipt route answers 503.
        why = "without its inline receipt" if receipts == "inline" else "503"
        assert "receipt:" in err["error"]["message"] and why in err["error"]["message"], err
        # The content before the failure passed on as it came; only the success terminator is withheld.
        assert sum('"content"' in line for line in lines) == 3


# ------------------------------------------------------------------------ the log's own write ordering


def signed(keys: Any, rid: str) -> Any:
    h = hashlib.sha256(rid.encode()).digest()
    body = ReceiptBody(rid, keys.keyset.app_id, keys.keyset.digest(), "m", h, h, h, False, False, 1, 2)
    return sign_receipt(body, keys.signing_secret, keys.keyset)


def assert_mapped(log: ReceiptLog, rids: list[str]) -> None:
    """Every id maps to its own leaf, and that leaf's inclusion proof verifies under the log's root."""
    for i, rid in enumerate(rids):
        found = log.get(rid)
        assert found is not None and found[1] == i, (rid, found)
        size, proof, root = log.proof(i)
        body_hash = SignedReceipt.from_json(found[0]).body.body_sha256()
        assert verify_inclusion(leaf_hash(body_hash), i, size, proof, root)


def test_an_index_line_left_by_a_crash_before_its_leaf_does_not_shift_later_receipts(tmp_path: Path) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path)
    log.append(signed(keys, "r0"))
    log.append(signed(keys, "r1"))
    # The crash: the receipt's line and its index line are durable, its leaf is not.
    lost = json.dumps(signed(keys, "lost").to_json(), separators=(",", ":")).encode() + b"\n"
    end = (tmp_path / "receipts.jsonl").stat().st_size
    with open(tmp_path / "receipts.jsonl", "ab") as f:
        f.write(lost)
    with open(tmp_path / "index.txt", "a") as f:
        f.write(f"lost {end} {len(lost)}\n")
    log = ReceiptLog(tmp_path)
    assert log.get("lost") is None and (tmp_path / "receipts.jsonl").stat().st_size == end
    log.append(signed(keys, "r2"))
    log = ReceiptLog(tmp_path)
    assert log.get("lost") is None
    assert_mapped(log, ["r0", "r1", "r2"])


@pytest.mark.parametrize("torn", ["receipts.jsonl", "index.txt", "leaves.bin"])
def test_a_write_torn_by_a_crash_is_cut_back_on_open(tmp_path: Path, torn: str) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path)
    log.append(signed(keys, "r0"))
    sizes = {name: (tmp_path / name).stat().st_size for name in ("receipts.jsonl", "index.txt", "leaves.bin")}
    with open(tmp_path / torn, "ab") as f:  # part of the next append's first, second or third write
        f.write(
            b'{"body":{"id":"r1"'
            if torn == "receipts.jsonl"
            else b"r1 4"
            if torn == "index.txt"
            else b"\x07" * 9
        )
    log = ReceiptLog(tmp_path)
    assert {name: (tmp_path / name).stat().st_size for name in sizes} == sizes
    log.append(signed(keys, "r1"))
    assert_mapped(ReceiptLog(tmp_path), ["r0", "r1"])


@pytest.mark.parametrize("call", ["pwrite", "fsync"])
@pytest.mark.parametrize("fails", [1, 2, 3])
def test_a_failed_receipt_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, fails: int
) -> None:
    """The disk fills during the append's first, second or third write (half of it written), or an fsync
    fails: every file is taken back, and the log goes on."""
    keys = app_keys()
    log = ReceiptLog(tmp_path)
    log.append(signed(keys, "r0"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_pwrite, real_fsync = os.pwrite, os.fsync
    calls = 0

    def pwrite(fd: int, data: bytes, at: int) -> int:
        nonlocal calls
        calls += 1
        if call == "pwrite" and calls == fails:
            real_pwrite(fd, data[: len(data) // 2], at)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, at)

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if call == "fsync" and calls == 3 + fails:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(receiptlog.os, "pwrite", pwrite)
    monkeypatch.setattr(receiptlog.os, "fsync", fsync)
    with pytest.raises(OSError):
        log.append(signed(keys, "r1"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and len(log) == 1
    assert log.get("r1") is None
    log.append(signed(keys, "r2"))
    assert_mapped(ReceiptLog(tmp_path), ["r0", "r2"])


def test_a_damaged_log_is_refused_on_open(tmp_path: Path) -> None:
    """More than a crash can leave: refused, not cut back (that would drop receipts a head already named)."""
    keys = app_keys()
    log = ReceiptLog(tmp_path)
    for rid in ("r0", "r1", "r2"):
        log.append(signed(keys, rid))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    index, data = files["index.txt"], files["receipts.jsonl"]
    first = index.split(b"\n")[0] + b"\n"
    for name, damaged in (
        ("index.txt", first),  # two leaves without their index lines
        ("index.txt", index.replace(b"r1 ", b"r0 ")),  # an id twice
        ("index.txt", index.replace(b" 0 ", b" 1 ")),  # a gap
        ("index.txt", index.replace(b"r1 ", b"r1  ")),  # a malformed line
        ("receipts.jsonl", data[: len(data) // 2]),  # two receipts lost
        ("receipts.jsonl", data.replace(b'"r2"', b'"r9"')),  # the last receipt is not its leaf's
        ("leaves.bin", files["leaves.bin"][:32]),  # two leaves lost
    ):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(RuntimeError, match="damaged"):
            ReceiptLog(tmp_path)
        (tmp_path / name).write_bytes(files[name])
    assert_mapped(ReceiptLog(tmp_path), ["r0", "r1", "r2"])


@pytest.mark.parametrize("durable", ["leaves.bin", "index.txt", "receipts.jsonl", "index.txt+leaves.bin"])
def test_an_append_cut_short_by_a_crash_is_cut_back_whatever_reached_the_disk(
    tmp_path: Path, durable: str
) -> None:
    """The three writes are fsynced together, so a crash may leave any of them without the others."""
    keys = app_keys()
    log = ReceiptLog(tmp_path)
    log.append(signed(keys, "r0"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    log.append(signed(keys, "r1"))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in before:
        if name not in durable.split("+"):
            (tmp_path / name).write_bytes(before[name])
    log = ReceiptLog(tmp_path)
    assert log.get("r1") is None and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert after != before
    log.append(signed(keys, "r2"))
    assert_mapped(ReceiptLog(tmp_path), ["r0", "r2"])


def test_a_log_in_the_earlier_layout_is_converted(tmp_path: Path) -> None:
    """receipts/<id>.json + order.txt + leaves.bin, as written before: the same receipts at the same leaves,
    an order line whose leaf never came dropped; appends continue the same tree."""
    keys = app_keys()
    receipts = [signed(keys, f"r{i}") for i in range(3)]
    (tmp_path / "receipts").mkdir()
    for r in receipts:
        (tmp_path / "receipts" / f"{r.body.id}.json").write_text(json.dumps(r.to_json()))
    (tmp_path / "order.txt").write_text("r0\nr1\nr2\nlost\n")
    (tmp_path / "leaves.bin").write_bytes(b"".join(leaf_hash(r.body.body_sha256()) for r in receipts))
    log = ReceiptLog(tmp_path)
    assert_mapped(log, ["r0", "r1", "r2"])
    assert log.get("lost") is None
    log.append(signed(keys, "r3"))
    reopened = ReceiptLog(tmp_path)
    assert_mapped(reopened, ["r0", "r1", "r2", "r3"])
    assert SignedReceipt.from_json(reopened.get("r1")[0]) == receipts[1]  # type: ignore[index]
