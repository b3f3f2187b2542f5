"""Beam search over the experts declared in the DHT: per sample, the `beam_size` alive experts with the highest
summed grid scores, walking the uid prefixes level by level (one concurrent round of DHT reads per level)."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.moe.uids import UID_DELIMITER, check_prefix

DEFAULT_CACHE_TTL = 1.0  # seconds a prefix's successors read from the DHT are reused before they are read again


@dataclass(frozen=True)
class ExpertInfo:
    """An alive expert as the DHT declares it."""

    uid: str
    coords: tuple[int, ...]
    address: str


class MoEBeamSearcher:
    """Finds the best alive experts of the grid `uid_prefix` + `grid_size` (e.g. `ffn.` and (4, 4)). Each prefix is
    read with `latest=True` (merging the subkeys that different servers stored on different nodes) and reused for
    `cache_ttl` seconds, so a training step rarely waits for the DHT."""

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
        self._cache: dict[str, tuple[float, dict[int, object]]] = {}

    async def _successors(self, prefixes: set[str]) -> dict[str, dict[int, object]]:
        """For each prefix, the declared next coordinates and their values (an address at the last level)."""
        now = time.monotonic()
        stale = sorted(p for p in prefixes if p not in self._cache or now - self._cache[p][0] > self.cache_ttl)
        if stale:
            async with asyncio.timeout(self.lookup_timeout):
                found = await asyncio.gather(*[self.dht.aget(p, latest=True) for p in stale])
            for prefix, item in zip(stale, found, strict=True):
                subkeys = item.value if item is not None and isinstance(item.value, dict) else {}
                self._cache[prefix] = (now, {c: v.value for c, v in subkeys.items() if isinstance(c, int)})
        return {p: self._cache[p][1] for p in prefixes}

    async def afind_best_experts(self, grid_scores: Sequence[torch.Tensor], beam_size: int) -> list[list[ExpertInfo]]:
        """Per sample, up to `beam_size` alive experts, best first; `grid_scores[l]` is (batch, grid_size[l])."""
        if len(grid_scores) != len(self.grid_size):
            raise ConfigurationError(f"expected {len(self.grid_size)} score tensors, got {len(grid_scores)}")
        scores = [s.detach().float().cpu().tolist() for s in grid_scores]
        batch = len(scores[0])
        # beams[i]: (score, prefix, coords) per sample
        beams: list[list[tuple[float, str, tuple[int, ...]]]] = [[(0.0, self.uid_prefix, ())] for _ in range(batch)]
        last_level = len(self.grid_size) - 1
        found: list[list[ExpertInfo]] = [[] for _ in range(batch)]
        for level, size in enumerate(self.grid_size):
            successors = await self._successors({prefix for beam in beams for _, prefix, _ in beam})
            for i in range(batch):
                candidates = [
                    (score + scores[level][i][c], f"{prefix}{c}{UID_DELIMITER}", (*coords, c), value)
                    for score, prefix, coords in beams[i]
                    for c, value in successors[prefix].items()
                    if 0 <= c < size and (level < last_level or isinstance(value, str))
                ]
                best = heapq.nlargest(beam_size, candidates, key=lambda item: item[0])
                if level == last_level:
                    found[i] = [ExpertInfo(prefix[:-1], coords, value) for _, prefix, coords, value in best]
                else:
                    beams[i] = [(score, prefix, coords) for score, prefix, coords, _ in best]
        return found
