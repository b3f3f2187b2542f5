"""Beam search over the experts declared in the DHT: per sample, the `beam_size` alive experts with the highest
summed grid scores, walking the uid prefixes level by level (one concurrent round of DHT reads per level)."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.moe.declarations import expert_key, parse_successors
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.moe.uids import UID_DELIMITER, check_prefix

logger = logging.getLogger(__name__)

DEFAULT_CACHE_TTL = 1.0  # seconds after which a prefix's successors are re-read from the DHT, in the background
MAX_STALENESS = 30.0  # seconds after which cached successors are not used: the search waits for a fresh read


@dataclass(frozen=True)
class ExpertInfo:
    """An alive expert as the DHT declares it."""

    uid: str
    coords: tuple[int, ...]
    address: str


class MoEBeamSearcher:
    """Finds the best alive experts of the grid `uid_prefix` + `grid_size` (e.g. `ffn.` and (4, 4)). Each prefix is
    read with `latest=True` (merging the subkeys that different servers stored on different nodes) and cached: after
    `cache_ttl` seconds a search still uses the cached successors while it re-reads them in the background, so a
    training step waits for the DHT only for prefixes it never read or last read more than MAX_STALENESS ago."""

    def __init__(
        self,
        dht: DHT,
        uid_prefix: str,
        grid_size: Sequence[int],
        lookup_timeout: float = DHT_TIMEOUT,
        cache_ttl: float = DEFAULT_CACHE_TTL,
    ):
        check_prefix(uid_prefix)
        if not grid_size or any(int(g) < 1 for g in grid_size):
            raise ConfigurationError(f"grid_size must be positive integers, got {tuple(grid_size)}")
        self.dht, self.uid_prefix, self.grid_size = dht, uid_prefix, tuple(int(g) for g in grid_size)
        self.lookup_timeout, self.cache_ttl = lookup_timeout, cache_ttl
        self._cache: dict[str, tuple[float, dict[int, str]]] = {}
        self._refreshing: set[str] = set()  # prefixes being re-read in the background
        self._refreshes: set[asyncio.Task] = set()  # those reads (kept referenced until done)

    async def _read(self, prefixes: list[str]) -> None:
        """Read the prefixes' successors from the DHT into the cache."""
        now = time.monotonic()
        async with asyncio.timeout(self.lookup_timeout):
            found = await asyncio.gather(*[self.dht.aget(expert_key(p), latest=True) for p in prefixes])
        for prefix, item in zip(prefixes, found, strict=True):
            self._cache[prefix] = (now, parse_successors(item))

    async def _refresh(self, prefixes: list[str]) -> None:
        """Background re-read: a failure keeps the cached values (until MAX_STALENESS) and is logged."""
        try:
            await self._read(prefixes)
        except Exception as e:
            logger.debug("re-reading %d expert prefixes failed: %s: %s", len(prefixes), type(e).__name__, e)
        finally:
            self._refreshing.difference_update(prefixes)

    async def _successors(self, prefixes: set[str]) -> dict[str, dict[int, str]]:
        """For each prefix, the next coordinates that signed declarations name, each with a declaring server's
        address (the expert's own at the last level)."""
        now = time.monotonic()
        age = {p: now - self._cache[p][0] if p in self._cache else None for p in prefixes}
        usable = {p for p, a in age.items() if a is not None and a <= MAX_STALENESS}
        missing = sorted(prefixes - usable)
        stale = sorted(p for p in usable if age[p] > self.cache_ttl and p not in self._refreshing)
        if stale:
            self._refreshing.update(stale)
            task = asyncio.get_running_loop().create_task(self._refresh(stale))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
        if missing:
            await self._read(missing)
        return {p: self._cache[p][1] for p in prefixes}

    async def afind_best_experts(
        self, grid_scores: Sequence[torch.Tensor], beam_size: int, exclude: Collection[str] = ()
    ) -> list[list[ExpertInfo]]:
        """Per sample, up to `beam_size` alive experts, best first, leaving out experts served at the addresses in
        `exclude`; `grid_scores[l]` is (batch, grid_size[l]). Intermediate levels keep the `beam_size` best prefixes;
        a sample that ends with fewer than `beam_size` experts after such a cut (its best prefixes led to excluded or
        expired experts) is searched again keeping twice as many, until nothing is cut."""
        if len(grid_scores) != len(self.grid_size):
            raise ConfigurationError(f"expected {len(self.grid_size)} score tensors, got {len(grid_scores)}")
        scores = [s.detach().float().cpu().tolist() for s in grid_scores]
        exclude = frozenset(exclude)
        found: list[list[ExpertInfo]] = [[] for _ in scores[0]]
        todo, width = list(range(len(found))), beam_size
        while todo:
            results, cut = await self._search([[level[i] for i in todo] for level in scores], beam_size, width, exclude)
            again = []
            for j, i in enumerate(todo):
                found[i] = results[j]
                if cut[j] and len(results[j]) < beam_size:
                    again.append(i)
            todo, width = again, width * 2
        return found

    async def _search(
        self, scores: list[list[list[float]]], beam_size: int, width: int, exclude: frozenset[str]
    ) -> tuple[list[list[ExpertInfo]], list[bool]]:
        """One beam search keeping `width` prefixes per intermediate level: the experts found per sample, and
        whether an intermediate level cut any of its candidates."""
        batch = len(scores[0])
        # beams[i]: (score, prefix, coords) per sample
        beams: list[list[tuple[float, str, tuple[int, ...]]]] = [[(0.0, self.uid_prefix, ())] for _ in range(batch)]
        last_level = len(self.grid_size) - 1
        found: list[list[ExpertInfo]] = [[] for _ in range(batch)]
        cut = [False] * batch
        for level, size in enumerate(self.grid_size):
            successors = await self._successors({prefix for beam in beams for _, prefix, _ in beam})
            for i in range(batch):
                candidates = [
                    (score + scores[level][i][c], f"{prefix}{c}{UID_DELIMITER}", (*coords, c), value)
                    for score, prefix, coords in beams[i]
                    for c, value in successors[prefix].items()
                    if 0 <= c < size and (level < last_level or value not in exclude)
                ]
                if level == last_level:
                    best = heapq.nlargest(beam_size, candidates, key=lambda item: item[0])
                    found[i] = [ExpertInfo(prefix[:-1], coords, value) for _, prefix, coords, value in best]
                else:
                    cut[i] = cut[i] or len(candidates) > width
                    best = heapq.nlargest(width, candidates, key=lambda item: item[0])
                    beams[i] = [(score, prefix, coords) for score, prefix, coords, _ in best]
        return found, cut
