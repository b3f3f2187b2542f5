"""The package installs, its native library loads, and the console script works end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hiveengine.kernels import load_native_library
from hiveengine.kernels.native import NATIVE_ABI_VERSION


def test_native_library_loads_with_expected_abi():
    assert load_native_library().he_abi_version() == NATIVE_ABI_VERSION


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hiveengine.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("launch", "status", "dht", "peer", "demo", "bench"):
        assert command in out.stdout


@pytest.mark.timeout(120)
def test_demo_sends_a_tensor_between_two_processes():
    out = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "demo", "--mib", "4"], capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0, out.stderr
    assert "checksum matches" in out.stdout


@pytest.mark.timeout(240)
def test_training_demo_runs_under_the_launcher():
    """README's first command, scaled down: a swarm of 2 trains the LM and both end with the same model."""
    demo = Path(__file__).resolve().parent.parent / "bench" / "train.py"
    small = ["--samples", "256", "--dim", "32", "--layers", "1", "--seq", "32", "--target-batch-size", "64"]
    out = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "launch", "--nproc", "2", str(demo), *small],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    results = [json.loads(line.partition("RESULT ")[2]) for line in out.stdout.splitlines() if "RESULT " in line]
    assert len(results) == 2 and results[0]["eval_loss"] == results[1]["eval_loss"]
    assert all(r["epochs"] == 4 and r["rounds"]["averaged"] >= 3 for r in results)
