"""The package installs, its native library loads, and the console script answers."""

import subprocess
import sys

from hiveengine.kernels import load_native_library
from hiveengine.kernels.native import NATIVE_ABI_VERSION


def test_native_library_loads_with_expected_abi():
    assert load_native_library().he_abi_version() == NATIVE_ABI_VERSION


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hiveengine.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "usage: hiveengine" in out.stdout
