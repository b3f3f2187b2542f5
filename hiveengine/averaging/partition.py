"""How a flat buffer is cut: one part per reducer (sized by bandwidth), each part into pipelined chunks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def part_spans(numel: int, bandwidths: Sequence[float], align: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans, one per bandwidth, proportional to it and aligned to `align`."""
    if not bandwidths or any(b <= 0 for b in bandwidths):
        raise ValueError("every reducer needs a positive bandwidth")
    total = float(sum(bandwidths))
    bounds, acc = [0], 0.0
    for b in bandwidths[:-1]:
        acc += b
        cut = round(numel * acc / total / align) * align
        bounds.append(min(max(cut, bounds[-1]), numel))
    bounds.append(numel)
    return list(itertools.pairwise(bounds))


def chunk_spans(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most `chunk` elements (an empty part has no chunks)."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]
