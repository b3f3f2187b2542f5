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
GRAM_SLICE values at a time, whose differences stay in cache: the copies themselves are never written, so a
verified reducer's claim is computed from the same rows; the differences keep the product's precision relative to
the copies' spread, not their norms), and one more pass writes the result. The base is the copy of median norm (an
honest one while most are): differences to a copy of norm 1e10 would round the honest copies' own values away in
fp32. Each slice's product is fp32, summed in float64, unless a difference is too large for it (a norm near 2e19
squares past fp32's range: the distances became NaN and the copy went unclipped); then that slice is recomputed
in float64. A clean round pays one check more than the plain mean: if
every copy lies within tau of the weighted mean (tau_factor median distances to it when adaptive), that mean is a
fixed point of the iteration (no copy is clipped and the weighted deviations sum to zero), and it is returned as it
is, bit for bit the plain mean; that check is one pass that measures each copy's distance to the mean computed
already (no Gram matrix), and only a round that fails it pays for the rest. With K <= 2 no copy can be told from
the other, so the mean is returned.
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
    near_mean = _distances_to(rows, out.view(-1))
    limit = aggregation.tau if aggregation.tau is not None else aggregation.tau_factor * _lower_median(near_mean)
    if float(near_mean.max()) <= limit:
        return None
    base = _median_norm(rows)
    gram = _gram(rows, base)
    for _ in range(MEDOID_PASSES):  # measure from the medoid (the median norm's copy may lie off the others)
        start = int(_lower_median(_pairwise(gram)).argmin())
        if start == base:
            break
        base, gram = start, _gram(rows, start)
    tau = aggregation.tau
    if tau is None:
        tau = aggregation.tau_factor * _lower_median(_pairwise(gram)[base])
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
    each slice's product in torch (on the copies' device), fp32 unless that overflows (then float64), summed in
    float64; the K x K work after it is numpy's, whose calls cost a fraction of torch's at that size."""
    count, n = rows.shape
    gram = np.zeros((count, count), dtype=np.float64)
    scratch = torch.empty(count, min(n, GRAM_SLICE), dtype=rows.dtype, device=rows.device)
    for start in range(0, n, GRAM_SLICE):
        piece = rows[:, start : start + GRAM_SLICE]
        diffs = torch.sub(piece, piece[base], out=scratch[:, : piece.shape[1]])
        product = (diffs @ diffs.T).cpu().numpy()
        if not np.isfinite(product).all():
            wide = piece.double() - piece[base].double()
            product = (wide @ wide.T).cpu().numpy()
        gram += product
    return gram


def _distances_to(rows: torch.Tensor, point: torch.Tensor) -> np.ndarray:
    """Each row's distance to `point` (float64, on the host), GRAM_SLICE values at a time (in cache; the rows are
    not written): the clean round's one check. Each slice's squares are fp32 unless that overflows (then float64)."""
    count, n = rows.shape
    squares = np.zeros(count, dtype=np.float64)
    scratch = torch.empty(count, min(n, GRAM_SLICE), dtype=rows.dtype, device=rows.device)
    for start in range(0, n, GRAM_SLICE):
        piece, at = rows[:, start : start + GRAM_SLICE], point[start : start + GRAM_SLICE]
        part = squared_norms(torch.sub(piece, at, out=scratch[:, : piece.shape[1]]))
        if not np.isfinite(part).all():
            part = (piece.double() - at.double()).square().sum(1).cpu().numpy()
        squares += part
    return np.sqrt(squares)


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


def _lower_median(values: np.ndarray) -> np.ndarray | float:
    """The lower median of a vector (a float), or of each row of a matrix (an array)."""
    middle = (values.shape[-1] - 1) // 2
    median = np.partition(values, middle, axis=-1)[..., middle]
    return float(median) if values.ndim == 1 else median
