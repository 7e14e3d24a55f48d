"""Append-only Merkle log of receipts (RFC 9162 §2.1 hashing, inclusion proofs and their verification) and
signed tree heads, so a provider cannot deny or rewrite an answer it gave.

    leaf_hash  = sha256(0x00 ‖ sha256(JCS(receipt body)))        (the leaf data is the body hash)
    node hash  = sha256(0x01 ‖ left ‖ right)
    tree head  = {"version", "app_id", "tree_size", "root_hash", "timestamp_ms"}, signed like a receipt:
                 keccak256("teecloud-ai-tree-head:" ‖ sha256(JCS(tree head))) by the receipt-signing key

Consistency proofs (RFC 9162 §2.1.4) show a later tree extends an earlier one: a client that remembers a
head detects a log that was rewritten or forked.

`ReceiptLog` keeps the receipts, an index of them and the leaf hashes in three append-only files (the
receipt durable before its leaf; see its docstring). `verify_inclusion` is pure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils.crypto import keccak

from teecloud._fs import atomic_write
from teecloud.ai._fields import get_hex, get_int, get_obj
from teecloud.ai._jcs import jcs_sha256
from teecloud.ai.errors import AiError, MalformedInput, ReceiptInvalid
from teecloud.ai.receipts import MAX_RECEIPT_BYTES, SignedReceipt
from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import recover_k256, sign_k256_recoverable

__all__ = [
    "ReceiptLog",
    "TreeHead",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "verify_consistency",
    "verify_inclusion",
]

_TREE_HEAD_DOMAIN = b"teecloud-ai-tree-head:"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def leaf_hash(body_sha256: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + body_sha256).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 §2.1.1 over leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    # Bottom-up pairing gives the same tree as the recursive definition (left subtrees are full).
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1."""
    if not 0 <= index < len(leaves):
        raise ValueError("leaf index out of range")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(leaves[:k], index), merkle_root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), merkle_root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: True iff `proof` shows `leaf` at `index` of the tree of `tree_size` with `root`."""
    if not 0 <= index < tree_size or any(len(p) != 32 for p in proof):
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


class _Tree:
    """Every complete (perfect, aligned) subtree root, level by level, kept as leaves arrive: the root of a
    tree of any size and an inclusion proof in it take O(log² n) hashes instead of O(n)."""

    def __init__(self) -> None:
        self.levels: list[list[bytes]] = [[]]

    def append(self, leaf: bytes) -> None:
        self.levels[0].append(leaf)
        k = 0
        while len(self.levels[k]) % 2 == 0:
            if len(self.levels) == k + 1:
                self.levels.append([])
            self.levels[k + 1].append(_node(self.levels[k][-2], self.levels[k][-1]))
            k += 1

    def root(self, start: int, size: int) -> bytes:
        """MTH of leaves[start:start+size]; `start` is a multiple of the largest power of two <= size."""
        if size == 0:
            return hashlib.sha256(b"").digest()
        if size & (size - 1) == 0:
            level = size.bit_length() - 1
            return self.levels[level][start >> level]
        k = _split(size)
        return _node(self.root(start, k), self.root(start + k, size - k))

    def consistency(self, m: int, start: int, size: int, whole: bool = True) -> list[bytes]:
        """SUBPROOF(m, leaves[start:start+size], whole) of RFC 9162 §2.1.4.1."""
        if m == size:
            return [] if whole else [self.root(start, size)]
        k = _split(size)
        if m <= k:
            return [*self.consistency(m, start, k, whole), self.root(start + k, size - k)]
        return [*self.consistency(m - k, start + k, size - k, False), self.root(start, k)]

    def path(self, index: int, start: int, size: int) -> list[bytes]:
        """PATH(index, leaves[start:start+size]) (RFC 9162 §2.1.3.1), index relative to start."""
        if size == 1:
            return []
        k = _split(size)
        if index < k:
            return [*self.path(index, start, k), self.root(start + k, size - k)]
        return [*self.path(index - k, start + k, size - k), self.root(start, k)]


def verify_consistency(
    first_size: int, second_size: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: True iff the tree of `second_size` with `second_root` extends the tree of
    `first_size` with `first_root` (nothing in the first was changed or removed)."""
    if not 0 < first_size <= second_size or any(len(p) != 32 for p in proof):
        return False
    if first_size == second_size:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first_size & (first_size - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first_size - 1, second_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


@dataclass(frozen=True)
class TreeHead:
    app_id: bytes
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {
            "version": 1,
            "app_id": self.app_id.hex(),
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp_ms": self.timestamp_ms,
        }

    def digest(self) -> bytes:
        return keccak(_TREE_HEAD_DOMAIN + jcs_sha256(self.body()))

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: Any) -> TreeHead:
        obj = get_obj(value, "tree head")
        if obj.get("version") != 1 or set(obj) != {*cls(b"", 0, b"", 0).body(), "signature"}:
            raise MalformedInput("not a version 1 tree head")
        return cls(
            app_id=get_hex(obj, "app_id", size=20),
            tree_size=get_int(obj, "tree_size"),
            root_hash=get_hex(obj, "root_hash", size=32),
            timestamp_ms=get_int(obj, "timestamp_ms"),
            signature=get_hex(obj, "signature", size=65),
        )

    def verify(self, signing_public_key: bytes) -> None:
        try:
            signer = recover_k256(self.digest(), self.signature)
        except KeysError as exc:
            raise ReceiptInvalid(str(exc), step="tree_head") from exc
        if signer != signing_public_key:
            raise ReceiptInvalid("the tree head is not signed by the key set's signing key", step="tree_head")


class ReceiptLog:
    """The app's receipt store and Merkle log on its (encrypted) volume. Thread-safe; append-only.

    Three append-only files:
        receipts.jsonl  each receipt as one line of compact JSON, in log order
        index.txt       one line per receipt: "<id> <offset> <length>" into receipts.jsonl
        leaves.bin      the leaf hashes, 32 bytes each
    An append writes all three, then fsyncs them side by side: it waits for about one flush instead of two
    in sequence (before: a new file per receipt, fsynced beside its id's line, then the leaf).
    The log is what all three hold. On open, whatever a crash left of the one append in flight (any of its
    three writes, whole or torn) is cut back, and the last entry's leaf must be its receipt's; no tree head
    can name a cut entry, since heads cover only appends that returned, after their fsyncs. Anything else
    (more than one entry's difference, a malformed index line, a last leaf that is not its receipt's) is
    damage: refused, never cut. A log in the earlier layout (`receipts/<id>.json`, `order.txt`) is converted
    on open (its files stay).
    """

    def __init__(self, directory: Path, *, max_leaves: int = 10_000_000) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._leaves_path = self.dir / "leaves.bin"
        self._data_path = self.dir / "receipts.jsonl"
        self._index_path = self.dir / "index.txt"
        self._lock = threading.Lock()
        self._syncer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="receipt-log-fsync")
        self._max = max_leaves
        if not self._index_path.exists() and (self.dir / "order.txt").exists():
            self._convert_earlier_layout()
        self._index: dict[str, int] = {}
        self._spans: list[tuple[int, int]] = []  # (offset, length) in receipts.jsonl, by leaf index
        self._leaves: list[bytes] = []
        self._recover()
        self._tree = _Tree()
        for leaf in self._leaves:
            self._tree.append(leaf)

    def _damaged(self, what: str) -> RuntimeError:
        return RuntimeError(f"the receipt log in {self.dir} is damaged: {what}")

    def _recover(self) -> None:
        leaves = self._leaves_path.read_bytes() if self._leaves_path.exists() else b""
        raw = self._index_path.read_bytes() if self._index_path.exists() else b""
        size = self._data_path.stat().st_size if self._data_path.exists() else 0
        lines = raw.split(b"\n")
        lines.pop()  # after the last newline: empty, or a line torn by a crash
        spans: list[tuple[int, int]] = []
        end = 0
        for i, line in enumerate(lines):
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) != end:
                raise self._damaged(f"index line {i}")
            rid, length = parts[0].decode("ascii", "replace"), int(parts[2])
            if not _ID.match(rid) or rid in self._index:
                raise self._damaged(f"index line {i}")
            if end + length > size:
                if i < len(lines) - 1:
                    raise self._damaged("receipts.jsonl is short")
                break  # the last append's receipt bytes did not all reach the disk
            self._index[rid] = len(spans)
            spans.append((end, length))
            end += length
        n = min(len(leaves) // 32, len(spans))
        if max(len(leaves) // 32, len(lines)) > n + 1:
            raise self._damaged(
                f"{len(leaves) // 32} leaves, {len(lines)} index lines, {len(spans)} readable"
            )
        self._leaves = [leaves[i : i + 32] for i in range(0, 32 * n, 32)]
        self._spans = spans[:n]
        for rid in [r for r, i in self._index.items() if i >= n]:
            del self._index[rid]
        if n and self._leaves[-1] != self._leaf_on_disk(n - 1):
            # Only the last append can have been cut short; one before it that does not match is damage.
            raise self._damaged(f"leaf {n - 1} is not its receipt's")
        end = self._spans[-1][0] + self._spans[-1][1] if n else 0
        if len(leaves) != 32 * n:
            with open(self._leaves_path, "r+b") as f:
                f.truncate(32 * n)
        if len(raw) != sum(len(x) + 1 for x in lines[:n]):
            atomic_write(self._index_path, b"".join(x + b"\n" for x in lines[:n]))
        if size != end:
            with open(self._data_path, "r+b") as f:
                f.truncate(end)

    def _leaf_on_disk(self, index: int) -> bytes:
        offset, length = self._spans[index]
        with open(self._data_path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        try:
            return leaf_hash(SignedReceipt.from_json(json.loads(raw)).body.body_sha256())
        except (ValueError, AiError):
            return b""

    def _convert_earlier_layout(self) -> None:
        """receipts/<id>.json + order.txt (ids in log order) -> receipts.jsonl + index.txt, each written
        atomically, the index last (its presence marks the conversion done)."""
        leaves = self._leaves_path.stat().st_size // 32 if self._leaves_path.exists() else 0
        names = (self.dir / "order.txt").read_text(encoding="ascii").split()[:leaves]
        chunks, index, offset = [], [], 0
        for rid in names:
            if not _ID.match(rid):
                raise RuntimeError(f"the receipt log in {self.dir} is damaged: order.txt names {rid[:80]!r}")
            line = json.dumps(
                json.loads((self.dir / "receipts" / f"{rid}.json").read_bytes()), separators=(",", ":")
            )
            data = line.encode() + b"\n"
            chunks.append(data)
            index.append(f"{rid} {offset} {len(data)}\n".encode())
            offset += len(data)
        atomic_write(self._data_path, b"".join(chunks))
        atomic_write(self._index_path, b"".join(index))

    def __len__(self) -> int:
        return len(self._leaves)

    def append(self, receipt: SignedReceipt) -> int:
        rid = receipt.body.id
        if not _ID.match(rid):
            raise ValueError("receipt ids are 1..64 characters of [A-Za-z0-9_-]")
        data = json.dumps(receipt.to_json(), separators=(",", ":")).encode() + b"\n"
        leaf = leaf_hash(receipt.body.body_sha256())
        with self._lock:
            if rid in self._index:
                raise ValueError(f"receipt {rid} is already logged")
            if len(self._leaves) >= self._max:
                raise RuntimeError("the receipt log is full")
            offset = self._spans[-1][0] + self._spans[-1][1] if self._spans else 0
            index_size = self._index_path.stat().st_size if self._index_path.exists() else 0
            writes = [
                (self._data_path, offset, data),
                (self._index_path, index_size, f"{rid} {offset} {len(data)}\n".encode()),
                (self._leaves_path, 32 * len(self._leaves), leaf),
            ]
            fds: list[int] = []
            try:
                for path, at, chunk in writes:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
                    if os.pwrite(fds[-1], chunk, at) != len(chunk):
                        raise OSError(f"short write to {path.name}")
                # Side by side: the flushes overlap (on the development machine's disk 0.25-0.3 ms for
                # the three, against 0.35-1 ms one after another).
                synced = [self._syncer.submit(os.fsync, fd) for fd in fds[1:]]
                try:
                    os.fsync(fds[0])
                finally:
                    for future in synced:
                        future.result()
            except BaseException:  # take every file back so that they stay aligned
                for path, at, _ in writes:
                    if path.exists():
                        with open(path, "r+b") as f:
                            f.truncate(at)
                raise
            finally:
                for fd in fds:
                    os.close(fd)
            self._leaves.append(leaf)
            self._tree.append(leaf)
            self._spans.append((offset, len(data)))
            self._index[rid] = len(self._leaves) - 1
            return len(self._leaves) - 1

    def get(self, rid: str) -> tuple[dict[str, Any], int] | None:
        """(receipt JSON, leaf index) or None for an unknown or malformed id."""
        if not _ID.match(rid):
            return None
        with self._lock:
            index = self._index.get(rid)
            if index is None:
                return None
            offset, length = self._spans[index]
        if length > MAX_RECEIPT_BYTES * 4:
            raise RuntimeError(f"receipt {rid} on disk is oversized")
        with open(self._data_path, "rb") as f:
            f.seek(offset)
            doc = json.loads(f.read(length))
        if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or doc["body"].get("id") != rid:
            raise RuntimeError(f"the receipt log in {self.dir} is damaged: receipt {rid}")
        return doc, index

    def proof(self, index: int, tree_size: int | None = None) -> tuple[int, list[bytes], bytes]:
        """(tree_size, inclusion proof, root) for a leaf, against the current tree unless a size is given."""
        with self._lock:
            n = len(self._leaves) if tree_size is None else tree_size
            if not 0 <= index < n <= len(self._leaves):
                raise ValueError("no such leaf in a tree of that size")
            return n, self._tree.path(index, 0, n), self._tree.root(0, n)

    def consistency(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof that the tree of size `second` extends the tree of size `first`."""
        with self._lock:
            if not 0 < first <= second <= len(self._leaves):
                raise ValueError("need 0 < first <= second <= the log's size")
            return self._tree.consistency(first, 0, second)

    def tree_head(self, app_id: bytes, signing_key: bytes, now_ms: int) -> TreeHead:
        with self._lock:
            n = len(self._leaves)
            head = TreeHead(app_id, n, self._tree.root(0, n), now_ms)
        return TreeHead(
            head.app_id,
            head.tree_size,
            head.root_hash,
            head.timestamp_ms,
            sign_k256_recoverable(signing_key, head.digest()),
        )
