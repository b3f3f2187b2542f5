"""GPU residency benchmark: where the payload of an averaging round and of an expert call goes, host or CUDA buffers.

Two parts, each run on host (cpu) and CUDA buffers side by side:
- all-reduce: N peer processes (bench/allreduce.py's workers) average a buffer on the device; a round's time is the
  slowest peer's (median over rounds); then each peer runs one more round under the torch profiler and reports the
  host<->device copies its process made (CUPTI sees every copy, UCX's included).
- expert: a server process hosts one ffn expert on the device (without an optimizer) and this process calls it
  (RemoteExpert forward and backward); one call runs under the profiler in both processes.
A copy counts as payload from PAYLOAD_MIN_BYTES up (the kernels' NaN flags, weights and pointer tables, and the
expert's routing metadata, are smaller). The goals: no payload copy through the host with CUDA buffers, and an
all-reduce of CUDA buffers at least as fast as of host buffers. Writes bench/results/local/residency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.allreduce import run_hive
from bench.common import format_table, host_copies, kill_worker, read_prefixed, write_results

MiB = 1 << 20
PAYLOAD_MIN_BYTES = 4096
EXPERT_UID = "ffn.0"
LINE_TIMEOUT = 120.0


def expert_server(device: str, hidden: int) -> None:
    """Serve one expert; on "profile", profile until the next line and print the copies made meanwhile."""
    from hiveengine.moe import Server

    server = Server.create("ffn", [EXPERT_UID], hidden, device=device, seed=0)  # no optimizer: weights stay put
    print("ADDRESS", server.address, flush=True)
    while sys.stdin.readline().strip() == "profile":
        copies = host_copies(lambda: (print("PROFILING", flush=True), sys.stdin.readline()))
        print("RESULT", json.dumps({"host_copies": copies}), flush=True)
    server.shutdown()


def _tell(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def run_expert(device: str, hidden: int, batch: int, calls: int) -> dict:
    """Time forward+backward calls of a remote expert on `device`; profile one call on both sides."""
    from hiveengine.moe import RemoteExpert

    argv = [sys.executable, __file__, "--role", "expert-server", "--device", device, "--hidden", str(hidden)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        expert = RemoteExpert(EXPERT_UID, read_prefixed(proc, "ADDRESS", LINE_TIMEOUT))
        x = torch.randn(batch, hidden, device=device, requires_grad=True)

        def call() -> None:
            y = expert(x)
            y.backward(torch.ones_like(y))
            if x.is_cuda:
                torch.cuda.synchronize()

        times = []
        for _ in range(calls + 3):  # the first calls warm up the connection, allocator and kernels
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        _tell(proc, "profile")
        read_prefixed(proc, "PROFILING", LINE_TIMEOUT)
        client = host_copies(call)
        _tell(proc, "stop")
        server = json.loads(read_prefixed(proc, "RESULT", LINE_TIMEOUT))["host_copies"]
        _tell(proc, "exit")
        proc.wait(timeout=LINE_TIMEOUT)
        return {"seconds": statistics.median(times[3:]), "host_copies": [client, server]}
    finally:
        kill_worker(proc)


def copy_summary(per_process: list[list[int]] | None) -> dict:
    """Host<->device copies over all processes: count, bytes, and those of payload size."""
    if per_process is None:
        return {}
    copies = [b for process in per_process for b in process]
    payload = [b for b in copies if b >= PAYLOAD_MIN_BYTES]
    return {"host copies": len(copies), "host bytes": sum(copies), "payload copies": len(payload)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hiveengine bench residency", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["expert-server"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="buffer devices (default: cpu cuda)")
    p.add_argument("--peers", type=int, default=3, help="all-reduce peers (default 3)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4 * MiB, 64 * MiB], help="all-reduce fp32 elements")
    p.add_argument("--codecs", nargs="+", default=["none", "int8"], help="all-reduce codecs (default: none int8)")
    p.add_argument("--rounds", type=int, default=5, help="timed all-reduce rounds (default 5)")
    p.add_argument("--hidden", type=int, default=1024, help="expert width (default 1024)")
    p.add_argument("--batch", type=int, default=256, help="rows per expert call (default 256)")
    p.add_argument("--calls", type=int, default=20, help="timed expert calls (default 20)")
    p.add_argument("--parts", nargs="+", choices=["allreduce", "expert"], default=["allreduce", "expert"])
    return p.parse_args(argv)


COLUMNS = ["part", "device", "codec", "numel", "ms", "GB/s", "x host", "host copies", "host bytes", "payload copies"]


def finish(rows: list[dict], config: dict) -> dict:
    """Fill in each row's speed against host buffers, judge the goals, write residency.json; return the goals."""
    for row in rows:
        host = [r for r in rows if r["device"] == "cpu" and all(r[k] == row[k] for k in ("part", "codec", "numel"))]
        row["x host"] = host[0]["ms"] / row["ms"] if host else None
    cuda = [r for r in rows if r["device"] == "cuda"]
    goals = {
        "no payload copy through the host": bool(cuda) and all(r["payload copies"] == 0 for r in cuda),
        "CUDA all-reduce at least as fast as host": bool(cuda)
        and all(r["x host"] is not None and r["x host"] >= 1.0 for r in cuda if r["part"].startswith("all-reduce")),
    }
    write_results("residency", {"config": config, "rows": rows, "goals": goals, "loadavg": os.getloadavg()})
    return goals


def main(argv: list[str] | None = None) -> int:
    """Run both parts on every device, print the table, write residency.json (after each measurement too, so an
    interrupted run keeps what it measured); returns 0."""
    args = parse_args(argv)
    if args.role == "expert-server":
        expert_server(args.device, args.hidden)
        return 0
    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    if devices != args.devices:
        print("no CUDA device: measuring host buffers only", file=sys.stderr, flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("role", "device")}
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
        finish(rows, config)

    if "allreduce" in args.parts:
        for numel in args.sizes:
            for codec in args.codecs:
                for device in devices:
                    profile = device == "cuda"
                    result = run_hive(args.peers, numel, codec, args.rounds, None, device=device, profile=profile)
                    record(
                        {
                            "part": f"all-reduce x{args.peers}",
                            "device": device,
                            "codec": codec,
                            "numel": numel,
                            "ms": 1e3 * result["seconds"],
                            "GB/s": 4 * numel / result["seconds"] / 1e9,
                            **copy_summary(result.get("host_copies")),
                        }
                    )
    if "expert" in args.parts:
        for device in devices:
            result = run_expert(device, args.hidden, args.batch, args.calls)
            record(
                {
                    "part": "expert fwd+bwd",
                    "device": device,
                    "codec": "none",
                    "numel": args.batch * args.hidden,
                    "ms": 1e3 * result["seconds"],
                    "GB/s": 4 * 4 * args.batch * args.hidden / result["seconds"] / 1e9,  # x, y, dy, dx
                    **(copy_summary(result["host_copies"]) if device == "cuda" else {}),
                }
            )
    goals = finish(rows, config)
    print()
    print(format_table(rows, COLUMNS))
    print(f"\ngoals: {goals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
