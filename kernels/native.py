"""Loads the native C kernel library that CMakeLists.txt builds next to this file."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from hiveengine.errors import KernelUnavailableError

NATIVE_ABI_VERSION = 1
LIBRARY_ENV = "HIVEENGINE_NATIVE_LIB"


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
            return lib
    raise KernelUnavailableError(
        "native kernel library not found; reinstall hiveengine with `pip install -e .` "
        f"(needs cmake and a C compiler) or point {LIBRARY_ENV} at libhiveengine_native.so"
    )
