"""Append-only Merkle log of receipts (RFC 9162 §2.1 hashing, inclusion proofs and their verification) and
signed tree heads, so a provider cannot deny or rewrite an answer it gave.

    leaf_hash  = sha256(0x00 ‖ sha256(JCS(receipt body)))        (the leaf data is the body hash)
    node hash  = sha256(0x01 ‖ left ‖ right)
    tree head  = {"version", "app_id", "tree_size", "root_hash", "timestamp_ms"}, signed like a receipt:
                 keccak256("teecloud-ai-tree-head:" ‖ sha256(JCS(tree head))) by the receipt-signing key

Consistency proofs (RFC 9162 §2.1.4) show a later tree extends an earlier one: a client that remembers a
head detects a log that was rewritten or forked.

`ReceiptLog` keeps the leaf hashes in `<dir>/leaves.bin` (32 bytes each, appended and fsynced; a torn tail
from a crash is cut back to whole leaves on open) and each receipt as `<dir>/receipts/<id>.json` (written
atomically before its leaf is appended). `verify_inclusion` is pure.
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
from teecloud.ai.errors import MalformedInput, ReceiptInvalid
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
    """The app's receipt store and Merkle log on its (encrypted) volume. Thread-safe; append-only."""

    def __init__(self, directory: Path, *, max_leaves: int = 10_000_000) -> None:
        self.dir = Path(directory)
        (self.dir / "receipts").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._leaves_path = self.dir / "leaves.bin"
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receipt-log")
        self._max = max_leaves
        data = self._leaves_path.read_bytes() if self._leaves_path.exists() else b""
        whole = len(data) - len(data) % 32
        if whole != len(data):  # a torn append from a crash: the receipt file exists, its leaf does not
            with open(self._leaves_path, "r+b") as f:
                f.truncate(whole)
        self._leaves = [data[i : i + 32] for i in range(0, whole, 32)]
        self._tree = _Tree()
        for leaf in self._leaves:
            self._tree.append(leaf)
        self._index: dict[str, int] = {}
        for i, name in enumerate(self._ids_in_order()):
            self._index[name] = i

    def _ids_in_order(self) -> list[str]:
        order_path = self.dir / "order.txt"
        if not order_path.exists():
            return []
        names = order_path.read_text(encoding="ascii").split()
        if len(names) > len(self._leaves):
            # A crash after an id's line was written but before its leaf was: drop the line, or the next
            # append's leaf would be mapped to that id on the next open.
            atomic_write(order_path, "".join(n + "\n" for n in names[: len(self._leaves)]).encode())
        return names[: len(self._leaves)]

    def __len__(self) -> int:
        return len(self._leaves)

    def append(self, receipt: SignedReceipt) -> int:
        rid = receipt.body.id
        if not _ID.match(rid):
            raise ValueError("receipt ids are 1..64 characters of [A-Za-z0-9_-]")
        data = json.dumps(receipt.to_json(), separators=(",", ":")).encode()
        with self._lock:
            if rid in self._index:
                raise ValueError(f"receipt {rid} is already logged")
            if len(self._leaves) >= self._max:
                raise RuntimeError("the receipt log is full")
            # The receipt file and its id's line are written and fsynced side by side (one fsync's wait
            # instead of two); both are durable before the leaf that makes the receipt part of the log.
            written = self._writer.submit(atomic_write, self.dir / "receipts" / f"{rid}.json", data)
            order_path = self.dir / "order.txt"
            order_size = order_path.stat().st_size if order_path.exists() else 0
            try:
                try:
                    with open(order_path, "a", encoding="ascii") as f:
                        f.write(rid + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    written.result()
            except BaseException:  # no leaf follows: take the id's line back so later lines stay aligned
                if order_path.exists():
                    with open(order_path, "r+b") as f:
                        f.truncate(order_size)
                raise
            leaf = leaf_hash(receipt.body.body_sha256())
            with open(self._leaves_path, "ab") as f:
                f.write(leaf)
                f.flush()
                os.fsync(f.fileno())
            self._leaves.append(leaf)
            self._tree.append(leaf)
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
        raw = (self.dir / "receipts" / f"{rid}.json").read_bytes()
        if len(raw) > MAX_RECEIPT_BYTES * 4:
            raise RuntimeError(f"receipt {rid} on disk is oversized")
        return json.loads(raw), index

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
