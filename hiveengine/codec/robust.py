"""Robust aggregation of K decoded copies: CenteredClip (Karimireddy et al., 2021; as used by BTARD, Gorbunov
et al., 2022), so that a few hostile copies move the aggregate by a bounded amount, however large they are.

CenteredClip iterates v <- v + sum_i w_i * (x_i - v) * min(1, tau / ||x_i - v||) (weights summing to one) from a
robust start: the medoid, the copy whose median distance to the others is smallest (an honest copy while most of
the copies are honest). tau is either absolute (`tau`) or `tau_factor` times the median distance of the copies to
that start, so it needs no knowledge of the data's scale: honest copies sit at about that distance and are not
clipped; a copy far beyond it pulls with at most tau. With a fraction a < 1/2 of the weight hostile, the fixed
point lies within about a / (1 - a) * tau of the honest copies' mean.

Cost. Every center the iteration visits is a combination sum_j c_j x_j with sum_j c_j = 1, so the whole iteration
runs on the K x K Gram matrix of the copies' differences to a base copy (one pass over the data, a slice of
GRAM_SLICE values at a time, whose differences stay in cache: the copies themselves are never written, so a verified
reducer's claim is computed from the same rows; the differences keep the product's precision relative to the copies'
spread, not their norms), and one more pass writes the result. The base is the copy of median norm (an honest one
while most are): differences to a copy of norm 1e10 would round the honest copies' own values away in fp32. Each
slice's product is fp32, summed in float64, unless a difference is too large for it (a norm near 2e19 squares past
fp32's range: the distances became NaN and the copy went unclipped); then it is recomputed in float64. A clean round
pays the norms and that Gram matrix more than the plain mean: if every copy lies within tau of the weighted mean,
that mean is a fixed point of the iteration (no copy is clipped and the weighted deviations sum to zero), and it is
returned as it is, bit for bit the plain mean. That tau is the iteration's own, measured from the medoid: one
measured from the copies' distances to the mean grew with the pull of colluders at one point, and let 40% of the
weight move the mean without bound. A tau of 0 (most copies coincide) becomes the medoid's smallest positive
distance. With K <= 2 no copy can be told from the other, so the mean is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hiveengine.errors import ConfigurationError
from hiveengine.kernels import weighted_mean

AGGREGATIONS = ("mean", "centered_clip")
DEFAULT_TAU_FACTOR = 1.5  # the clip radius, in median distances of the copies to the start
DEFAULT_CLIP_ITERATIONS = 20  # most CenteredClip steps per chunk (it usually settles within a few)
MEDOID_PASSES = 2  # the medoid is looked for again from the first one found (then the differences are small)
CLIP_TOLERANCE = 1e-4  # stop once a step moves the center by less than this fraction of tau
GRAM_SLICE = 1 << 14  # values per slice of the Gram product (their differences: 64 KiB per copy, in cache)


@dataclass(frozen=True)
class Aggregation:
    """How a reducer combines the copies it received: `mean` (trusted swarms) or `centered_clip` (open swarms,
    with an absolute `tau`, or `tau_factor` median distances when tau is None, and at most `iterations` steps)."""

    kind: str = "centered_clip"
    tau: float | None = None
    tau_factor: float = DEFAULT_TAU_FACTOR
    iterations: int = DEFAULT_CLIP_ITERATIONS

    def __post_init__(self):
        if self.kind not in AGGREGATIONS:
            raise ConfigurationError(f"aggregation must be one of {list(AGGREGATIONS)}, got {self.kind!r}")
        if self.tau is not None and not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigurationError(f"clip_tau must be a positive number or None (adaptive), got {self.tau}")
        if not (self.tau_factor >= 1 and math.isfinite(self.tau_factor)):
            raise ConfigurationError(f"clip_tau_factor must be a number ≥ 1, got {self.tau_factor}")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ConfigurationError(f"clip_iterations must be an integer ≥ 1, got {self.iterations}")

    @property
    def robust(self) -> bool:
        """Whether the copies must be decoded one by one (anything but the fused mean)."""
        return self.kind != "mean"

    @classmethod
    def of(cls, value: str | Aggregation) -> Aggregation:
        """`value` as an Aggregation (a name takes the default options)."""
        return value if isinstance(value, Aggregation) else cls(str(value))


def centered_clip(
    rows: torch.Tensor,
    weights: Sequence[float],
    out: torch.Tensor,
    aggregation: Aggregation,
    *,
    mean_ready: bool = False,
) -> list[float] | None:
    """CenteredClip of the K rows of `rows` (fp32, K x n, left as they are) with `weights` into fp32 `out` (n
    values; with `mean_ready` it holds their weighted mean already); see the module docstring. When some copy was
    clipped (the result differs from the mean): the result's coefficients c (out = sum_j c_j rows_j, c >= 0, sum
    about 1; what a verifier checks it against); None when the mean stands. Raises NonFiniteError on NaN/Inf."""
    count = rows.shape[0]
    total = float(sum(weights))
    weight = np.array([x / total for x in weights] if total > 0 else [1.0 / count] * count, dtype=np.float64)
    if not mean_ready:
        weighted_mean(list(rows), weight.tolist(), out=out, name="copies")
    if count <= 2 or rows.shape[1] == 0:
        return None
    base = _median_norm(rows)
    gram = _gram(rows, base)
    # The mean stands when every copy lies within the iteration's own tau of it: a tau measured from the medoid,
    # which colluders that drag the mean cannot stretch (one measured from the distances to the mean grew with
    # their pull: 40% of the weight at one point passed as a clean round, and the mean moved without bound).
    if float(_distances(gram, weight).max()) <= _tau(gram, aggregation):
        return None
    for _ in range(MEDOID_PASSES):  # measure from the medoid (the median norm's copy may lie off the others)
        start = int(_median_distances(_pairwise(gram)).argmin())
        if start == base:
            break
        base, gram = start, _gram(rows, start)
    tau = _tau(gram, aggregation)
    center = np.zeros(count, dtype=np.float64)
    center[base] = 1.0
    for _ in range(aggregation.iterations):
        d = _distances(gram, center)
        pull = weight * np.where(d > tau, tau / np.maximum(d, 1e-300), 1.0)
        step = pull - pull.sum() * center
        center += step
        if float(step @ gram @ step) <= (CLIP_TOLERANCE * tau) ** 2:
            break
    used = torch.from_numpy(center).to(rows.dtype)  # the coefficients as the result is computed with them
    torch.mv(rows.T, used.to(rows.device), out=out.view(-1))
    return used.double().tolist()


def squared_norms(rows: torch.Tensor) -> np.ndarray:
    """Each row's squared norm (fp32 rows: one past fp32's range is infinite). On the host through numpy, in one
    thread: torch's parallel reduction left its OpenMP threads spinning after it, which cost peers sharing the
    cores 2x on a 4 MB round."""
    if rows.device.type == "cpu":
        values = rows.detach().numpy()
        return np.einsum("ij,ij->i", values, values)
    return torch.linalg.vector_norm(rows.detach(), dim=1).square().cpu().numpy()  # no K x n temporary


def _median_norm(rows: torch.Tensor) -> int:
    """The index of the row of (lower) median norm."""
    squares = squared_norms(rows)
    return int(np.argsort(squares, kind="stable")[(len(squares) - 1) // 2])


def _gram(rows: torch.Tensor, base: int) -> np.ndarray:
    """The Gram matrix (float64, on the host) of the copies' differences to copy `base` (whose own row and column
    are zero), GRAM_SLICE values at a time (the differences of a slice fit in cache; the copies are not written):
    each slice's product in torch (on the copies' device), fp32 and summed in float64 there, brought to the host
    once; if a product overflowed fp32, all of it again in float64. The K x K work after it is numpy's, whose calls
    cost a fraction of torch's at that size."""
    count, n = rows.shape
    total = torch.zeros(count, count, dtype=torch.float64, device=rows.device)
    scratch = torch.empty(count, min(n, GRAM_SLICE), dtype=rows.dtype, device=rows.device)
    for start in range(0, n, GRAM_SLICE):
        piece = rows[:, start : start + GRAM_SLICE]
        diffs = torch.sub(piece, piece[base], out=scratch[:, : piece.shape[1]])
        total += diffs @ diffs.T
    gram = total.cpu().numpy()
    if not np.isfinite(gram).all():
        total.zero_()
        for start in range(0, n, GRAM_SLICE):
            piece = rows[:, start : start + GRAM_SLICE].double()
            wide = piece - piece[base]
            total += wide @ wide.T
        gram = total.cpu().numpy()
    return gram


def _tau(gram: np.ndarray, aggregation: Aggregation) -> float:
    """The clip radius: `tau`, or `tau_factor` times the medoid's (lower) median distance to the other copies, or
    where that is 0 (most copies coincide: zero gradients, frozen values) its smallest positive one: a radius of 0
    gave every other copy a coefficient of 0, and each of their honest senders took the reducer for one that had
    dropped its copy."""
    if aggregation.tau is not None:
        return aggregation.tau
    pairwise = _pairwise(gram)
    distances = pairwise[int(_median_distances(pairwise).argmin())]
    median = float(_median_distances(distances))
    if median <= 0:
        positive = distances[(distances > 0) & np.isfinite(distances)]
        median = float(positive.min()) if positive.size else 0.0
    return aggregation.tau_factor * median


def _distances(gram: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Each copy's distance to the combination sum_j c_j x_j (sum c_j = 1), from the Gram matrix."""
    gc = gram @ c
    return np.sqrt(np.maximum(gram.diagonal() - 2 * gc + c @ gc, 0.0))


def _pairwise(gram: np.ndarray) -> np.ndarray:
    """The copies' pairwise distances, infinite on the diagonal (a copy is not its own neighbour)."""
    diagonal = gram.diagonal()
    pairwise = np.sqrt(np.maximum(diagonal[:, None] + diagonal[None, :] - 2 * gram, 0.0))
    np.fill_diagonal(pairwise, math.inf)
    return pairwise


def _median_distances(pairwise: np.ndarray) -> np.ndarray:
    """Each copy's (lower) median distance to the others, its own (infinite) left out: with fewer than half the
    copies hostile, an honest copy's is an honest distance even where the others split evenly (K odd; counting its
    own, 4 honest copies of 7 took a colluder's distance, and a colluder became the medoid)."""
    middle = (pairwise.shape[-1] - 2) // 2
    return np.partition(pairwise, middle, axis=-1)[..., middle]
