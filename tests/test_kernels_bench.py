"""The kernel bench runs end to end at toy sizes: CPU tables, and the GPU tuning path in the Triton interpreter."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench import kernels as bench
from hiveengine.kernels.dispatch import triton_available
from hiveengine.kernels.tuning import interpreting

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("HIVEENGINE_KERNEL_TUNING", str(tmp_path / "tuning.json"))
    return tmp_path


def test_cpu_bench_writes_a_table_and_json(results_dir, capsys):
    assert bench.main(["--sizes", "0.0625", "--threads", "1", "--bits", "8,4", "--repeats", "1", "--no-gpu"]) == 0
    assert "x hivemind" in capsys.readouterr().out
    data = json.loads((results_dir / "kernels-cpu.json").read_text())
    rows = data["cpu"]["rows"]
    assert {r["impl"] for r in rows} == {"native", "torch", "hivemind-style"}
    assert {r["op"] for r in rows} == {"quantize", "dequantize", "reduce K=4", "reduce+requantize K=4"}
    assert all(r["GB/s"] > 0 for r in rows)
    assert not [r for r in rows if r["codec"] == "int4" and r["impl"] == "hivemind-style"]
    assert data["cpu"]["goal"]["numel"] == 65536
    assert data["gpu"]["status"] == "skipped (--no-gpu)"


@pytest.mark.skipif(
    not interpreting() or not triton_available(), reason="runs the GPU path on CPU tensors in the Triton interpreter"
)
def test_gpu_tuning_path_saves_winners(results_dir):
    argv = ["--no-cpu", "--gpu-device", "cpu", "--gpu-sizes", "0.00390625", "--tune-size", "0.00390625"]
    argv += ["--gpu-bits", "8", "--tiles", "1024,2048", "--warps", "4", "--name", "gpu-smoke"]
    assert bench.main(argv) == 0
    data = json.loads((results_dir / "gpu-smoke.json").read_text())
    gpu = data["gpu"]
    assert {r["kernel"] for r in gpu["rows"]} >= {"quantize int8", "reduce+rq K=4 int8", "cast fp32->bf16"}
    assert "quantize:bits=8:block=1024" in gpu["winners"]
    tuned = json.loads((results_dir / "tuning.json").read_text())
    assert tuned["cpu"] == gpu["winners"]
    assert [r["impl"] for r in gpu["comparisons"]][:2] == ["hiveengine (API call)", "torch reference"]
