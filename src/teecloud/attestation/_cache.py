"""Memo caches for the verifier, bounded in entries *and* bytes (private).

Every cache on an untrusted-input path is one of these: an attacker who sends distinct inputs can only
evict, never grow memory past `max_bytes` (an entry larger than a quarter of the budget is not kept at
all). Values are results of pure functions of their key, so a cache can only save time, never change a
verdict: whatever a result depends on (exact bytes, trust anchor, the validity window it holds for) is in
its key or checked on every hit by the caller.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BoundedCache", "CacheStats", "all_caches", "clear_all", "named_cache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_REGISTRY: list[BoundedCache[object, object]] = []
# A rough per-entry overhead (dict slot, tuple, small objects) added to the caller's size estimate.
ENTRY_OVERHEAD = 256


@dataclass(frozen=True)
class CacheStats:
    name: str
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int


class BoundedCache(Generic[K, V]):
    """A thread-safe LRU map holding at most `max_entries` entries and `max_bytes` bytes (as estimated by
    the `size` passed to `put`, plus a fixed per-entry overhead)."""

    def __init__(self, name: str, *, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        _REGISTRY.append(self)  # type: ignore[arg-type]

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        cost = max(0, size) + ENTRY_OVERHEAD
        if cost > self.max_bytes // 4:
            return  # one huge entry would flush everything useful; not worth keeping
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, cost)
            self._bytes += cost
            while self._bytes > self.max_bytes or len(self._data) > self.max_entries:
                _, (_, freed) = self._data.popitem(last=False)
                self._bytes -= freed

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        return CacheStats(
            self.name, len(self._data), self._bytes, self.max_entries, self.max_bytes, self.hits, self.misses
        )


def all_caches() -> list[CacheStats]:
    """Statistics of every verifier cache (for benchmarks, the fuzz harness and tests)."""
    return [c.stats() for c in _REGISTRY]


def clear_all() -> None:
    """Empty every verifier cache (benchmarks measure first sight this way)."""
    for c in _REGISTRY:
        c.clear()


def named_cache(name: str) -> BoundedCache[K, V]:
    """A cache sized by its budget in `_limits.CACHE_BUDGETS`."""
    from teecloud.attestation._limits import CACHE_BUDGETS

    budget = CACHE_BUDGETS[name]
    return BoundedCache(name, max_entries=budget.max_entries, max_bytes=budget.max_bytes)
