"""`hiveengine bench NAME`: run a benchmark from the source checkout's bench/ directory."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import hiveengine

BENCHMARKS = ["transport", "kernels", "dht", "allreduce", "train", "moe"]


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark suite (needs a source checkout)")
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")
    bench.set_defaults(handler=cmd_bench)


def bench_dir() -> Path:
    return Path(hiveengine.__file__).resolve().parent.parent / "bench"


def cmd_bench(args: argparse.Namespace) -> int:
    path = bench_dir() / f"{args.name}.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: benchmarks run from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"hiveengine_bench_{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)
