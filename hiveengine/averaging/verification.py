"""Verified reducers: a sender checks that the aggregate a reducer returned is the combination of the copies it
was sent, before applying it, with PROBES random projections per chunk and no extra message.

Construction (per chunk of a part; the K senders in peer-id order):
1. The reducer aggregates the decoded copies x_j into A = sum_j c_j x_j (c: the normalized weights for the mean,
   the center's coefficients for CenteredClip; c >= 0, sum c = 1, c_j = 0 for a copy left out) and encodes the
   reply R = encode(A).
2. Probes. r_1 .. r_m in R^n (m = PROBES), every value independent and uniform over the midpoints of 2^16 equal cells
   of (-sqrt 3, sqrt 3) (mean 0, variance 1 - 2^-32), read from an AES-128-CTR keystream keyed by
   BLAKE2b-128(PROBE_DOMAIN || group id || part || chunk || D(R) || c) (`Probes`: a keyed stream cipher as a
   deterministic generator, 16 bits per value), where D(R) = SHA-256 of R's dtypes, shapes and bytes (`reply_digest`,
   which the signed message below holds too: the reply is hashed once per check; SHA-256, which current CPUs compute
   in hardware, at about 1.5 times BLAKE2b's speed): fixed only once the reply and the coefficients are, and the same
   for the reducer and every sender. The coefficients are in the key because a reducer that could pick them after
   seeing the probes would fit them to any reply: with K > m senders whose copies differ, K coefficients can match m
   projections of a reply that is no combination of the copies at all (a red-team script passed every check of 32
   int8 senders with a reply 20 error bounds off). Uniform, not Gaussian, because AES-NI and a kernel that reads the
   keystream in place (kernels.probe_project) make them 5 to 10 times cheaper than torch's Gaussian draws (the probes
   are most of a check's cost), and the two bounds below hold for them as they do for Gaussians. 16 bits, not 32:
   half the keystream, each product x (w - 32767.5) exact in float64, and the bounds below move by under 0.5%.
3. The reply's header carries c, and t_jk = <x_j, r_k> for every sender j and probe k (`Claim`: K (m + 2) numbers
   with the norms below).
4. Sender i, on receipt (`check_reply`), before decoding R into its buffer: c is in the simplex with c_i > 0;
   its own t_ik equal <x_i, r_k> for the copy it sent; and the misfit, the norm of the m residuals
   <decode(R), r_k> - sum_j c_j t_jk, is at most sqrt(PROBE_CHI2) * (codec.error_bound(R) + fp32 slack).
   Requantization moves A by e with ||e|| <= error_bound(R), and for probes drawn after R and c the residuals
   <e, r_k> are m independent sums of uniform variables, sub-Gaussian with variance proxy ||e||^2 (as N(0, ||e||^2)
   would be: each value's moment generating function, a midpoint sum of the convex cosh, is at most the continuous
   uniform's, sinh(sqrt 3 t) / (sqrt 3 t) <= exp(t^2 / 2)), so E exp(s <e, r_k>^2 / ||e||^2) <= (1 - 2s)^(-1/2)
   and Chernoff's bound for the squared misfit is
   the chi-square(m) one: it exceeds x ||e||^2 with chance at most (x / m)^(m/2) exp(-(x - m) / 2), 1.6e-15 at
   x = PROBE_CHI2 = 96, so it never fires on an honest reply (lossy codecs included).
   A reply off by d (v = d + e) passes only when all m residuals <v, r_k> fall in the ball of radius
   T = sqrt(PROBE_CHI2) error_bound. By Ball's cube-slicing theorem no central section of the unit cube exceeds
   area sqrt 2, so the density of <v, u> / ||v|| for u uniform on the cube (-sqrt 3, sqrt 3)^n is at most 1 / sqrt 6 (a
   Gaussian's peak is 1 / sqrt(2 pi), 2.5% less), and the chance that all m projections on such probes fall in a ball
   of radius T' is at most 6^-4 (pi^4 / 24) (T' / ||v||)^8. The probes are that cube's grid: u = r + z with z uniform
   within each value's cell, independent of r, so <v, r_k> = <v, u_k> - <v, z_k>, where the m numbers <v, z_k> are
   sub-Gaussian with variance proxy (||v|| / 2^16)^2 (a cell's variance) and their norm exceeds rho =
   sqrt(PROBE_CHI2) ||v|| / 2^16 with chance at most 1.6e-15 (the bound above). So a reply passes with chance at most
   6^-4 (pi^4 / 24) ((T + rho) / ||v||)^8 + 1.6e-15: 2.7e-3 for a shift 10 times the band (one probe let 58% through)
   and 4e-7 for 30 times (rho / ||v|| = 1.5e-4 moves both by under 0.5%). The codec sets the band: error_bound is the
   worst case, half a step per value; for int8 that is about 1.4% of the reply's norm, so garbage or a sign flip is
   30 to 100 times the band, but for int4 it is up to a quarter, so a reply of pure noise is only about 4 times it
   and passes about 40% of the time (a flipped sign under 1%; tests/test_verified_reducers.py counts both).
   Verification with int4 tells a cheat from rounding only that far.
A failed check fails the part for this round (the sender keeps its local values there: replies are buffered
and decoded only once every chunk of the part passed) and bans the reducer on this peer (AllReduceService
.banned: it reduces nothing more for us and we average none of its copies).

Cost: sender: m probes (2 m n keystream bytes) and 2 m n-length dot products per chunk, in one pass of the native
kernel: about 5 ns per value in all (keystream, kernel, digest and decoding; 1.5 ms for a 315k-value part);
reducer: the probes, the copies decoded into a K x n matrix (the rows a robust aggregation decodes anyway, and
leaves as they are) and m matrix-vector passes for their projections and norms (2 ms for 8 copies of 315k
values);
8 K (m + 2) bytes of header per chunk (the claim's numbers as float64 bytes); no extra message or round trip.

What it catches: a reducer that returns anything but sum_j c_j x_j over the copies it reports projections of
(garbage, noise, a stale or partial aggregate, dropped or altered copies) while reporting honest
projections, and any lie about the checking sender's own copy (projection or coefficient).
What it does not catch (yet): an adaptive reducer that also forges the projection of a copy the checker never
saw: its own (when it sends) or another sender's. Where contributions can be recomputed, audits (audits.py) check
the claimed projections of a reducer's own copy against the recomputation, so its lie about its own copy is caught
at the audit rate; the weights and the other senders' rows stay unchecked. Closing the
rest takes the senders publishing their own projections to each other after the round (K^2 numbers, off the
critical path) and a Gram-matrix check of CenteredClip's coefficients. Until then a reducer that cheats adaptively
can move its part as far as a sender with all the weight could.
Nor does it stop grinding: the reducer picks R, and with it the probes. The chance above is per reply; a reducer
that tries replies until one passes (each slightly different R, say through the claimed coefficients, gives fresh
probes) gets a shift through after about the inverse of that chance in tries of a hash and 2 m n keystream
bytes each: about 400 for 10 times the band, 2.5 million for 30 (with one probe it was about ||d|| / (8 ||e||):
4). What a reply check bounds is then the work a given shift costs. Probes the reducer cannot know while it fixes
R (each sender's own, revealed after R: the same K^2 exchange) would make it a chance again.

Accusations that anyone can check (`Evidence`). The reducer also reports the norm q_j of every decoded copy, and
signs, with its Ed25519 identity, `claim_message`: REPLY_DOMAIN | group id | part | chunk | numel | codec name |
D(R) | c, t (sender by sender) and q as float64. A sender whose check fails keeps the reply,
the claim and the signature as evidence, and publishes it only when the evidence alone shows the cheat
(`Evidence.cheat`): the signature verifies under the key whose SHA-256 is the accused's peer id, and the signed
claim contradicts itself (c outside the simplex) or contradicts the signed reply (its misfit exceeds the
tolerance above, with the copies' scale taken as max(||decode(R)||, max q_j)). A third
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
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hiveengine.codec import CODECS, get_codec
from hiveengine.dht.schemas import EVIDENCE_DIGEST_BYTES
from hiveengine.errors import HiveEngineError, NonFiniteError
from hiveengine.kernels import PROBE_COUNT, probe_project
from hiveengine.transport.identity import SIGNATURE_BYTES, PeerID, verify_signature

PROBE_DOMAIN = b"hiveengine/allreduce/probe/v4"
REPLY_DOMAIN = b"hiveengine/allreduce/signed-claim/v4"
MAX_EVIDENCE_NUMEL = 1 << 22  # the largest chunk an accusation's evidence may hold (16 MiB of fp32; 4 default chunks)
MAX_EVIDENCE_SENDERS = 4096  # the most senders an accusation's claim may list
PROBES = PROBE_COUNT  # independent probes per chunk (8): a reply must fit all of them at once
PROBE_BITS = 16  # keystream bits per probe value
PROBE_PIECE = 1 << 15  # values whose probe keystream is made at once (512 KiB for the 8 probes)
PROBE_STEP = 2 * math.sqrt(3) * 2.0**-PROBE_BITS  # a probe value per unit of its 16-bit keystream word
PROBE_LOW = -(2 ** (PROBE_BITS - 1) - 0.5) * PROBE_STEP  # word 0's value, near -sqrt 3 (word w: PROBE_LOW + w STEP)
PROBE_CHI2 = 96.0  # an honest reply's squared misfit bound, in squared error bounds: exceeded with chance <= 1.6e-15
FP32_SLACK = 64 * 2.0**-24  # the fp32 aggregation's rounding, relative to the copies' norms, per copy
DOT_SLACK = 2.0**-40  # rounding of a float64 dot product of fp32 vectors, relative to ||x|| ||r||
MAX_CLAIM_MAGNITUDE = 1e300  # the largest number a claim may hold: sums of products of MAX_EVIDENCE_SENDERS stay finite


class ReducerCheatedError(HiveEngineError):
    """A reducer's reply is not the aggregate of the copies it was sent: its part is failed and it is banned.
    `evidence`: the signed reply, when it alone shows the cheat (what an accusation publishes)."""

    evidence: Evidence | None = None


@dataclass(frozen=True, eq=False)
class Claim:
    """What a reducer says it computed for one chunk: each sender's coefficient, projections (one per probe) and
    copy norm (peer-id order; float64 arrays, K, K x PROBES and K or none), and its signature of them with the reply
    (`claim_message`; empty when unsigned)."""

    coefficients: np.ndarray
    projections: np.ndarray
    norms: np.ndarray = field(default_factory=lambda: np.empty(0))
    signature: bytes = b""

    def __post_init__(self):
        for name in ("coefficients", "projections", "norms"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))

    def header(self) -> dict:
        """The reply-header fields that carry the claim: the numbers as little-endian float64 bytes."""
        return {
            "k": _packed(self.coefficients),
            "t": _packed(self.projections),
            "q": _packed(self.norms),
            "s": self.signature,
        }

    @classmethod
    def parse(cls, header: dict, senders: int) -> Claim:
        """The claim in a reply header, if it has one number of each kind per sender (else ReducerCheatedError);
        norms and signature are kept only when well-formed (they serve accusations, not the check)."""
        k, t, q, signature = header.get("k"), header.get("t"), header.get("q"), header.get("s")
        if not (isinstance(k, bytes) and isinstance(t, bytes) and len(k) == 8 * senders):
            raise ReducerCheatedError(f"the reply carries no claim for its {senders} senders' copies")
        if len(t) != 8 * PROBES * senders:
            raise ReducerCheatedError(f"the reply's claim does not give {PROBES} projections of every copy")
        signed = isinstance(q, bytes) and len(q) == 8 * senders
        signed = signed and isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES
        numbers = _unpacked(k + t + q if signed else k + t)
        claimed, norms = numbers[: (PROBES + 1) * senders], numbers[(PROBES + 1) * senders :]
        if not _claim_numbers(claimed):
            raise ReducerCheatedError(f"the reply's claim holds numbers non-finite or beyond {MAX_CLAIM_MAGNITUDE:g}")
        coefficients, projections = claimed[:senders], claimed[senders:].reshape(senders, PROBES)
        signed = signed and _claim_numbers(norms)
        return cls(coefficients, projections, norms if signed else np.empty(0), signature if signed else b"")


def _packed(numbers: np.ndarray) -> bytes:
    """`numbers` as little-endian float64 bytes, in row order (what a claim carries and signs)."""
    return np.ascontiguousarray(numbers, dtype="<f8").tobytes()


def _unpacked(raw: bytes) -> np.ndarray:
    """Little-endian float64 bytes as a float64 array (a copy: it outlives the message)."""
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def _claim_numbers(numbers: np.ndarray) -> bool:
    """Whether every number is one a claim may hold: finite and at most MAX_CLAIM_MAGNITUDE, so that no check's sum
    overflows (an OverflowError there would fail the part without the ban a cheat earns)."""
    return bool(np.all(np.abs(numbers) <= MAX_CLAIM_MAGNITUDE))  # NaN compares false


def reply_digest(reply: Sequence[torch.Tensor]) -> bytes:
    """D(R): SHA-256 of a reply's tensors' dtypes, shapes and bytes (what its probe and signed claim name)."""
    digest = hashlib.sha256()
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
    return b"".join(
        (
            REPLY_DOMAIN,
            group_id,
            struct.pack("<IIQ", part, chunk, numel),
            codec_name.encode(),
            b"\0",
            digest,
            _packed(claim.coefficients),
            _packed(claim.projections),
            _packed(claim.norms),
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
        if not isinstance(k, bytes) or len(k) % 8 or not 1 <= len(k) // 8 <= MAX_EVIDENCE_SENDERS:
            raise ValueError("evidence needs a claim")
        try:
            claim = Claim.parse(header, len(k) // 8)
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
        if not _weighting(c):
            return f"it signed coefficients {c.tolist()} that are not a weighting"
        codec = get_codec(self.codec_name)
        where = f"chunk {self.chunk} of part {self.part} in round {self.group_id.hex()[:8]}"
        try:
            aggregate = codec.decode(self.reply, torch.empty(self.numel), name="an accused reply")
        except NonFiniteError:
            return f"its signed reply for {where} holds NaN or Inf"
        probes = Probes(self.group_id, self.part, self.chunk, self.reply_digest, self.numel, c)
        (got,), (norm,) = probes.project(aggregate.view(1, -1))
        scale = max(norm, float(self.claim.norms.max()))
        tolerance = _tolerance(codec.error_bound(self.reply), len(c), scale, probes.norm_bound)
        off = misfit(got, c, self.claim.projections)
        if off <= tolerance:
            return None
        return (
            f"its signed reply for {where} is not the combination of the copies it reports (misfit {off:.6g}, "
            f"tolerance {tolerance:.3g})"
        )


def _tolerance(error_bound: float, senders: int, scale: float, probe_norm: float) -> float:
    """How large an honest reply's misfit may be (see the module docstring): the chi-square band of its rounding."""
    return projection_band(error_bound + FP32_SLACK * senders * scale, scale, probe_norm)


def projection_band(distance: float, scale: float, probe_norm: float) -> float:
    """How far apart the projections of two vectors at most `distance` apart may honestly lie on a reply's probes
    (drawn after both were fixed): the chi-square band of the distance (exceeded with chance at most 1.6e-15), plus
    the float64 dot products' rounding (two per probe, each within DOT_SLACK of scale * probe_norm, `scale` bounding
    both vectors' norms)."""
    dots = 2 * DOT_SLACK * scale * probe_norm * math.sqrt(PROBES)
    return math.sqrt(PROBE_CHI2) * distance + dots


def misfit(got: np.ndarray, coefficients: np.ndarray, projections: np.ndarray) -> float:
    """The norm of the residuals <decode(R), r_k> - sum_j c_j t_jk over the probes (`got`: the reply's projections),
    each sum exact (math.fsum): every party that checks the same claim gets the same number. math.hypot, because
    squaring residuals past 1e154 (a claim may hold numbers up to MAX_CLAIM_MAGNITUDE) overflowed fsum, and an
    OverflowError failed the part without the ban a cheat earns."""
    columns = (coefficients[:, None] * projections).T.tolist()
    return math.hypot(*(float(g) - math.fsum(column) for g, column in zip(got.tolist(), columns, strict=True)))


def _weighting(coefficients: np.ndarray) -> bool:
    """Whether the coefficients lie in the simplex (up to rounding)."""
    return float(coefficients.min()) >= -1e-6 and abs(math.fsum(coefficients.tolist()) - 1.0) <= 1e-5


class Probes:
    """The PROBES probes of one chunk's reply whose reply_digest is `digest`, claimed to combine the copies with
    `coefficients`: values uniform on (-sqrt 3, sqrt 3) (2^16 equal cells' midpoints; mean 0, variance 1 - 2^-32)
    from an AES-128-CTR keystream keyed by BLAKE2b-128(PROBE_DOMAIN || group id || part || chunk || digest ||
    coefficients as float64), zero initial counter, read value by value (value i of probe k is 16-bit little-endian
    word i PROBES + k, w, giving PROBE_LOW + w PROBE_STEP): fixed by the reply and its claimed coefficients, and the
    same on every machine. The keystream is made PROBE_PIECE values at a time into a buffer each thread reuses, so a
    check's memory stays bounded and its pages are not faulted in anew every round."""

    def __init__(self, group_id: bytes, part: int, chunk: int, digest: bytes, numel: int, coefficients: np.ndarray):
        fixed = (PROBE_DOMAIN, group_id, struct.pack("<II", part, chunk), digest, _packed(coefficients))
        self.key = hashlib.blake2b(b"".join(fixed), digest_size=16).digest()  # c fixed first: else fitted to R
        self.numel = numel

    @property
    def norm_bound(self) -> float:
        """A bound on every probe's norm: each value is at most sqrt 3 in size."""
        return math.sqrt(3 * self.numel)

    def project(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(each row's projections on the probes, rows x PROBES; each row's norm), in float64: an fp32 dot product's
        rounding would widen the tolerance for garbage to slip through. The keystream is made on the host;
        kernels.probe_project reads it without materializing the probes (on a device, the rows stay there and only
        the results cross to the host)."""
        rows = rows.detach().float()
        if not self.numel:
            return np.zeros((rows.shape[0], PROBES)), np.zeros(rows.shape[0])
        stream = Cipher(algorithms.AES(self.key), modes.CTR(bytes(16))).encryptor()
        zeros, keystream = _keystream_buffers()
        projections = row_sq = None
        for start in range(0, self.numel, PROBE_PIECE):
            count = min(PROBE_PIECE, self.numel - start)
            stream.update_into(zeros[: 2 * PROBES * count], keystream)
            words = torch.frombuffer(keystream, dtype=torch.int16, count=PROBES * count).view(count, PROBES)
            piece = rows[:, start : start + count]
            projected, squared = probe_project(piece, words, PROBE_STEP, row_norms=True)
            if projections is None:
                projections, row_sq = projected, squared
            else:
                projections += projected
                row_sq += squared
        return projections.cpu().numpy(), np.sqrt(row_sq.cpu().numpy())


_scratch = threading.local()


def _keystream_buffers() -> tuple[memoryview, bytearray]:
    """Zeros to encrypt and room for the keystream of one piece (update_into's 15 bytes more), this thread's own."""
    if not hasattr(_scratch, "keystream"):
        _scratch.zeros = memoryview(bytes(2 * PROBES * PROBE_PIECE))
        _scratch.keystream = bytearray(2 * PROBES * PROBE_PIECE + 15)
    return _scratch.zeros, _scratch.keystream


def check_reply(
    claim: Claim,
    me: int,
    weight: float,
    projected: np.ndarray,
    norms: np.ndarray,
    probe_norm: float,
    error_bound: float,
) -> None:
    """Check a reducer's reply for one chunk (see the module docstring): `me` is our index among the senders,
    `projected` the projections on the reply's probes (`Probes.project`) of the copy we sent (decoded, row 0) and
    of the reply decoded (row 1), `norms` their norms, `probe_norm` the probes' norm bound (`Probes.norm_bound`),
    `error_bound` the codec's bound for the reply. Raises ReducerCheatedError saying what does not add up."""
    c = claim.coefficients
    if not _weighting(c) or (weight > 0 and c[me] <= 0):
        raise ReducerCheatedError(f"its coefficients {c.tolist()} are not a weighting that includes our copy")
    own, got = projected
    own_norm, norm = float(norms[0]), float(norms[1])
    claimed = claim.projections[me]
    wrong = np.flatnonzero(~(np.abs(claimed - own) <= DOT_SLACK * own_norm * probe_norm + 1e-30))
    if wrong.size:
        k = int(wrong[0])
        raise ReducerCheatedError(
            f"it misreports our own copy (projection {claimed[k]:.6g} != {float(own[k]):.6g} on probe {k})"
        )
    tolerance = _tolerance(error_bound, len(c), max(norm, own_norm), probe_norm)
    off = misfit(got, c, claim.projections)
    if not off <= tolerance:
        raise ReducerCheatedError(
            f"its aggregate is not the combination of the copies it reports: misfit {off:.6g}, tolerance "
            f"{tolerance:.3g}"
        )
