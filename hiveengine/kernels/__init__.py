"""Compute kernels behind hiveengine's codecs and all-reduce.

Each operation has a torch reference, a Triton kernel for CUDA tensors and a native C kernel for CPU
tensors (its C sources are in native/, built by the top-level CMakeLists.txt into
libhiveengine_native.so next to this file); the functions below pick one by device.
"""

from .dispatch import (
    BACKENDS,
    PROBE_COUNT,
    Reduced,
    backend_for,
    cast,
    check_finite,
    dequantize_blockwise,
    probe_project,
    quantize_blockwise,
    reduce_blockwise,
    weighted_mean,
)
from .layout import (
    DEFAULT_BLOCK,
    bytes_per_element,
    codes_dtype,
    codes_numel,
    num_blocks,
)
from .native import load_native_library

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK",
    "PROBE_COUNT",
    "Reduced",
    "backend_for",
    "bytes_per_element",
    "cast",
    "check_finite",
    "codes_dtype",
    "codes_numel",
    "dequantize_blockwise",
    "load_native_library",
    "num_blocks",
    "probe_project",
    "quantize_blockwise",
    "reduce_blockwise",
    "weighted_mean",
]
