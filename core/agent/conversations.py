"""Live conversations by id, for the front ends that hold many at once (``agent serve`` and
LangChain's ``HyperlexAgent``): one controller per conversation, turns of one conversation
run one at a time (its ``lock``), and at most ``limit`` are kept in memory, least recently
used first out. A conversation whose turn is running is never dropped; a dropped one that
was saved resumes from the store when its id is seen again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class HasLock(Protocol):
    lock: threading.Lock


Key = TypeVar("Key", bound=Hashable)
Entry = TypeVar("Entry", bound=HasLock)


class Conversations(Generic[Key, Entry]):
    """``create(id)`` makes the entry for a new id (it holds the controller and a lock)."""

    def __init__(self, create: Callable[[Key], Entry], limit: int):
        self.create = create
        self.limit = limit
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key, evict: bool = True) -> Entry:
        """The entry for ``key``, created on first use; ``evict``: drop the least recently
        used idle entries beyond ``limit`` (only safe when they can resume from a store)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self.create(key)
                self._entries[key] = entry
            self._entries.move_to_end(key)
            if evict:
                idle = [k for k, e in self._entries.items() if not e.lock.locked()]
                for stale in idle[: max(0, len(self._entries) - self.limit)]:
                    del self._entries[stale]
            return entry

    def __getitem__(self, key: Key) -> Entry:
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
