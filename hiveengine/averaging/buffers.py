"""Reusable buffers for the all-reduce hot path: fresh memory costs a page fault per 4 KiB on first touch,
which is slower than the network here, so every round reuses the buffers of the round before last."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any

MAX_LAYOUTS = 8  # distinct buffer layouts kept (a changing group size or tensor size makes new ones)
GENERATIONS = 2  # alternate between two sets, so a late transfer of the previous round never sees new data


class BufferCache:
    """Per-layout buffer sets, handed out alternately; the least recently used layouts are dropped."""

    def __init__(self, max_layouts: int = MAX_LAYOUTS):
        self.max_layouts = max_layouts
        self._sets: collections.OrderedDict[Hashable, list[Any]] = collections.OrderedDict()
        self._turn: dict[Hashable, int] = {}

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The next buffer set for `key`, created with `make()` the first GENERATIONS times."""
        sets = self._sets.setdefault(key, [])
        self._sets.move_to_end(key)
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % GENERATIONS
        if len(sets) <= turn:
            sets.append(make())
        while len(self._sets) > self.max_layouts:
            dropped, _ = self._sets.popitem(last=False)
            self._turn.pop(dropped, None)
        return sets[turn]
