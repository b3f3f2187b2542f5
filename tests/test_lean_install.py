"""The lean CPU install: Triton is optional (`pip install hiveengine[gpu]`), and hiveengine's CPU paths never
import it. Each check runs tests/peers/cpu_without_triton.py in a fresh interpreter, so nothing another test
or conftest imported can hide an import of Triton."""

import os
import subprocess
import sys

import pytest

from tests.procs import PEERS

SCRIPT = str(PEERS / "cpu_without_triton.py")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's environment, not the tests'
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=150, env=env)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("args", [(), ("--block-triton",)], ids=["triton-installed", "triton-missing"])
def test_cpu_paths_never_import_triton(args):
    """Import, every CPU kernel, and a two-peer int8 averaging round: no `triton` module gets imported, and
    with Triton missing they all still work (a CUDA tensor's kernels then name `pip install hiveengine[gpu]`)."""
    out = run_script(*args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.startswith("OK ")
