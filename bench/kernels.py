"""Kernel benchmarks (also `hiveengine bench kernels`).

CPU: throughput of quantize, dequantize and the fused K-input reduction (with and without requantizing the
mean) at each size, on one thread and on all threads, side by side for hiveengine's native C kernels, the
torch reference, and a hivemind-style Uniform8BitQuantization written here with torch ops. Throughput is
fp32-equivalent: 4 bytes per value processed (K values per output value for the reduction) per second.

GPU (when CUDA is available): autotunes each Triton kernel's tile, warps and pipeline stages on this
device, saves the winners to the cache that the dispatcher loads (hiveengine.kernels.tuning), and reports
achieved bandwidth (bytes read + written per second) as a fraction of the device's measured
device-to-device copy bandwidth, next to the torch reference and bitsandbytes' quantize_blockwise where
installed.

Prints tables and writes bench/results/local/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, write_results
from hiveengine.kernels import (
    codes_dtype,
    codes_numel,
    dequantize_blockwise,
    num_blocks,
    quantize_blockwise,
    reduce_blockwise,
)
from hiveengine.kernels.dispatch import triton_available
from hiveengine.kernels.tuning import (
    DEFAULTS,
    LaunchConfig,
    config_key,
    device_name,
    forced,
    save_launch_configs,
)

M = 1 << 20
GOAL_NATIVE_GBPS = 5.0
GOAL_VS_TORCH = 7.0
GOAL_COPY_FRACTION = 0.8


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def count(n: int) -> str:
    """64M, 16K, 100: a value count for progress lines."""
    for unit, size in (("M", M), ("K", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def best_seconds(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Best wall time of fn after one warm-up run, over up to `repeats` runs (fewer once past the budget)."""
    fn()
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class HivemindUniform8Bit:
    """hivemind's Uniform8BitQuantization re-expressed with torch ops: one affine 8-bit grid per tensor
    spanning 6 standard deviations, decoded through a table of the mean of each code's values."""

    range_in_sigmas = 6
    n_bins = 256

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centered = x - x.mean()
        std = centered.norm() / math.sqrt(centered.numel() - 1)
        scale = float(self.range_in_sigmas * std / self.n_bins)
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; hivemind still uses them
            warnings.simplefilter("ignore", UserWarning)
            codes = torch.quantize_per_tensor(centered, scale, self.n_bins // 2, torch.quint8).int_repr()
        index = codes.long()
        sums = torch.zeros(self.n_bins).scatter_add_(0, index, x)
        counts = torch.bincount(index, minlength=self.n_bins).clamp_min_(1)
        return codes, sums / counts

    def dequantize(self, codes: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
        return lookup[codes.long()]

    def reduce(self, parts: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], out: torch.Tensor):
        out.zero_()
        for (codes, lookup), w in zip(parts, weights, strict=True):
            out.add_(self.dequantize(codes, lookup), alpha=w)
        return out.div_(sum(weights))


def cpu_cases(n: int, k: int, bits: int, block: int) -> dict[str, dict[str, Callable[[], object]]]:
    """{op: {implementation: a no-argument call}} on fresh data, with preallocated outputs where offered."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    inputs = [torch.randn(n, generator=g) for _ in range(k)]
    weights = [1.0 + i for i in range(k)]
    codes = torch.empty(codes_numel(n, bits), dtype=codes_dtype(bits))
    scales = torch.empty(num_blocks(n, block))
    rq = (torch.empty_like(codes), torch.empty_like(scales))
    out = torch.zeros(n)
    parts = [quantize_blockwise(t, bits, block, backend="native") for t in inputs]
    part_codes, part_scales = [c for c, _ in parts], [s for _, s in parts]
    quantize_blockwise(x, bits, block, out=(codes, scales), backend="native")
    hm = HivemindUniform8Bit()
    hm_parts = [hm.quantize(t) for t in inputs]
    hm_codes, hm_lookup = hm_parts[0]

    def ours(backend: str) -> dict[str, Callable[[], object]]:
        return {
            "quantize": lambda: quantize_blockwise(x, bits, block, out=(codes, scales), backend=backend),
            "dequantize": lambda: dequantize_blockwise(codes, scales, bits, block, out=out, backend=backend),
            "reduce": lambda: reduce_blockwise(part_codes, part_scales, weights, bits, block, out=out, backend=backend),
            "reduce+requantize": lambda: reduce_blockwise(
                part_codes,
                part_scales,
                weights,
                bits,
                block,
                out=out,
                requantize=True,
                requantize_out=rq,
                backend=backend,
            ),
        }

    hivemind = {
        "quantize": lambda: hm.quantize(x),
        "dequantize": lambda: hm.dequantize(hm_codes, hm_lookup),
        "reduce": lambda: hm.reduce(hm_parts, weights, out),
        "reduce+requantize": lambda: hm.quantize(hm.reduce(hm_parts, weights, out)),
    }
    native, reference = ours("native"), ours("reference")
    if bits != 8:
        hivemind = {}
    return {op: {"native": native[op], "torch": reference[op], "hivemind-style": hivemind.get(op)} for op in native}


def run_cpu(args: argparse.Namespace) -> list[dict]:
    all_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    thread_counts = sorted({all_threads if t == "all" else int(t) for t in args.threads.split(",")})
    rows = []
    saved_threads = torch.get_num_threads()
    for bits in args.bits:
        for n in (int(s * M) for s in args.sizes):
            cases = cpu_cases(n, args.k, bits, args.block)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for op, impls in cases.items():
                    seconds = {}
                    for impl, fn in impls.items():
                        if fn is None:
                            continue
                        progress(f"cpu int{bits} {op} n={count(n)} threads={threads} {impl}")
                        slow = impl != "native"
                        seconds[impl] = best_seconds(fn, args.repeats, budget_s=2.0 if slow else 0.5)
                    values = n * (args.k if op.startswith("reduce") else 1)
                    for impl, s in seconds.items():
                        rows.append(
                            {
                                "codec": f"int{bits}",
                                "op": op if not op.startswith("reduce") else f"{op} K={args.k}",
                                "numel": n,
                                "threads": threads,
                                "impl": impl,
                                "ms": 1e3 * s,
                                "GB/s": 4 * values / s / 1e9,
                                "x torch": seconds["torch"] / s,
                                "x hivemind": seconds["hivemind-style"] / s if "hivemind-style" in seconds else None,
                            }
                        )
    torch.set_num_threads(saved_threads)
    return rows


def cpu_goal(rows: list[dict]) -> dict:
    """The single-thread quantize goal at the smallest size: native GB/s and its ratio to torch."""
    candidates = [
        r
        for r in rows
        if r["op"] == "quantize" and r["threads"] == 1 and r["impl"] == "native" and r["codec"] == "int8"
    ]
    if not candidates:
        return {}
    row = min(candidates, key=lambda r: r["numel"])
    met = row["GB/s"] >= GOAL_NATIVE_GBPS and row["x torch"] >= GOAL_VS_TORCH
    return {
        "numel": row["numel"],
        "native_gbps": row["GB/s"],
        "x_torch": row["x torch"],
        "goal": f">= {GOAL_NATIVE_GBPS} GB/s and >= {GOAL_VS_TORCH}x torch",
        "met": met,
    }


# ---------------------------------------------------------------- GPU


@dataclass
class GpuCase:
    """One Triton kernel specialization to tune and time: `launch(n)` returns (call, bytes moved)."""

    label: str
    kernel: str
    fields: dict
    launch: Callable[[int], tuple[Callable[[], object], int]]
    loops: bool = False  # kernels with a loop over inputs also tune num_stages


def gpu_cases(device: torch.device, bits_list: list[int], block: int, k: int) -> list[GpuCase]:
    from hiveengine.kernels import triton_backend as tb

    def buffers(n: int, bits: int):
        x = torch.randn(n, device=device)
        codes = torch.empty(codes_numel(n, bits), dtype=codes_dtype(bits), device=device)
        scales = torch.empty(num_blocks(n, block), device=device)
        return x, codes, scales

    def quantize(bits: int, residual: bool):
        def launch(n: int):
            x, codes, scales = buffers(n, bits)
            res = torch.zeros(n, device=device) if residual else None
            moved = 4 * n + codes.numel() * codes.element_size() + 4 * scales.numel() + (8 * n if residual else 0)
            return (lambda: tb.launch_quantize(x, res, codes, scales, bits, block, None)), moved

        return launch

    def dequantize(bits: int):
        def launch(n: int):
            x, codes, scales = buffers(n, bits)
            tb.launch_quantize(x, None, codes, scales, bits, block, None)
            moved = codes.numel() * codes.element_size() + 4 * scales.numel() + 4 * n
            return (lambda: tb.launch_dequantize(codes, scales, x, bits, block)), moved

        return launch

    def reduce(bits: int, requantize: bool):
        def launch(n: int):
            parts = [buffers(n, bits) for _ in range(k)]
            for x, codes, scales in parts:
                tb.launch_quantize(x, None, codes, scales, bits, block, None)
            codes_list, scales_list = [p[1] for p in parts], [p[2] for p in parts]
            out = parts[0][0]
            rq = (torch.empty_like(codes_list[0]), torch.empty_like(scales_list[0])) if requantize else (None, None)
            one = codes_list[0].numel() * codes_list[0].element_size() + 4 * scales_list[0].numel()
            moved = k * one + 4 * n + (one if requantize else 0)
            weights = [1.0 / k] * k
            return (lambda: tb.launch_reduce(codes_list, scales_list, weights, out, bits, block, *rq)), moved

        return launch

    def mean_of(dtype: torch.dtype):
        def launch(n: int):
            inputs = [torch.randn(n, device=device).to(dtype) for _ in range(k)]
            out = torch.empty(n, device=device)
            moved = k * n * inputs[0].element_size() + 4 * n
            return (lambda: tb.launch_weighted_mean(inputs, [1.0 / k] * k, out)), moved

        return launch

    def cast_to(dtype: torch.dtype):
        def launch(n: int):
            x = torch.randn(n, device=device)
            out = torch.empty(n, dtype=dtype, device=device)
            return (lambda: tb.launch_cast(x, out)), 4 * n + n * out.element_size()

        return launch

    cases = []
    for bits in bits_list:
        f = {"bits": bits, "block": block}
        cases += [
            GpuCase(f"quantize int{bits}", "quantize", f, quantize(bits, False)),
            GpuCase(f"quantize+EF int{bits}", "quantize", f, quantize(bits, True)),
            GpuCase(f"dequantize int{bits}", "dequantize", f, dequantize(bits)),
            GpuCase(f"reduce K={k} int{bits}", "reduce", {**f, "requantize": 0}, reduce(bits, False), loops=True),
            GpuCase(f"reduce+rq K={k} int{bits}", "reduce", {**f, "requantize": 1}, reduce(bits, True), loops=True),
        ]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        cases.append(GpuCase(f"mean K={k} {name}", "weighted_mean", {"dtype": name}, mean_of(dtype), loops=True))
    cases.append(GpuCase("cast fp32->bf16", "cast", {"src": "float32", "dst": "bfloat16"}, cast_to(torch.bfloat16)))
    return cases


def device_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Mean time per call on the device (L2 flushed between calls on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25) / 1e3
    return best_seconds(fn, repeats=2, budget_s=0.1)


def candidates(case: GpuCase, block: int, tiles: list[int], warps: list[int]) -> list[LaunchConfig]:
    blockwise = "block" in case.fields
    sizes = sorted({max(t, block) for t in tiles} if blockwise else set(tiles))
    return [LaunchConfig(t, w, 2 if case.loops else 1) for t in sizes for w in warps]


def autotune(case: GpuCase, n: int, device: torch.device, block: int, tiles, warps) -> tuple[LaunchConfig, float]:
    """The fastest configuration for a case: tile x warps first, then pipeline stages for looping kernels."""
    fn, _ = case.launch(n)

    def timed(config: LaunchConfig) -> float:
        with forced(config):
            return device_seconds(fn, device)

    results = {c: timed(c) for c in candidates(case, block, tiles, warps)}
    best = min(results, key=results.get)
    if case.loops:
        for stages in (1, 3, 4):
            config = LaunchConfig(best.tile, best.num_warps, stages)
            results[config] = timed(config)
        best = min(results, key=results.get)
    return best, results[best]


def copy_gbps(device: torch.device, n: int) -> float:
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 8 * n / device_seconds(lambda: dst.copy_(src), device) / 1e9


def run_gpu(args: argparse.Namespace, device: torch.device) -> dict:
    name = device_name(device)
    progress(f"gpu {name}: device-to-device copy bandwidth")
    copy = copy_gbps(device, int(max(args.gpu_sizes) * M))
    winners: dict[str, LaunchConfig] = {}
    rows = []
    for case in gpu_cases(device, args.gpu_bits, args.block, args.k):
        key = config_key(case.kernel, **case.fields)
        if args.tune and key not in winners:
            progress(f"gpu autotune {case.label}")
            winners[key], _ = autotune(case, int(args.tune_size * M), device, args.block, args.tiles, args.warps)
        config = winners.get(key, DEFAULTS[case.kernel])
        for n in (int(s * M) for s in args.gpu_sizes):
            progress(f"gpu {case.label} n={count(n)}")
            fn, moved = case.launch(n)
            with forced(config):
                seconds = device_seconds(fn, device)
            rows.append(
                {
                    "kernel": case.label,
                    "numel": n,
                    "config": f"tile={config.tile} warps={config.num_warps} stages={config.num_stages}",
                    "us": 1e6 * seconds,
                    "GB/s": moved / seconds / 1e9,
                    "of copy": moved / seconds / 1e9 / copy,
                }
            )
    path = save_launch_configs(name, winners) if winners else None
    comparisons = gpu_comparisons(device, int(min(args.gpu_sizes) * M), args.block, copy)
    below = [r for r in rows if r["of copy"] < GOAL_COPY_FRACTION]
    return {
        "device": name,
        "copy_gbps": copy,
        "rows": rows,
        "comparisons": comparisons,
        "winners": {k: vars(v) for k, v in winners.items()},
        "tuning_cache": str(path) if path else None,
        "goal": f">= {GOAL_COPY_FRACTION:.0%} of copy bandwidth at >= 64M values",
        "below_goal": [f"{r['kernel']} n={count(r['numel'])}" for r in below],
    }


def gpu_comparisons(device: torch.device, n: int, block: int, copy: float) -> list[dict]:
    """int8 quantize of n fp32 values: hiveengine's Triton kernel, the torch reference, bitsandbytes."""
    x = torch.randn(n, device=device)
    moved = 5 * n + 4 * num_blocks(n, block)
    calls = {
        "hiveengine (API call)": lambda: quantize_blockwise(x, 8, block),
        "torch reference": lambda: quantize_blockwise(x, 8, block, backend="reference"),
    }
    try:
        import bitsandbytes.functional as bnbf

        calls["bitsandbytes"] = lambda: bnbf.quantize_blockwise(x, blocksize=block)
    except ImportError:
        progress("bitsandbytes is not installed: no comparison with it")
    rows = []
    for impl, fn in calls.items():
        progress(f"gpu compare quantize int8 {impl}")
        seconds = device_seconds(fn, device)
        rows.append({"impl": impl, "numel": n, "us": 1e6 * seconds, "GB/s": moved / seconds / 1e9})
    for row in rows:
        row["of copy"] = row["GB/s"] / copy
        row["x torch"] = rows[1]["us"] / row["us"]
    return rows


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(v) for v in text.split(",")]

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    p = argparse.ArgumentParser(prog="hiveengine bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=floats, default=[16, 64], help="CPU sizes in Mi values (default 16,64)")
    p.add_argument("--threads", default="1,all", help="CPU thread counts, 'all' = every core (default 1,all)")
    p.add_argument("--bits", type=ints, default=[8], help="CPU code widths (default 8)")
    p.add_argument("--block", type=int, default=1024, help="quantization block (default 1024)")
    p.add_argument("--k", type=int, default=4, help="inputs of the reduction (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per CPU case, best kept (default 3)")
    p.add_argument("--gpu-sizes", type=floats, default=[64, 256], help="GPU sizes in Mi values (default 64,256)")
    p.add_argument("--gpu-bits", type=ints, default=[8, 4], help="GPU code widths (default 8,4)")
    p.add_argument("--tune-size", type=float, default=64, help="GPU autotuning size in Mi values (default 64)")
    p.add_argument("--tiles", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="tiles to try")
    p.add_argument("--warps", type=ints, default=[2, 4, 8, 16], help="warp counts to try")
    p.add_argument("--no-tune", dest="tune", action="store_false", help="time the cached or default configs")
    p.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU benchmarks")
    p.add_argument("--no-gpu", dest="gpu", action="store_false", help="skip the GPU benchmarks")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # "cpu" smoke-tests under TRITON_INTERPRET
    p.add_argument("--name", help="results file name (default kernels-<device>)")
    return p.parse_args(argv)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the tables, write bench/results/kernels-<device>.json; returns 0."""
    args = parse_args(argv)
    gpu_device = torch.device(args.gpu_device)
    device_present = gpu_device.type != "cuda" or torch.cuda.is_available()
    gpu_available = args.gpu and device_present and triton_available()
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "gpu_device"}}
    # Other processes' load skews the timings on small machines: record it next to them.
    results["loadavg_before"] = os.getloadavg()
    if results["loadavg_before"][0] > 0.5:
        progress(f"warning: load average {results['loadavg_before'][0]:.2f} before the run; timings may be noisy")
    if args.cpu:
        rows = run_cpu(args)
        print("\nCPU: fp32-equivalent GB/s (4 bytes per value processed; K values per output for reduce)")
        columns = ["codec", "op", "numel", "threads", "impl", "ms", "GB/s", "x torch", "x hivemind"]
        print(format_table(rows, columns))
        results["cpu"] = {"rows": rows, "goal": cpu_goal(rows)}
        if results["cpu"]["goal"]:
            print(f"\nsingle-thread native quantize goal: {results['cpu']['goal']}")
    if gpu_available:
        gpu = run_gpu(args, gpu_device)
        print(f"\nGPU {gpu['device']}: copy bandwidth {gpu['copy_gbps']:.0f} GB/s; bytes read + written per second")
        print(format_table(gpu["rows"], ["kernel", "numel", "config", "us", "GB/s", "of copy"]))
        print(format_table(gpu["comparisons"], ["impl", "numel", "us", "GB/s", "of copy", "x torch"]))
        results["gpu"] = gpu
    else:
        reason = "no CUDA device" if not device_present else "Triton is not installed (pip install hiveengine[gpu])"
        results["gpu"] = {"status": f"not run: {reason}" if args.gpu else "skipped (--no-gpu)"}
        print(f"\nGPU: {results['gpu']['status']}")
    results["loadavg_after"] = os.getloadavg()
    device = slug(results["gpu"]["device"]) if "device" in results["gpu"] else "cpu"
    path = write_results(args.name or f"kernels-{device}", results)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
