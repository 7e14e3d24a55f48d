"""An AI agent's long-term memory: a vector database in one SQLite file on the app's encrypted volume.

The store is sqlite-vec (a `vec0` virtual table, cosine distance, exact k-nearest-neighbour search) inside
SQLite, opened through `apsw` (its bundled SQLite loads extensions; the interpreter's `sqlite3` module may be
built without `enable_load_extension`). Each memory is one row of `memories` (text, kind, time) and one
row of the `vec0` table with the same rowid, written in one transaction (WAL journal, synchronous=FULL):
a crash leaves both or neither. The embedding dimension is fixed when the file is created and checked on
every open and every vector.

Embeddings come from the caller: the model engine (`/v1/embeddings` of an OpenAI-compatible server) or
`HashingEmbedder`, a deterministic local embedder (the hashing trick, Weinberger et al., "Feature Hashing
for Large Scale Multitask Learning", ICML 2009): lexical, not semantic, but needs no model, and a memory
written by one replica is found by every other.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teecloud.ai.errors import MalformedInput

__all__ = [
    "MAX_DIM",
    "MAX_MEMORIES",
    "MAX_TEXT_BYTES",
    "HashingEmbedder",
    "Recall",
    "VectorMemory",
]

MAX_DIM = 4096
MAX_TEXT_BYTES = 8192
MAX_MEMORIES = 100_000
MAX_K = 64
_KINDS = frozenset({"observation", "decision", "note"})
_SCHEMA_VERSION = 1
_TOKEN = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Signed feature hashing of words and word pairs into `dim` buckets, L2-normalized (see module doc)."""

    def __init__(self, dim: int = 256) -> None:
        if not 8 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be 8..{MAX_DIM}")
        self.dim = dim

    def embed(self, text: str) -> list[float]:
        words = [w.lower() for w in _TOKEN.findall(text)]
        features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        vec = [0.0] * self.dim
        for f in features:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "big")
            vec[h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norm = math.sqrt(sum(x * x for x in vec))
        return [x / norm for x in vec] if norm else vec


@dataclass(frozen=True)
class Recall:
    id: int
    kind: str
    text: str
    created_ms: int
    distance: float  # cosine distance, 0 (same direction) .. 2


class VectorMemory:
    """The memory file at `path` (created with `dim` when absent). Thread-safe; close() when done."""

    def __init__(self, path: Path | str, *, dim: int, max_memories: int = MAX_MEMORIES) -> None:
        import apsw
        import sqlite_vec

        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be 1..{MAX_DIM}")
        self.path = Path(path)
        self.dim = dim
        self.max_memories = max_memories
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = apsw.Connection(str(self.path))
        try:
            self._db.enable_load_extension(True)
            self._db.load_extension(sqlite_vec.loadable_path())
            self._db.enable_load_extension(False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        import apsw

        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            got = {str(k): str(v) for k, v in self._db.execute("SELECT key, value FROM meta").fetchall()}
            if not got:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema', ?), ('dim', ?)", (str(_SCHEMA_VERSION), str(self.dim))
                )
                self._db.execute(
                    "CREATE TABLE memories (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, text TEXT NOT NULL,"
                    " created_ms INTEGER NOT NULL)"
                )
                self._db.execute(
                    f"CREATE VIRTUAL TABLE memory_vec USING vec0(embedding float[{int(self.dim)}]"
                    " distance_metric=cosine)"
                )
                return
        if got.get("schema") != str(_SCHEMA_VERSION):
            raise apsw.SQLError(f"{self.path} is not a memory file of schema {_SCHEMA_VERSION}")
        if got.get("dim") != str(self.dim):
            raise ValueError(f"{self.path} holds {got.get('dim')}-dimensional memories, not {self.dim}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> VectorMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _vector(self, embedding: Sequence[float]) -> bytes:
        if len(embedding) != self.dim:
            raise MalformedInput(f"embedding has {len(embedding)} dimensions, the memory {self.dim}")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in embedding):
            raise MalformedInput("embedding values must be finite numbers")
        return struct.pack(f"<{self.dim}f", *embedding)

    def _count(self) -> int:
        row: Any = self._db.execute("SELECT count(*) FROM memories").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def add(self, text: str, embedding: Sequence[float], *, kind: str = "note") -> int:
        """Store one memory; returns its id. Both rows are written in one transaction."""
        if kind not in _KINDS:
            raise MalformedInput(f"memory kind must be one of {sorted(_KINDS)}")
        if not isinstance(text, str) or len(text.encode()) > MAX_TEXT_BYTES:
            raise MalformedInput(f"memory text must be a string of at most {MAX_TEXT_BYTES} bytes")
        blob = self._vector(embedding)
        with self._lock, self._db:
            if self._count() >= self.max_memories:
                raise MalformedInput(f"the memory is full ({self.max_memories} memories)")
            self._db.execute(
                "INSERT INTO memories (kind, text, created_ms) VALUES (?, ?, ?)",
                (kind, text, int(time.time() * 1000)),
            )
            rowid = int(self._db.last_insert_rowid())
            self._db.execute("INSERT INTO memory_vec (rowid, embedding) VALUES (?, ?)", (rowid, blob))
        return rowid

    def search(self, embedding: Sequence[float], k: int = 4) -> list[Recall]:
        """The k memories nearest to `embedding` (cosine distance), nearest first."""
        if not 1 <= k <= MAX_K:
            raise MalformedInput(f"k must be 1..{MAX_K}")
        blob = self._vector(embedding)
        with self._lock:
            rows: list[Any] = self._db.execute(
                "SELECT m.id, m.kind, m.text, m.created_ms, v.distance FROM "
                "(SELECT rowid, distance FROM memory_vec WHERE embedding MATCH ? AND k = ?) v "
                "JOIN memories m ON m.id = v.rowid ORDER BY v.distance, m.id",
                (blob, k),
            ).fetchall()
        return [Recall(int(r[0]), str(r[1]), str(r[2]), int(r[3]), float(r[4])) for r in rows]
