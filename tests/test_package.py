"""The package installs, its native library loads, and the console script works end to end."""

import subprocess
import sys

import pytest

from hiveengine.kernels import load_native_library
from hiveengine.kernels.native import NATIVE_ABI_VERSION


def test_native_library_loads_with_expected_abi():
    assert load_native_library().he_abi_version() == NATIVE_ABI_VERSION


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hiveengine.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("peer", "demo", "bench"):
        assert command in out.stdout


@pytest.mark.timeout(120)
def test_demo_sends_a_tensor_between_two_processes():
    out = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "demo", "--mib", "4"], capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0, out.stderr
    assert "checksum matches" in out.stdout
