"""`hiveengine bench NAME`: run a benchmark from the source checkout's bench/ directory.

Results go to bench/results/local/ (git-ignored); `--out DIR` puts them in DIR, `--save-results` updates the
committed ones in bench/results/. Both may come before or after NAME.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import hiveengine
from hiveengine.cli.common import UsageError

BENCHMARKS = [
    "transport",
    "kernels",
    "dht",
    "allreduce",
    "rounds",
    "train",
    "moe",
    "swarm_attacks",
    "relay",
    "rails",
    "residency",
]
OUT_ENV = "HIVEENGINE_BENCH_OUT"  # read by bench/common.py
SAVE_ENV = "HIVEENGINE_BENCH_SAVE"


def add_commands(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite (needs a source checkout)",
        description="Run a benchmark; its results go to bench/results/local/ unless --out or --save-results. "
        "Arguments after NAME go to the benchmark (NAME --help lists them).",
    )
    bench.add_argument("--out", metavar="DIR", default=None, help=f"write the results to DIR (env {OUT_ENV})")
    bench.add_argument(
        "--save-results",
        action="store_true",
        help=f"update the committed results in bench/results/ (env {SAVE_ENV}=1)",
    )
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")
    bench.set_defaults(handler=cmd_bench)


def bench_dir() -> Path:
    return Path(hiveengine.__file__).resolve().parent.parent / "bench"


def take_result_options(args: argparse.Namespace) -> list[str]:
    """The benchmark's own arguments, without --save-results / --out DIR given after NAME (those set args)."""
    rest, passed = list(args.args), []
    while rest:
        arg = rest.pop(0)
        if arg == "--save-results":
            args.save_results = True
        elif arg == "--out" or arg.startswith("--out="):
            value = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else None)
            if not value:
                raise UsageError("--out needs a directory")
            args.out = value
        else:
            passed.append(arg)
    return passed


def cmd_bench(args: argparse.Namespace) -> int:
    argv = take_result_options(args)
    directory = bench_dir()
    path = directory / f"{args.name}.py"
    if not path.is_file():
        raise UsageError(f"{path} not found: benchmarks run from a source checkout (pip install -e .)")
    if args.save_results:
        os.environ[SAVE_ENV] = "1"  # the benchmark's worker processes inherit it
    if args.out:
        os.environ[OUT_ENV] = str(Path(args.out).resolve())
    # Import it as the package module bench.NAME (registered in sys.modules, which @dataclass and pickling
    # need), with the checkout's root on the path as when run as `python bench/NAME.py`.
    root = str(directory.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(f"bench.{args.name}")
    sys.argv = [str(path), *argv]  # what the benchmark would see run directly (its usage line, its workers)
    return int(module.main(argv) or 0)
