"""`hiveengine bench`: the kernel benchmark starts (it crashed on any arguments), and runs write their results
outside the committed bench/results/ unless asked to update them."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli_support import REPO, run_cli

sys.path.insert(0, str(REPO))
from bench import common

pytestmark = pytest.mark.timeout(180)
TINY_KERNELS = ["--sizes", "0.0625", "--threads", "1", "--bits", "8", "--repeats", "1", "--no-gpu"]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def wrote(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    return Path(line.removeprefix("wrote ").strip())


def test_kernels_help_works():
    out = run_cli("bench", "kernels", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: hiveengine bench kernels") and "Traceback" not in out.stderr


def test_a_run_leaves_the_committed_results_alone(tmp_path):
    committed = common.COMMITTED_RESULTS_DIR / "kernels-cpu.json"
    before = digest(committed)
    out = run_cli("bench", "kernels", *TINY_KERNELS, env={common.OUT_ENV: "", common.SAVE_ENV: ""}, timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    path = wrote(out.stdout)
    assert path == common.RESULTS_DIR / "kernels-cpu.json" and path.is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, timeout=30)
    assert ignored.returncode == 0  # git does not see it
    assert digest(committed) == before

    out = run_cli("bench", "kernels", *TINY_KERNELS, "--out", str(tmp_path), "--name", "tiny", timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    assert wrote(out.stdout) == tmp_path / "tiny.json" and (tmp_path / "tiny.json").is_file()
    assert digest(committed) == before


def test_save_results_chooses_the_committed_directory(monkeypatch, tmp_path):
    from hiveengine.cli.bench import take_result_options

    args = argparse.Namespace(args=["--sizes", "1", "--save-results", "--out", "x"], save_results=False, out=None)
    assert take_result_options(args) == ["--sizes", "1"] and args.save_results and args.out == "x"
    monkeypatch.delenv(common.SAVE_ENV, raising=False)
    monkeypatch.setenv(common.OUT_ENV, str(tmp_path / "out"))
    assert common.results_dir() == tmp_path / "out"
    monkeypatch.setenv(common.SAVE_ENV, "1")
    assert common.results_dir() == common.COMMITTED_RESULTS_DIR
