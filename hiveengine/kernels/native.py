"""Loads the native C kernel library that CMakeLists.txt builds next to this file, with typed signatures."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from hiveengine.errors import KernelUnavailableError

NATIVE_ABI_VERSION = 4
LIBRARY_ENV = "HIVEENGINE_NATIVE_LIB"

_p, _i32, _i64, _u32, _f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_double
# Argument types of every exported kernel; each returns 0 (ok), 1 (NaN/Inf met) or -1 (bad arguments).
_SIGNATURES = {
    # x, dtype, residual, n, block, bits, stochastic, key, codes, scales, threads
    "he_quantize": [_p, _i32, _p, _i64, _i64, _i32, _i32, _u32, _p, _p, _i32],
    # codes, scales, n, block, bits, out, dtype, threads
    "he_dequantize": [_p, _p, _i64, _i64, _i32, _p, _i32, _i32],
    # codes[], scales[], weights, k, n, block, bits, out, out_codes, out_scales, threads
    "he_reduce": [_p, _p, _p, _i32, _i64, _i64, _i32, _p, _p, _p, _i32],
    # inputs[], dtype, weights, k, n, out, threads
    "he_weighted_mean": [_p, _i32, _p, _i32, _i64, _p, _i32],
    # src, src_dtype, dst, dst_dtype, n, threads
    "he_cast": [_p, _i32, _p, _i32, _i64, _i32],
    # x, dtype, n, threads
    "he_check_finite": [_p, _i32, _i64, _i32],
    # rows, m, n, row stride, words, p, step, projections, row_sq
    "he_probe_project": [_p, _i64, _i64, _i64, _p, _i64, _f64, _p, _p],
}


def _candidates() -> list[Path]:
    names = ["libhiveengine_native.so", "libhiveengine_native.dylib"]
    here = Path(__file__).resolve().parent
    found = []
    if os.environ.get(LIBRARY_ENV):
        found.append(Path(os.environ[LIBRARY_ENV]))
    found += [here / n for n in names]
    # An editable install keeps the sources here and the built library in site-packages.
    import hiveengine.kernels as pkg

    for directory in getattr(pkg, "__path__", []):
        found += [Path(directory) / n for n in names]
    return found


@functools.cache
def load_native_library() -> ctypes.CDLL:
    """Return the loaded native kernel library, or raise KernelUnavailableError saying how to build it."""
    for path in _candidates():
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            version = lib.he_abi_version()
            if version != NATIVE_ABI_VERSION:
                raise KernelUnavailableError(
                    f"{path} has ABI version {version}, expected {NATIVE_ABI_VERSION}: "
                    "reinstall hiveengine (pip install -e .) to rebuild it"
                )
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes = argtypes
                function.restype = ctypes.c_int
            return lib
    raise KernelUnavailableError(
        "native kernel library not found; reinstall hiveengine with `pip install -e .` "
        f"(needs cmake and a C compiler) or point {LIBRARY_ENV} at libhiveengine_native.so"
    )
