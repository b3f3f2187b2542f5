"""Runs hiveengine's CPU paths in a fresh interpreter and fails if anything imported Triton.

Usage: cpu_without_triton.py [--block-triton]. It imports hiveengine, runs every CPU kernel and a one-round
int8 averaging between two DHT peers in this process, then checks that no `triton` module was imported.
With --block-triton, `import triton` fails as if it were not installed (the lean CPU install), and the
kernels for a CUDA tensor must refuse with an error naming `pip install hiveengine[gpu]`.
Prints "OK <mean of the averaged tensor>" on success; any failure is an exception and exit status 1.
"""

import sys

if "--block-triton" in sys.argv:
    sys.modules["triton"] = None  # `import triton` raises ModuleNotFoundError; find_spec("triton") is None

import threading

import torch

import hiveengine
from hiveengine import kernels
from hiveengine.errors import KernelUnavailableError


def run_kernels() -> None:
    assert kernels.backend_for(torch.device("cpu")).__name__.endswith("native_backend")
    x = torch.randn(10_000)
    for bits in (8, 4):
        residual = torch.zeros_like(x)
        codes, scales = kernels.quantize_blockwise(x, bits, residual=residual)
        back = kernels.dequantize_blockwise(codes, scales, bits, numel=x.numel())
        assert torch.allclose(back + residual, x, atol=1e-5)
        mean = kernels.reduce_blockwise([codes, codes], [scales, scales], [1, 3], bits, numel=x.numel())
        assert torch.allclose(mean.mean, back)
    assert torch.allclose(kernels.weighted_mean([x, 3 * x], [1, 1]), 2 * x)
    assert torch.equal(kernels.cast(x, torch.bfloat16), x.to(torch.bfloat16))
    kernels.check_finite(x)


def check_cuda_refuses() -> None:
    for backend in (None, "triton"):
        try:
            kernels.backend_for(torch.device("cuda"), backend)
        except KernelUnavailableError as e:
            assert "pip install hiveengine[gpu]" in str(e), e
        else:
            raise AssertionError(f"backend_for(cuda, {backend!r}) resolved without Triton")


def run_averaging() -> float:
    first = hiveengine.DHT()
    second = hiveengine.DHT(initial_peers=[first.address])
    tensors = [[torch.zeros(1000)], [torch.full((1000,), 2.0)]]
    averagers = [
        hiveengine.DecentralizedAverager(t, dht, "lean", target_group_size=2, codec="int8", matchmaking_time=1.0)
        for t, dht in zip(tensors, (first, second), strict=True)
    ]
    results = [None, None]

    def step(i: int) -> None:
        results[i] = averagers[i].step(timeout=30)

    threads = [threading.Thread(target=step, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(r is not None and len(r.group.members) == 2 for r in results), results
    with averagers[0].get_tensors() as averaged:
        mean = float(averaged[0].mean())
    assert abs(mean - 1.0) < 0.02, mean
    for averager in averagers:
        averager.shutdown()
    second.shutdown()
    first.shutdown()
    return mean


def main() -> None:
    run_kernels()
    if "--block-triton" in sys.argv:
        check_cuda_refuses()
    mean = run_averaging()
    loaded = sorted(m for m, module in sys.modules.items() if m.split(".")[0] == "triton" and module is not None)
    assert not loaded, f"hiveengine's CPU paths imported {len(loaded)} triton modules: {loaded[:4]}..."
    print("OK", mean, flush=True)


if __name__ == "__main__":
    main()
