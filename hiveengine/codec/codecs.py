"""Wire codecs for the averager: how one flat part of a tensor travels, and how K copies are reduced.

A payload is a list of contiguous tensors, ready to send as frames: one fp32 or 16-bit tensor for the
float codecs, (codes, scales) for the blockwise ones. Every codec refuses NaN/Inf (NonFiniteError naming
the tensor) on encode, decode and reduce, so a bad gradient or a corrupt peer payload never reaches the
average silently. A codec declares what the all-reduce needs to know of it: `alignment` (parts are cut at
multiples of it) and `lossless` (the payload is the fp32 values themselves, so a mean can land in place).
`reduce` takes the mean in one fused pass, or, with a robust Aggregation (see hiveengine.codec.robust), decodes
each copy to fp32 and aggregates those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from hiveengine.codec.robust import Aggregation, centered_clip
from hiveengine.errors import ConfigurationError
from hiveengine.kernels import (
    DEFAULT_BLOCK,
    bytes_per_element,
    cast,
    check_finite,
    codes_dtype,
    codes_numel,
    dequantize_blockwise,
    num_blocks,
    quantize_blockwise,
    reduce_blockwise,
    weighted_mean,
)
from hiveengine.kernels.layout import check_format

Payload = list[torch.Tensor]


class Codec(ABC):
    """One wire format: encode a tensor to a payload, decode a payload in place, reduce K payloads."""

    name: str
    #: Whether encode accepts an error-feedback residual (the blockwise codecs; fp16/bf16 rounding is too
    #: small to be worth a residual buffer).
    supports_error_feedback: bool = False
    #: Tensors per payload.
    frames: int = 1

    @property
    @abstractmethod
    def bytes_per_element(self) -> float:
        """Wire bytes per value, including amortized per-block scales."""

    def payload_nbytes(self, numel: int) -> int:
        """Exact wire bytes of the payload of a part of `numel` values."""
        return sum(t.numel() * t.element_size() for t in self.empty_payload(numel, torch.device("meta")))

    @abstractmethod
    def empty_payload(self, numel: int, device: torch.device | str) -> Payload:
        """Uninitialized tensors shaped like the payload of `numel` values (receive or encode buffers)."""

    @abstractmethod
    def encode(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        out: Payload | None = None,
        name: str = "tensor",
    ) -> Payload:
        """Encode contiguous x (fp32/fp16/bf16) for the wire, into `out` if given. With `residual`, encode
        x + residual and store the new encoding error in it (error feedback; int8/int4 only)."""

    @abstractmethod
    def decode(self, payload: Sequence[torch.Tensor], out: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """Decode a payload into `out` (contiguous, any float dtype; its size gives the length) and return it."""

    def decode_rows(self, payloads: Sequence[Sequence[torch.Tensor]], rows: torch.Tensor, *, name: str) -> None:
        """Decode K payloads into the rows of a contiguous fp32 K x n matrix (a reducer's copies, for a robust
        aggregation or a verification claim)."""
        for i, payload in enumerate(payloads):
            self.decode(payload, rows[i], name=f"copy {i} of {name}")

    @property
    def alignment(self) -> int:
        """Parts of a buffer are cut at multiples of this many values (a blockwise codec's block)."""
        return 1

    @property
    def lossless(self) -> bool:
        """Whether the payload is the fp32 values themselves (decoding is the identity)."""
        return False

    @abstractmethod
    def error_bound(self, payload: Sequence[torch.Tensor]) -> float:
        """An upper bound on the L2 norm of decode(payload) - x for the x it was encoded from (without error
        feedback): what a verifier of a requantized aggregate must tolerate."""

    @abstractmethod
    def finite(self, payload: Sequence[torch.Tensor]) -> bool:
        """Whether `payload` decodes to finite values only (a cheap check: the scales of blockwise codes)."""

    def reduce(
        self,
        payloads: Sequence[Sequence[torch.Tensor]],
        weights: Sequence[float] | torch.Tensor,
        out: torch.Tensor,
        *,
        requantize: bool = False,
        name: str = "tensor",
        aggregation: Aggregation | None = None,
        scratch: torch.Tensor | None = None,
        coefficients: list[float] | None = None,
        copies: torch.Tensor | None = None,
    ) -> Payload | None:
        """Aggregate K payloads into fp32 `out` (weights normalized to sum to one): their weighted mean in one
        fused pass; with a robust `aggregation`, also each copy decoded into a row of `copies` when given, else of
        `scratch` (fp32, at least K x n values, any shape, made when None), and the mean replaced by their robust
        aggregate if it differs. With `requantize`, also return the result encoded for the return trip. A
        `coefficients` list receives the result's coefficient of each decoded copy (out = sum_j c_j copy_j), and
        `copies` (fp32, at least K x n values) each copy decoded, in order: what a reducer's verification claim is
        computed from.
        Raises NonFiniteError if a payload holds NaN or Inf."""
        payloads = _check_payloads(payloads, self.frames, name)
        mean = self._mean(payloads, weights, out, requantize, name)
        if coefficients is not None:
            total = float(sum(float(w) for w in weights))
            coefficients[:] = [float(w) / total if total > 0 else 1.0 / len(payloads) for w in weights]
        n = out.numel()
        kept = None if copies is None else copies.view(-1)[: len(payloads) * n].view(len(payloads), n)
        if aggregation is None or not aggregation.robust or len(payloads) <= 2:
            if kept is not None:
                self.decode_rows(payloads, kept, name=name)
            return mean
        if kept is None and scratch is None:
            scratch = torch.empty(len(payloads) * n, dtype=torch.float32, device=out.device)
        rows = kept if kept is not None else scratch.view(-1)[: len(payloads) * n].view(len(payloads), n)
        self.decode_rows(payloads, rows, name=name)
        clipped = centered_clip(rows, [float(w) for w in weights], out.view(-1), aggregation, mean_ready=True)
        if clipped is None:
            return mean
        if coefficients is not None:
            coefficients[:] = clipped
        return self.encode(out.view(-1), name=f"aggregate of {name}") if requantize else mean

    @abstractmethod
    def _mean(
        self, payloads: Sequence[Sequence[torch.Tensor]], weights, out: torch.Tensor, requantize: bool, name: str
    ) -> Payload | None:
        """The weighted mean of the payloads into `out` in one fused pass (and its payload, with `requantize`)."""

    def _refuse_residual(self, residual: torch.Tensor | None) -> None:
        if residual is not None:
            raise ConfigurationError(f"the {self.name} codec takes no error-feedback residual; pass residual=None")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FloatCodec(Codec):
    """Values as fp32 (`none`: lossless) or as fp16/bf16 (round half to even; fp16 refuses |x| > 65504)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    @property
    def bytes_per_element(self) -> float:
        """Bytes on the wire per element (4 for `none`, which sends fp32; 2 for fp16 and bf16)."""
        return float(torch.empty((), dtype=self.dtype).element_size())

    def empty_payload(self, numel: int, device: torch.device | str) -> Payload:
        """Preallocated payload tensors for `numel` elements on `device` (receive buffers)."""
        return [torch.empty(numel, dtype=self.dtype, device=device)]

    def encode(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        out: Payload | None = None,
        name: str = "tensor",
    ) -> Payload:
        """Encode `x` as one tensor of this codec's dtype (`out` reuses a payload; float codecs keep no residual)."""
        self._refuse_residual(residual)
        if out is None and x.dtype == self.dtype and x.is_contiguous():
            # Already in wire format: send it as is (the caller keeps it unchanged until sent).
            check_finite(x, name=name)
            return [x.view(-1)]
        target = out[0] if out is not None else None
        return [cast(x, self.dtype, out=target, name=name).view(-1)]

    def decode(self, payload: Sequence[torch.Tensor], out: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """Decode a payload into `out` (cast to `out`'s dtype) and return it."""
        (values,) = payload
        return cast(values, out.dtype, out=out, name=f"decoded {name}")

    @property
    def lossless(self) -> bool:
        """True for `none` (fp32 values on the wire)."""
        return self.dtype == torch.float32

    def error_bound(self, payload: Sequence[torch.Tensor]) -> float:
        """Rounding to fp16/bf16 moves each value by at most its unit roundoff (2^-11, 2^-8) relative, plus the
        smallest subnormal step absolute; fp32 (`none`) is sent as it is."""
        if self.lossless:
            return 0.0
        info = torch.finfo(self.dtype)
        values = payload[0].float()
        relative = info.eps / 2 * float(values.norm())
        return relative + float(info.smallest_normal) * info.eps * values.numel() ** 0.5

    def finite(self, payload: Sequence[torch.Tensor]) -> bool:
        """Whether every value of the payload is finite."""
        return bool(torch.isfinite(payload[0]).all())

    def _mean(self, payloads, weights, out: torch.Tensor, requantize: bool, name: str) -> Payload | None:
        weighted_mean([p[0] for p in payloads], weights, out=out, name=name)
        if not requantize:
            return None
        if self.dtype == torch.float32:
            return [out.view(-1)]
        return [cast(out, self.dtype, name=f"mean of {name}").view(-1)]


class BlockwiseCodec(Codec):
    """Blockwise absmax int8 or int4 codes plus one fp32 scale per block (see hiveengine.kernels.layout)."""

    supports_error_feedback = True
    frames = 2

    def __init__(self, bits: int, block: int = DEFAULT_BLOCK, stochastic: bool = False):
        check_format(bits, block)
        self.name, self.bits, self.block, self.stochastic = f"int{bits}", bits, block, stochastic

    @property
    def bytes_per_element(self) -> float:
        """Bytes on the wire per element, codes and per-block scales together."""
        return bytes_per_element(self.bits, self.block)

    def empty_payload(self, numel: int, device: torch.device | str) -> Payload:
        """Preallocated payload tensors (codes, per-block float32 scales) for `numel` elements on `device`."""
        return [
            torch.empty(codes_numel(numel, self.bits), dtype=codes_dtype(self.bits), device=device),
            torch.empty(num_blocks(numel, self.block), dtype=torch.float32, device=device),
        ]

    def encode(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        out: Payload | None = None,
        name: str = "tensor",
    ) -> Payload:
        """Quantize `x` blockwise into (codes, scales); with `residual`, add it first and leave the new
        quantization error in it (error feedback). Raises NonFiniteError on NaN/Inf."""
        codes, scales = quantize_blockwise(
            x,
            self.bits,
            self.block,
            stochastic=self.stochastic,
            residual=residual,
            out=None if out is None else (out[0], out[1]),
            name=name,
        )
        return [codes, scales]

    def decode(self, payload: Sequence[torch.Tensor], out: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """Dequantize a (codes, scales) payload into `out` and return it."""
        codes, scales = payload
        return dequantize_blockwise(codes, scales, self.bits, self.block, out=out, name=name)

    @property
    def alignment(self) -> int:
        """One block: a part never splits a block's scale between two reducers."""
        return self.block

    def error_bound(self, payload: Sequence[torch.Tensor]) -> float:
        """Each value is within half a step (a whole step when rounding stochastically) of its source, a step
        being its block's scale: sqrt(block * sum of squared scales) / 2."""
        step = 1.0 if self.stochastic else 0.5
        scales = payload[1]
        if scales.device.type == "cpu":  # numpy: a fraction of torch's per-call cost at a chunk's block count
            values = scales.detach().numpy().astype(np.float64)
            return step * (self.block * float(values @ values)) ** 0.5
        return step * (self.block * float(scales.double().square().sum())) ** 0.5

    def finite(self, payload: Sequence[torch.Tensor]) -> bool:
        """Whether every scale is finite (codes are integers: the scales alone decide)."""
        return bool(torch.isfinite(payload[1]).all())

    def _mean(self, payloads, weights, out: torch.Tensor, requantize: bool, name: str) -> Payload | None:
        result = reduce_blockwise(
            [p[0] for p in payloads],
            [p[1] for p in payloads],
            weights,
            self.bits,
            self.block,
            out=out,
            requantize=requantize,
            name=name,
        )
        return [result.codes, result.scales] if requantize else None

    def __repr__(self) -> str:
        return f"BlockwiseCodec(bits={self.bits}, block={self.block}, stochastic={self.stochastic})"


def _check_payloads(payloads: Sequence[Sequence[torch.Tensor]], frames: int, name: str):
    if not payloads:
        raise ConfigurationError(f"{name}: nothing to reduce (no payloads)")
    for i, p in enumerate(payloads):
        if len(p) != frames:
            raise ConfigurationError(f"{name}: payload {i} has {len(p)} tensors, expected {frames}")
    return payloads


CODECS = ("none", "fp16", "bf16", "int8", "int4")


def get_codec(name: str, **options) -> Codec:
    """The codec called `name` (one of CODECS); int8/int4 take `block` (default 1024) and `stochastic`."""
    if name in ("int8", "int4"):
        try:
            return BlockwiseCodec(int(name[3:]), **options)
        except TypeError as e:
            raise ConfigurationError(f"codec {name}: {e}; it takes block= and stochastic=") from None
    dtypes = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigurationError(f"unknown codec {name!r}; choose one of {list(CODECS)}")
    if options:
        raise ConfigurationError(f"codec {name} takes no options, got {sorted(options)}")
    return FloatCodec(name, dtypes[name])
