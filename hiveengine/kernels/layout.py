"""The quantized data layout and the argument checks shared by every kernel implementation.

Layout: a flat tensor of ``numel`` values is cut into blocks of ``block`` values (the last one may be
partial). Each block has one fp32 scale, ``absmax / 127`` for 8-bit and ``absmax / 7`` for 4-bit codes.
8-bit codes are int8 in [-127, 127], one per value. 4-bit codes are in [-7, 7] (symmetric, so rounding
is unbiased and 0 is exact), stored as 4-bit two's complement and packed two per uint8 byte, low nibble
first; an odd last value leaves the high nibble zero. A block whose absmax is below ``TINY`` (all zeros,
or values so small that ``127 / absmax`` would overflow) gets scale 0 and codes 0. A block holding NaN or
Inf makes the kernel raise NonFiniteError and gets a NaN scale, so that a payload sent despite the error is
still refused by its receiver.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

from hiveengine.errors import ConfigurationError, NonFiniteError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = (8, 4)
MIN_BLOCK, MAX_BLOCK = 64, 4096
DEFAULT_BLOCK = 1024
MAX_INPUTS = 1024
TINY = 2.0**-120
QMAX = {8: 127, 4: 7}


def check_format(bits: int, block: int) -> None:
    """Raise ConfigurationError unless bits is 8 or 4 and block is a power of two in [64, 4096]."""
    if bits not in BITS:
        raise ConfigurationError(f"bits must be 8 or 4, got {bits!r}")
    if not (isinstance(block, int) and MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
        raise ConfigurationError(f"block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}")


def num_blocks(numel: int, block: int) -> int:
    """Number of blocks (and scales) for numel values."""
    return -(-numel // block)


def codes_numel(numel: int, bits: int) -> int:
    """Length of the code tensor for numel values: one byte per value, or per two values for 4-bit."""
    return numel if bits == 8 else (numel + 1) // 2


def codes_dtype(bits: int) -> torch.dtype:
    """int8 for 8-bit codes, uint8 for packed 4-bit codes."""
    return torch.int8 if bits == 8 else torch.uint8


def bytes_per_element(bits: int, block: int) -> float:
    """Wire bytes per value, including the amortized fp32 scale."""
    return bits / 8 + 4 / block


def hash32(x: int) -> int:
    """The 32-bit integer hash that every implementation uses for stochastic rounding."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x ^= x >> 15
    return x


def stochastic_key(seed: int) -> int:
    """Turn a seed (any int) into the 31-bit key that the kernels mix into each value's index."""
    seed &= 0xFFFFFFFFFFFFFFFF
    return hash32((seed & 0xFFFFFFFF) ^ hash32(seed >> 32)) & 0x7FFFFFFF


def normalize_weights(weights: Sequence[float] | torch.Tensor, count: int, name: str) -> list[float]:
    """Check K averaging weights and scale them to sum to one, rounded to fp32 (what the kernels use)."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else [float(w) for w in weights]
    if len(values) != count:
        raise ConfigurationError(f"{name}: got {len(values)} weights for {count} inputs")
    if not all(math.isfinite(w) for w in values):
        raise NonFiniteError(f"{name}: averaging weights {values} hold NaN or Inf")
    total = math.fsum(values)
    if min(values) < 0 or total <= 0:
        raise ConfigurationError(f"{name}: averaging weights must be >= 0 with a positive sum, got {values}")
    return [struct.unpack("f", struct.pack("f", w / total))[0] for w in values]


def flat(x: torch.Tensor, name: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A 1-D view of a contiguous tensor of an accepted dtype (never a silent copy)."""
    if x.dtype not in dtypes:
        raise ConfigurationError(f"{name} has dtype {x.dtype}; expected one of {list(dtypes)}")
    if not x.is_contiguous():
        raise ConfigurationError(f"{name} is not contiguous; pass x.contiguous()")
    return x.view(-1)


def check_buffer(t: torch.Tensor, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Check an output or state buffer's size, dtype, device and contiguity; return it flat."""
    if t.numel() != numel or t.dtype != dtype or t.device != device:
        raise ConfigurationError(
            f"{name} must be a {dtype} tensor of {numel} elements on {device}, "
            f"got {t.dtype} with {t.numel()} elements on {t.device}"
        )
    return flat(t, name, (dtype,))


def check_same_device(tensors: Sequence[torch.Tensor], name: str) -> torch.device:
    """The common device of the tensors, or ConfigurationError if they are spread over several."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ConfigurationError(f"{name}: tensors are on different devices {sorted(map(str, devices))}")
    return devices.pop()
