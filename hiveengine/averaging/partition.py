"""How a flat buffer is cut: one part per reducer (sized to balance the round's traffic), each part into chunks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

BALANCE_ITERATIONS = 60  # bisection steps on the round's makespan (2^-60 of the bracket: exact for floats)


def balanced_shares(bandwidths: Sequence[float], sends: Sequence[bool], senders: int) -> list[float]:
    """The fraction of the vector each reducer should own so that the slowest peer finishes first.

    Traffic model of one butterfly round, per direction, in units of the vector's size: reducer i owning a
    fraction x receives x from each of the other senders, and, if it sends itself (s = 1), the means of the
    (1 - x) it does not own. Its time is (s + x·(senders - 2s)) / bandwidth. The shares minimise the largest
    such time (a min-max problem solved exactly by bisection on the makespan). A proportional split is up to
    ~1.3x slower than this when bandwidths are uneven.
    """
    if not bandwidths or any(b <= 0 for b in bandwidths):
        raise ValueError("every reducer needs a positive bandwidth")

    def capacity(makespan: float) -> list[float]:
        """The largest fraction each reducer can own while finishing within `makespan`."""
        caps = []
        for bandwidth, sender in zip(bandwidths, sends, strict=True):
            fixed, slope = float(sender), float(senders - 2 * sender)
            if slope > 0:
                caps.append(min(1.0, max(0.0, (makespan * bandwidth - fixed) / slope)))
            else:  # owning more never costs this peer time: it can take all, if its fixed cost fits
                caps.append(1.0 if (fixed + min(slope, 0.0)) / bandwidth <= makespan else 0.0)
        return caps

    pairs = list(zip(bandwidths, sends, strict=True))
    # No split makes the round faster than its slowest peer's traffic at its best share.
    floor = max((s + min(senders - 2 * s, 0)) / b for b, s in pairs)
    low, high = floor, max((1.0 + abs(senders - 2 * s)) / b for b, s in pairs)
    for _ in range(BALANCE_ITERATIONS):
        middle = (low + high) / 2
        low, high = (low, middle) if sum(capacity(middle)) >= 1.0 else (middle, high)
    caps = capacity(high)
    # Within those caps, stay as close to a bandwidth-proportional split as possible (it decides the ties,
    # e.g. two peers, whose traffic does not depend on the split at all): x_i = min(cap_i, scale * b_i).
    low, high = 0.0, max(1.0 / b for b in bandwidths)
    for _ in range(BALANCE_ITERATIONS):
        middle = (low + high) / 2
        short = sum(min(c, middle * b) for c, b in zip(caps, bandwidths, strict=True)) < 1.0
        low, high = (middle, high) if short else (low, middle)
    shares = [min(c, high * b) for c, b in zip(caps, bandwidths, strict=True)]
    total = sum(shares)
    return [x / total for x in shares]


def part_spans(numel: int, shares: Sequence[float], align: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans, one per share, proportional to it and aligned to `align`."""
    if not shares or any(b < 0 for b in shares) or sum(shares) <= 0:
        raise ValueError("shares must be non-negative with a positive sum")
    total = float(sum(shares))
    bounds, acc = [0], 0.0
    for b in shares[:-1]:
        acc += b
        cut = round(numel * acc / total / align) * align
        bounds.append(min(max(cut, bounds[-1]), numel))
    bounds.append(numel)
    return list(itertools.pairwise(bounds))


def chunk_spans(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most `chunk` elements (an empty part has no chunks)."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]
