"""Verified reducers: a sender checks that the aggregate a reducer returned is the combination of the copies it
was sent, before applying it, with one random projection per chunk and no extra message.

Construction (per chunk of a part; the K senders in peer-id order):
1. The reducer aggregates the decoded copies x_j into A = sum_j c_j x_j (c: the normalized weights for the mean,
   the center's coefficients for CenteredClip; c >= 0, sum c = 1, c_j = 0 for a copy left out) and encodes the
   reply R = encode(A).
2. Probe. r in R^n, Gaussian, from a generator seeded with BLAKE2b(PROBE_DOMAIN || group id || part || chunk ||
   the bytes of R) (`probe`): fixed only once the reply is, and the same for the reducer and every sender.
3. The reply's header carries c and t_j = <x_j, r> for every sender j (`Claim`: 2K numbers).
4. Sender i, on receipt (`check_reply`), before decoding R into its buffer: c is in the simplex with c_i > 0;
   its own t_i equals <x_i, r> for the copy it sent; and <decode(R), r> equals sum_j c_j t_j within
   Z * (codec.error_bound(R) + fp32 slack). Requantization moves A by e with ||e|| <= error_bound(R), and
   <e, r> ~ N(0, ||e||^2) for a probe drawn after R, so Z = PROBE_Z standard deviations never fire on an honest
   reply (lossy codecs included), while a reply off by d fails unless |<d, r>| is within that band: for
   garbage, d is many times the codec's error and the chance is about Z * ||e|| / ||d||.
A failed check fails the part for this round (the sender keeps its local values there: replies are buffered
and decoded only once every chunk of the part passed) and bans the reducer on this peer (AllReduceService
.banned: it reduces nothing more for us and we average none of its copies).

Cost: sender: one probe (n Gaussian values) and two n-length dot products per chunk; reducer: the probe and a
decode and a dot product per copy (about one more pass over the copies than the fused mean); 16 K bytes of
header per chunk; no extra message or round trip.

What it catches: a reducer that returns anything but sum_j c_j x_j over the copies it reports projections of
(garbage, noise, a stale or partial aggregate, dropped or altered copies) while reporting honest
projections, and any lie about the checking sender's own copy (projection or coefficient).
What it does not catch (yet): an adaptive reducer that also forges the projection of a copy the checker never
saw: its own (when it sends) or another sender's. Closing that gap takes the senders publishing their own
projections to each other after the round (K^2 numbers, off the critical path) and a Gram-matrix check of
CenteredClip's coefficients; and signed accusations in the DHT, so that a ban spreads. Until then a reducer
that cheats adaptively can move its part as far as a sender with all the weight could.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hiveengine.errors import HiveEngineError

PROBE_DOMAIN = b"hiveengine/allreduce/probe/v1"
PROBE_Z = 8.0  # standard deviations of the requantization error's projection an honest reply may be off by
FP32_SLACK = 64 * 2.0**-24  # the fp32 aggregation's rounding, relative to the copies' norms, per copy
DOT_SLACK = 2.0**-40  # rounding of a float64 dot product of fp32 vectors, relative to ||x|| ||r||


class ReducerCheatedError(HiveEngineError):
    """A reducer's reply is not the aggregate of the copies it was sent: its part is failed and it is banned."""


@dataclass(frozen=True)
class Claim:
    """What a reducer says it computed for one chunk: each sender's coefficient and projection (peer-id order)."""

    coefficients: list[float]
    projections: list[float]

    def header(self) -> dict:
        """The reply-header fields that carry the claim."""
        return {"k": self.coefficients, "t": self.projections}

    @classmethod
    def parse(cls, header: dict, senders: int) -> Claim:
        """The claim in a reply header, if it has one number of each kind per sender (else ReducerCheatedError)."""
        k, t = header.get("k"), header.get("t")
        if not (isinstance(k, list) and isinstance(t, list) and len(k) == len(t) == senders):
            raise ReducerCheatedError(f"the reply carries no claim for its {senders} senders' copies")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (*k, *t)):
            raise ReducerCheatedError("the reply's claim holds non-numbers or non-finite values")
        return cls([float(v) for v in k], [float(v) for v in t])


def probe(group_id: bytes, part: int, chunk: int, reply: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
    """The Gaussian probe vector (fp32, CPU) for one chunk's reply: seeded by the hash of the reply itself."""
    digest = hashlib.blake2b(PROBE_DOMAIN, digest_size=16)
    digest.update(group_id)
    digest.update(part.to_bytes(4, "little") + chunk.to_bytes(4, "little"))
    for tensor in reply:
        raw = tensor.detach().contiguous().cpu()
        digest.update(raw.view(torch.uint8).numpy() if raw.numel() else b"")
    seed = int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def project(x: torch.Tensor, r: torch.Tensor) -> float:
    """<x, r> in float64 (an fp32 dot product's rounding would widen the tolerance: a garbage reply could slip
    through it with a chance of ~1e-5 sqrt(n))."""
    return float(torch.dot(x.view(-1).double().cpu(), r.double()))


def check_reply(
    claim: Claim,
    me: int,
    weight: float,
    own: float,
    own_norm: float,
    aggregate: torch.Tensor,
    error_bound: float,
    r: torch.Tensor,
) -> None:
    """Check a reducer's reply for one chunk (see the module docstring): `me` is our index among the senders,
    `own` the projection of the copy we sent (decoded) on the probe `r` and `own_norm` its norm, `aggregate`
    the reply decoded, `error_bound` the codec's bound for the reply. Raises ReducerCheatedError saying what
    does not add up."""
    c = claim.coefficients
    if min(c) < -1e-6 or abs(sum(c) - 1.0) > 1e-5 or (weight > 0 and c[me] <= 0):
        raise ReducerCheatedError(f"its coefficients {c} are not a weighting that includes our copy")
    r_norm = float(r.norm())
    if abs(claim.projections[me] - own) > DOT_SLACK * own_norm * r_norm + 1e-30:
        raise ReducerCheatedError(f"it misreports our own copy (projection {claim.projections[me]:.6g} != {own:.6g})")
    got = project(aggregate, r)
    expected = math.fsum(cj * tj for cj, tj in zip(c, claim.projections, strict=True))
    scale = max(float(aggregate.norm()), own_norm)
    tolerance = PROBE_Z * (error_bound + FP32_SLACK * len(c) * scale) + 2 * DOT_SLACK * scale * r_norm
    if not abs(got - expected) <= tolerance:
        raise ReducerCheatedError(
            f"its aggregate is not the combination of the copies it reports: projection {got:.6g}, expected "
            f"{expected:.6g} +- {tolerance:.3g}"
        )
