"""Compute kernels behind hiveengine's codecs and all-reduce (installed as ``hiveengine.kernels``)."""

from hiveengine.kernels.native import load_native_library

__all__ = ["load_native_library"]
