"""Verified reducers: a sender checks that the aggregate a reducer returned is the combination of the copies it
was sent, before applying it, with one random projection per chunk and no extra message.

Construction (per chunk of a part; the K senders in peer-id order):
1. The reducer aggregates the decoded copies x_j into A = sum_j c_j x_j (c: the normalized weights for the mean,
   the center's coefficients for CenteredClip; c >= 0, sum c = 1, c_j = 0 for a copy left out) and encodes the
   reply R = encode(A).
2. Probe. r in R^n, Gaussian, from a generator seeded with BLAKE2b(PROBE_DOMAIN || group id || part || chunk ||
   D(R)) (`probe`), where D(R) = BLAKE2b-256 of R's dtypes, shapes and bytes (`reply_digest`, which the signed
   message below holds too: the reply is hashed once per check): fixed only once the reply is, and the same for
   the reducer and every sender.
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

Cost: sender: one probe (n Gaussian values) and two n-length dot products per chunk; reducer: the probe, the copies
decoded into a K x n matrix (the rows a robust aggregation decodes anyway, kept before it works on them in place)
and one matrix pass for their projections and norms; 16 K bytes of header per chunk; no extra message or round
trip.

What it catches: a reducer that returns anything but sum_j c_j x_j over the copies it reports projections of
(garbage, noise, a stale or partial aggregate, dropped or altered copies) while reporting honest
projections, and any lie about the checking sender's own copy (projection or coefficient).
What it does not catch (yet): an adaptive reducer that also forges the projection of a copy the checker never
saw: its own (when it sends) or another sender's. Closing that gap takes the senders publishing their own
projections to each other after the round (K^2 numbers, off the critical path) and a Gram-matrix check of
CenteredClip's coefficients. Until then a reducer that cheats adaptively can move its part as far as a sender with
all the weight could.
Nor does it stop grinding: the reducer picks R, and with it the probe. The chance above is per reply; a reducer
that tries replies until one passes (each slightly different R, say through the claimed coefficients, gives a fresh
probe) gets a shift d through after about ||d|| / (Z * ||e||) tries of a hash and n Gaussian draws each. What a
reply check bounds is then the work a given shift costs, not whether it can pass. A probe the reducer cannot know
while it fixes R (each sender's own, revealed after R: the same K^2 exchange) closes this too.

Accusations that anyone can check (`Evidence`). The reducer also reports the norm q_j of every decoded copy, and
signs, with its Ed25519 identity, `claim_message`: REPLY_DOMAIN | group id | part | chunk | numel | codec name |
D(R) | c, t and q as float64. A sender whose check fails keeps the reply,
the claim and the signature as evidence, and publishes it only when the evidence alone shows the cheat
(`Evidence.cheat`): the signature verifies under the key whose SHA-256 is the accused's peer id, and the signed
claim contradicts itself (c outside the simplex) or contradicts the signed reply (<decode(R), r> differs from
sum c_j t_j by more than the tolerance above, with the copies' scale taken as max(||decode(R)||, max q_j)). A third
party recomputes all of it from the evidence, so an accusation cannot frame an honest reducer: its signed claims
add up. A reducer that reports inflated norms only widens the band it is judged by (its accusation may then not
spread, but its local ban stays). The misreport of the checker's own copy is not in the evidence: a third party
cannot know what the checker sent.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hiveengine.codec import CODECS, get_codec
from hiveengine.dht.schemas import EVIDENCE_DIGEST_BYTES, is_finite
from hiveengine.errors import HiveEngineError, NonFiniteError
from hiveengine.transport.identity import SIGNATURE_BYTES, PeerID, verify_signature

PROBE_DOMAIN = b"hiveengine/allreduce/probe/v1"
REPLY_DOMAIN = b"hiveengine/allreduce/signed-claim/v1"
MAX_EVIDENCE_NUMEL = 1 << 24  # the largest chunk an accusation's evidence may hold (64 MiB of fp32)
MAX_EVIDENCE_SENDERS = 4096  # the most senders an accusation's claim may list
PROBE_Z = 8.0  # standard deviations of the requantization error's projection an honest reply may be off by
FP32_SLACK = 64 * 2.0**-24  # the fp32 aggregation's rounding, relative to the copies' norms, per copy
DOT_SLACK = 2.0**-40  # rounding of a float64 dot product of fp32 vectors, relative to ||x|| ||r||


class ReducerCheatedError(HiveEngineError):
    """A reducer's reply is not the aggregate of the copies it was sent: its part is failed and it is banned.
    `evidence`: the signed reply, when it alone shows the cheat (what an accusation publishes)."""

    evidence: Evidence | None = None


@dataclass(frozen=True)
class Claim:
    """What a reducer says it computed for one chunk: each sender's coefficient, projection and copy norm (peer-id
    order), and its signature of them with the reply (`claim_message`; empty when unsigned)."""

    coefficients: list[float]
    projections: list[float]
    norms: list[float] = field(default_factory=list)
    signature: bytes = b""

    def header(self) -> dict:
        """The reply-header fields that carry the claim."""
        return {"k": self.coefficients, "t": self.projections, "q": self.norms, "s": self.signature}

    @classmethod
    def parse(cls, header: dict, senders: int) -> Claim:
        """The claim in a reply header, if it has one number of each kind per sender (else ReducerCheatedError);
        norms and signature are kept only when well-formed (they serve accusations, not the check)."""
        k, t = header.get("k"), header.get("t")
        if not (isinstance(k, list) and isinstance(t, list) and len(k) == len(t) == senders):
            raise ReducerCheatedError(f"the reply carries no claim for its {senders} senders' copies")
        if not all(is_finite(v) for v in (*k, *t)):
            raise ReducerCheatedError("the reply's claim holds non-numbers or non-finite values")
        q, signature = header.get("q"), header.get("s")
        signed = (
            isinstance(q, list)
            and len(q) == senders
            and all(is_finite(v) for v in q)
            and isinstance(signature, bytes)
            and len(signature) == SIGNATURE_BYTES
        )
        norms = [float(v) for v in q] if signed else []
        return cls([float(v) for v in k], [float(v) for v in t], norms, signature if signed else b"")


def reply_digest(reply: Sequence[torch.Tensor]) -> bytes:
    """D(R): BLAKE2b-256 of a reply's tensors' dtypes, shapes and bytes (what its probe and signed claim name)."""
    digest = hashlib.blake2b(digest_size=32)
    for tensor in reply:
        raw = tensor.detach()
        if raw.device.type != "cpu" or not raw.is_contiguous():
            raw = raw.contiguous().cpu()
        digest.update(f"{raw.dtype}{tuple(raw.shape)}".encode())
        digest.update(raw.view(torch.uint8).numpy() if raw.numel() else b"")
    return digest.digest()


def claim_message(
    group_id: bytes, part: int, chunk: int, numel: int, codec_name: str, digest: bytes, claim: Claim
) -> bytes:
    """What a reducer signs for one chunk's reply, whose reply_digest is `digest` (see the module docstring)."""
    numbers = [*claim.coefficients, *claim.projections, *claim.norms]
    return b"".join(
        (
            REPLY_DOMAIN,
            group_id,
            struct.pack("<IIQ", part, chunk, numel),
            codec_name.encode(),
            b"\0",
            digest,
            struct.pack(f"<{len(numbers)}d", *numbers),
        )
    )


@dataclass(frozen=True)
class Evidence:
    """A reducer's signed reply and claim for one chunk: what an accusation against it rests on."""

    public_key: bytes  # the accused reducer's Ed25519 key (its peer id is the key's SHA-256)
    group_id: bytes
    part: int
    chunk: int
    numel: int
    codec_name: str
    reply: list[torch.Tensor]
    claim: Claim

    @property
    def accused(self) -> PeerID:
        return PeerID.from_public_key(self.public_key)

    @functools.cached_property
    def digest(self) -> bytes:
        """Names the evidence in accusations (16 bytes of BLAKE2b over the signed message and the signature)."""
        return hashlib.blake2b(self.message + self.claim.signature, digest_size=EVIDENCE_DIGEST_BYTES).digest()

    @functools.cached_property
    def message(self) -> bytes:
        """What the accused signed (claim_message)."""
        args = (self.group_id, self.part, self.chunk, self.numel, self.codec_name)
        return claim_message(*args, self.reply_digest, self.claim)

    @functools.cached_property
    def reply_digest(self) -> bytes:
        """D(R) of the signed reply (hashed once: the message and the probe both name it)."""
        return reply_digest(self.reply)

    def header(self) -> dict:
        """The evidence as a message header (its reply tensors travel as the message's frames)."""
        return {
            "key": self.public_key,
            "g": self.group_id,
            "p": self.part,
            "c": self.chunk,
            "n": self.numel,
            "codec": self.codec_name,
            **self.claim.header(),
        }

    @staticmethod
    def buffers(header: dict) -> list[torch.Tensor]:
        """Fresh CPU buffers for the reply that evidence with `header` carries (its codec's payload of its numel
        elements: at most MAX_EVIDENCE_NUMEL), to receive it into; ValueError if the header cannot name one."""
        numel, codec_name = header.get("n"), header.get("codec")
        if not (isinstance(numel, int) and not isinstance(numel, bool) and 0 <= numel <= MAX_EVIDENCE_NUMEL):
            raise ValueError(f"evidence of {numel!r:.20} elements cannot be checked (at most {MAX_EVIDENCE_NUMEL})")
        if not isinstance(codec_name, str) or codec_name not in CODECS:
            raise ValueError(f"evidence with codec {codec_name!r:.20} cannot be checked")
        return get_codec(codec_name).empty_payload(numel, "cpu")

    @classmethod
    def parse(cls, header: dict, reply: Sequence[torch.Tensor]) -> Evidence:
        """Evidence from a message (header and frames); ValueError if it is malformed or too large to check."""
        key, group_id, part, chunk, numel, codec_name = (header.get(f) for f in ("key", "g", "p", "c", "n", "codec"))
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(group_id, bytes) and len(group_id) <= 64):
            raise ValueError("evidence needs a 32-byte key and a group id")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in (part, chunk, numel)):
            raise ValueError("evidence needs part, chunk and numel counts")
        expected = cls.buffers(header)
        k = header.get("k")
        if not isinstance(k, list) or not 1 <= len(k) <= MAX_EVIDENCE_SENDERS:
            raise ValueError("evidence needs a claim")
        try:
            claim = Claim.parse(header, len(k))
        except ReducerCheatedError as e:
            raise ValueError(str(e)) from None
        if not claim.signature:
            raise ValueError("the evidence's claim is not signed")
        if len(reply) != len(expected) or any(
            t.dtype != e.dtype or t.shape != e.shape for t, e in zip(reply, expected, strict=False)
        ):
            raise ValueError(f"the evidence's reply is not a {codec_name} payload of {numel} elements")
        return cls(key, group_id, part, chunk, numel, codec_name, [t.cpu() for t in reply], claim)

    def cheat(self) -> str | None:
        """What the signed evidence shows the accused did (see the module docstring), or None if it shows nothing:
        a bad signature, or a claim that adds up."""
        if not verify_signature(self.public_key, self.claim.signature, self.message):
            return None
        c = self.claim.coefficients
        if min(c) < -1e-6 or abs(sum(c) - 1.0) > 1e-5:
            return f"it signed coefficients {c} that are not a weighting"
        codec = get_codec(self.codec_name)
        where = f"chunk {self.chunk} of part {self.part} in round {self.group_id.hex()[:8]}"
        try:
            aggregate = codec.decode(self.reply, torch.empty(self.numel), name="an accused reply")
        except NonFiniteError:
            return f"its signed reply for {where} holds NaN or Inf"
        r = probe(self.group_id, self.part, self.chunk, self.reply_digest, self.numel)
        got, norm = project_and_norm(aggregate, r)
        expected = math.fsum(cj * tj for cj, tj in zip(c, self.claim.projections, strict=True))
        scale = max(norm, *self.claim.norms)
        tolerance = _tolerance(codec.error_bound(self.reply), len(c), scale, probe_norm(r))
        if abs(got - expected) <= tolerance:
            return None
        return (
            f"its signed reply for {where} is not the combination of the copies it reports (projection {got:.6g}, "
            f"signed {expected:.6g} +- {tolerance:.3g})"
        )


def _tolerance(error_bound: float, senders: int, scale: float, r_norm: float) -> float:
    """How far an honest reply's projection may be from the claim's (see the module docstring)."""
    return PROBE_Z * (error_bound + FP32_SLACK * senders * scale) + 2 * DOT_SLACK * scale * r_norm


def probe(group_id: bytes, part: int, chunk: int, digest: bytes, numel: int) -> torch.Tensor:
    """The Gaussian probe vector for one chunk's reply whose reply_digest is `digest` (fp32 draws held as float64,
    CPU): fixed by the reply itself."""
    seed = hashlib.blake2b(PROBE_DOMAIN, digest_size=8)
    seed.update(group_id)
    seed.update(part.to_bytes(4, "little") + chunk.to_bytes(4, "little"))
    seed.update(digest)
    generator = torch.Generator().manual_seed(int.from_bytes(seed.digest(), "little") & (2**63 - 1))
    return torch.randn(numel, generator=generator).double()


def probe_norm(r: torch.Tensor) -> float:
    """||r|| for a probe (host float64, through numpy: a fraction of a torch call's cost at a chunk's size)."""
    values = r.numpy()
    return math.sqrt(float(values @ values))


def project_and_norm(x: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """(<x, r>, ||x||) in float64, for the probe `r` (float64, as `probe` gives it: an fp32 dot product's rounding
    would widen the tolerance, and a garbage reply could slip through it with a chance of ~1e-5 sqrt(n)); on the
    host through numpy's dot products (a matrix pass over one row costs twice as much at a round's chunk sizes), on
    a device as project_rows does."""
    if x.device.type != "cpu":
        (projection,), (norm,) = project_rows(x.detach().reshape(1, -1), r)
        return projection, norm
    values = x.detach().reshape(-1).numpy().astype(np.float64)
    return float(np.dot(values, r.numpy())), math.sqrt(float(np.dot(values, values)))


def project_rows(rows: torch.Tensor, r: torch.Tensor) -> tuple[list[float], list[float]]:
    """(<row, r>, ||row||) in float64 for each row of a K x n matrix (a reducer's K copies), in two matrix passes.
    On the host through numpy, whose calls cost a fraction of torch's on a round's chunk sizes; on a device there,
    so that only the 2K results cross to the host."""
    if rows.device.type != "cpu":
        values = rows.detach().double()
        return (values @ r.to(values.device)).tolist(), values.norm(dim=1).tolist()
    values = rows.detach().numpy().astype(np.float64)
    return (values @ r.numpy()).tolist(), np.sqrt(np.einsum("ij,ij->i", values, values)).tolist()


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
    r_norm = probe_norm(r)
    if abs(claim.projections[me] - own) > DOT_SLACK * own_norm * r_norm + 1e-30:
        raise ReducerCheatedError(f"it misreports our own copy (projection {claim.projections[me]:.6g} != {own:.6g})")
    got, norm = project_and_norm(aggregate, r)
    expected = math.fsum(cj * tj for cj, tj in zip(c, claim.projections, strict=True))
    scale = max(norm, own_norm)
    tolerance = _tolerance(error_bound, len(c), scale, r_norm)
    if not abs(got - expected) <= tolerance:
        raise ReducerCheatedError(
            f"its aggregate is not the combination of the copies it reports: projection {got:.6g}, expected "
            f"{expected:.6g} +- {tolerance:.3g}"
        )
