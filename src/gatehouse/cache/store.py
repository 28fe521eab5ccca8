"""The in-process tier: answers kept as bytes, bounded by their size, least recently used out first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

ENTRY_OVERHEAD = 256
"""Bytes counted per entry besides its body: the key, the headers, the bookkeeping (an estimate)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer and what it was read at."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    media_type: str | None
    rows: int | None
    redacted_query: str | None
    """The audit's form of the query (values masked), worked out once at the fill instead of on every hit."""
    versions: tuple[int, ...]
    """The data versions of its tables, read in the same snapshot as its rows."""
    expires: float
    """Monotonic seconds: the contract's ``cache`` setting bounds an entry's life even if nothing changes."""
    etag: str

    @property
    def size(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD


class EntryStore:
    """At most ``max_bytes`` of entries; ``get`` makes an entry the most recently used."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.size
        self._entries[key] = entry
        self.size += entry.size
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted.size

    def drop(self, key: Hashable) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.size

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0
