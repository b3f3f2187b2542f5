"""Shared by the benchmarks: a plain-text table and a JSON record of each run.

Runs write their records to bench/results/local/ (ignored by git), so running a benchmark never changes the
committed results in bench/results/. HIVEENGINE_BENCH_OUT=DIR (`hiveengine bench NAME --out DIR`) writes them to
DIR instead; HIVEENGINE_BENCH_SAVE=1 (`hiveengine bench NAME --save-results`) updates the committed results.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"  # tracked: the numbers the README quotes
RESULTS_DIR = COMMITTED_RESULTS_DIR / "local"  # where runs write by default (git-ignored)
OUT_ENV = "HIVEENGINE_BENCH_OUT"  # a directory for this run's records instead of RESULTS_DIR
SAVE_ENV = "HIVEENGINE_BENCH_SAVE"  # "1": write to COMMITTED_RESULTS_DIR (update the committed results)


def results_dir() -> Path:
    """Where this run writes its records (created): the committed results with HIVEENGINE_BENCH_SAVE=1, else
    HIVEENGINE_BENCH_OUT, else bench/results/local/."""
    if os.environ.get(SAVE_ENV, "").lower() in ("1", "true", "yes"):
        path = COMMITTED_RESULTS_DIR
    elif os.environ.get(OUT_ENV):
        path = Path(os.environ[OUT_ENV])
    else:
        path = RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_info() -> dict:
    return {
        "cpu_count": psutil.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Left-aligned text table of `rows` restricted to `columns` (floats shown with 3 significant digits)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path:
    """Write `payload` (plus machine facts) to <results_dir()>/<name>.json and return the path."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path


HOST_COPY_KINDS = ("HtoD", "DtoH")


def host_copies(run: Callable[[], object]) -> list[int]:
    """Run `run` under the torch profiler and return the byte count of every host<->device copy that this process
    made meanwhile, by any thread or library (CUPTI sees UCX's copies too); [] without CUDA."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        run()
        return []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return [
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and any(kind in e.get("name", "") for kind in HOST_COPY_KINDS)
    ]


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL a worker, and its whole process group when it leads one (hivemind's workers start helper
    processes that would otherwise outlive it and keep its stdout open)."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


def read_prefixed(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The rest of the first stdout line of `proc` starting with `prefix` (a worker's announcement). A worker
    that prints no such line within `timeout` seconds is killed (a silent hang cannot block the caller)."""
    watchdog = threading.Timer(timeout, kill_worker, (proc,))
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    finally:
        watchdog.cancel()
    raise RuntimeError(f"{proc.args} printed no {prefix!r} line within {timeout} s (exit code {proc.poll()})")


HIVEMIND_VENV = Path(__file__).resolve().parent / ".venv-hivemind"
HIVEMIND_REQUIREMENTS = ["torch==2.13.0", "hivemind==1.1.12", "numpy<2.4"]


def hivemind_python() -> str:
    """The python of hivemind's own venv (created on first use): hivemind is never a dependency of hiveengine."""
    python = HIVEMIND_VENV.resolve() / "bin" / "python"
    if not python.exists():
        print(f"creating {HIVEMIND_VENV} with {' '.join(HIVEMIND_REQUIREMENTS)} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(HIVEMIND_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *HIVEMIND_REQUIREMENTS], check=True)
    return str(python)
