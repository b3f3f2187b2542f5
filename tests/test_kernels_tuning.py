"""Launch configurations: the per-device JSON cache of autotuned winners, and correctness under any tile."""

import json

import pytest
import torch

from hiveengine.errors import ConfigurationError
from hiveengine.kernels import (
    cast,
    dequantize_blockwise,
    quantize_blockwise,
    reduce_blockwise,
    weighted_mean,
)
from hiveengine.kernels.dispatch import triton_available
from hiveengine.kernels.tuning import (
    DEFAULTS,
    INTERPRETER_TILE,
    TUNING_ENV,
    LaunchConfig,
    config_key,
    forced,
    interpreting,
    launch_config,
    save_launch_configs,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(TUNING_ENV, str(path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return path


def test_defaults_without_a_cache(cache):
    assert launch_config("quantize", torch.device("cpu"), bits=8, block=1024) == DEFAULTS["quantize"]


def test_saved_winners_are_loaded_per_device_and_merged(cache):
    cpu = torch.device("cpu")
    save_launch_configs("cpu", {"quantize:bits=8:block=1024": LaunchConfig(8192, 8, 1)})
    save_launch_configs("cpu", {"reduce:bits=4:block=256:requantize=1": LaunchConfig(2048, 4, 3)})
    save_launch_configs("NVIDIA H100 80GB HBM3", {"quantize:bits=8:block=1024": LaunchConfig(16384, 16, 1)})
    assert launch_config("quantize", cpu, bits=8, block=1024) == LaunchConfig(8192, 8, 1)
    assert launch_config("reduce", cpu, bits=4, block=256, requantize=1) == LaunchConfig(2048, 4, 3)
    assert launch_config("quantize", cpu, bits=4, block=1024) == DEFAULTS["quantize"]
    assert config_key("reduce", bits=4, block=256, requantize=1) == "reduce:bits=4:block=256:requantize=1"
    table = json.loads(cache.read_text())
    assert set(table) == {"cpu", "NVIDIA H100 80GB HBM3"}
    assert table["cpu"]["quantize:bits=8:block=1024"] == {"tile": 8192, "num_warps": 8, "num_stages": 1}


def test_unreadable_cache_falls_back_to_defaults(cache):
    cache.write_text("{not json")
    assert launch_config("cast", torch.device("cpu"), src="float32", dst="float16") == DEFAULTS["cast"]


def test_forced_config_wins_inside_its_block(cache):
    with forced(LaunchConfig(256, 2, 1)):
        assert launch_config("quantize", torch.device("cpu"), bits=8, block=64) == LaunchConfig(256, 2, 1)
    assert launch_config("quantize", torch.device("cpu"), bits=8, block=64) == DEFAULTS["quantize"]


def test_interpreter_uses_large_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch_config("quantize", torch.device("cpu"), bits=8, block=64).tile == INTERPRETER_TILE


def test_tiles_must_be_powers_of_two():
    with pytest.raises(ConfigurationError):
        LaunchConfig(3000)


@pytest.mark.skipif(not interpreting() or not triton_available(), reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize("tile", [64, 256, 2048])
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_kernels_match_reference_across_many_programs(tile, bits):
    """Small tiles split the work over many programs, with a partial last group and block."""
    block, n = 128, 128 * 21 + 77
    g = torch.Generator().manual_seed(tile + bits)
    x = torch.randn(n, generator=g)
    parts = [quantize_blockwise(torch.randn(n, generator=g), bits, block) for _ in range(3)]
    codes_k, scales_k, w = [c for c, _ in parts], [s for _, s in parts], [1, 2, 3]
    with forced(LaunchConfig(tile, 1, 1)):
        codes, scales = quantize_blockwise(x, bits, block, stochastic=True, seed=3, backend="triton")
        deq = dequantize_blockwise(codes, scales, bits, block, numel=n, backend="triton")
        mean = reduce_blockwise(codes_k, scales_k, w, bits, block, numel=n, requantize=True, backend="triton")
        averaged = weighted_mean([x, deq], [1, 1], backend="triton")
        half = cast(x, torch.bfloat16, backend="triton")
    ref_codes, ref_scales = quantize_blockwise(x, bits, block, stochastic=True, seed=3, backend="reference")
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert torch.equal(deq, dequantize_blockwise(codes, scales, bits, block, numel=n, backend="reference"))
    ref_mean = reduce_blockwise(codes_k, scales_k, w, bits, block, numel=n, requantize=True, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(mean, ref_mean, strict=True))
    assert torch.equal(averaged, weighted_mean([x, deq], [1, 1], backend="reference"))
    assert torch.equal(half, x.to(torch.bfloat16))
