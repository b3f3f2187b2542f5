"""MoE benchmark: forward+backward samples/s through expert servers, vs the local compute ceiling and hivemind.

A server process hosts ffn experts (Adam): 16 (ffn.[0:4].[0:4]) for RemoteExpert, where client i calls expert i,
and 4 (ffn.[0:2].[0:2]) for RemoteMixtureOfExperts with k_best=2 (beam search over the DHT). Client processes run
forward+backward steps concurrently for a fixed duration. The local ceiling is the same computation in this
process with no network: the expert (or a local mixture of the same experts) forward, backward and optimizer step.
With --compare hivemind, hivemind's Server, RemoteExpert and RemoteMixtureOfExperts run the same configurations
(in their own venv). Writes bench/results/local/moe.json.

Measurement method (the host is small and shared, so wall times drift by several x within minutes):
- Threads are pinned: each server's compute and the local reference get `--server-threads` torch intra-op threads
  (the same compute resources), each client process gets CLIENT_THREADS. On 2 cores the default is 1: the other
  core carries the client processes and the transports, and two OpenMP threads slow down several-fold whenever
  any other process is runnable (their barrier waits on a descheduled thread).
- Only the system being measured runs: the other servers are paused (SIGSTOP) meanwhile.
- Every client and the local reference warm up (steps and seconds) before the clock starts.
- Runs are interleaved: each repeat measures local, then each system at each client count, in an order that
  reverses every repeat (A/B/A/B), and ratios are taken within a repeat, then their median is reported.
- Every measurement records the 1-minute load average before and after it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, hivemind_python, read_prefixed, write_results
from bench.hivemind_moe_worker import timed_steps
from hiveengine.moe.server.backend import optimizer_factory

HIDDEN = 1024
GRIDS = {"expert": (4, 4), "moe": (2, 2)}  # the server's experts per mode: ffn.[0:4].[0:4] or ffn.[0:2].[0:2]
BATCHES = [64, 256]
CLIENTS = [1, 4, 8]
MODES = ["expert", "moe"]
MOE_PREFIX, MOE_K = "ffn.", 2
LR = 1e-3  # Adam's default, as hivemind's server uses
DURATION = 4.0  # seconds each measurement runs
REPEATS = 3  # interleaved repeats of every configuration; medians are reported
WARMUP_STEPS = 3  # steps each client (and the local reference) runs before measuring ...
WARMUP_SECONDS = 1.0  # ... and at least this long
SERVER_THREADS = max(1, (os.cpu_count() or 2) // 2)  # torch threads of a server's compute and the local reference
CLIENT_THREADS = 1  # torch threads of each client process
UPDATE_PERIOD = 600.0  # seconds between the servers' DHT declarations: longer than any pause while others run
LINE_TIMEOUT = 600.0
WORKER = Path(__file__).resolve().parent / "hivemind_moe_worker.py"
CALL_TIMEOUT = 300.0
LOCAL = "local"


def server_uids(mode: str) -> list[str]:
    rows, cols = GRIDS[mode]
    return [f"ffn.{i}.{j}" for i in range(rows) for j in range(cols)]


# ---------------------------------------------------------------- hiveengine worker processes


def hive_server() -> None:
    from hiveengine.dht import DHT
    from hiveengine.moe import Server

    plan = json.loads(sys.stdin.readline())
    torch.set_num_threads(plan["threads"])
    dht = DHT()
    adam = optimizer_factory("adam", LR)
    server = Server.create(
        "ffn", plan["uids"], plan["hidden"], optimizer=adam, dht=dht, seed=0, update_period=plan["update_period"]
    )
    print("ADDRESS", server.address, flush=True)
    print("DHT", dht.address, flush=True)
    sys.stdin.read()
    server.shutdown()
    dht.shutdown()


def hive_client() -> None:
    from hiveengine.dht import DHT
    from hiveengine.moe import RemoteExpert, RemoteMixtureOfExperts

    plan = json.loads(sys.stdin.readline())
    torch.set_num_threads(plan["threads"])
    dht = DHT(initial_peers=[plan["dht"]], client_mode=True)
    if plan["mode"] == "expert":
        model = RemoteExpert(plan["uid"], plan["address"], forward_timeout=CALL_TIMEOUT, backward_timeout=CALL_TIMEOUT)
    else:
        model = RemoteMixtureOfExperts(
            plan["hidden"],
            plan["grid"],
            plan["uid_prefix"],
            k_best=plan["k_best"],
            forward_timeout=CALL_TIMEOUT,
            backward_timeout=CALL_TIMEOUT,
            dht=dht,
        )
    x = torch.randn(plan["batch"], plan["hidden"], requires_grad=True)
    timed_steps(lambda: model(x).sum().backward(), plan)
    dht.shutdown()


# ---------------------------------------------------------------- the local ceiling


class LocalReference:
    """The computation a server does for one client, in this process with no network: one expert (or a gated
    mixture of the mode's experts, k_best per sample) forward, backward and an Adam step per expert. Its modules
    persist across measurements, so every repeat after the first starts warm."""

    def __init__(self, mode: str, hidden: int):
        from hiveengine.moe import get_expert_class

        klass = get_expert_class("ffn")
        count = 1 if mode == "expert" else len(server_uids(mode))
        self.experts = [klass.build(hidden, seed=i) for i in range(count)]
        self.opts = [optimizer_factory("adam", LR)(e.parameters()) for e in self.experts]
        self.proj = torch.nn.Linear(hidden, count)
        self.mode, self.hidden = mode, hidden

    def _moe_output(self, x: torch.Tensor) -> torch.Tensor:
        top = self.proj(x).topk(MOE_K, dim=1)
        weights = torch.softmax(top.values, dim=1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slots = (top.indices == e).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, weights[rows, slots, None] * expert(x[rows]))
        return out

    def step_fn(self, batch: int) -> Callable[[], None]:
        """One training step on a fixed batch, as a client would run it against the server."""
        x = torch.randn(batch, self.hidden, requires_grad=True)
        forward = self.experts[0] if self.mode == "expert" else self._moe_output

        def step() -> None:
            forward(x).sum().backward()
            for opt in self.opts:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    def rate(self, batch: int, duration: float) -> float:
        """Samples/s of `step_fn(batch)` over `duration` seconds, after the same warm-up the clients get."""
        step = self.step_fn(batch)
        start, steps = time.perf_counter(), 0
        while steps < WARMUP_STEPS or time.perf_counter() - start < WARMUP_SECONDS:
            step()
            steps += 1
        start, steps = time.perf_counter(), 0
        while steps == 0 or time.perf_counter() - start < duration:
            step()
            steps += 1
        return steps * batch / (time.perf_counter() - start)


# ---------------------------------------------------------------- orchestration


def _popen(argv: list[str], threads: int) -> subprocess.Popen:
    """A worker process in its own session (so it can be paused or killed with everything it started)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _signal_group(p, signal.SIGCONT)
        _signal_group(p, signal.SIGKILL)  # hivemind's p2pd and runtime processes go with it
        p.wait(30)


class System:
    """One side of the comparison: how to start its server and its client processes."""

    def __init__(self, name: str, python: str, script: Path, module_style: bool):
        self.name, self.python, self.script = name, python, script
        self.module_style = module_style  # bench/moe.py takes --role; the hivemind worker takes a bare role
        self.server: subprocess.Popen | None = None
        self.contact: dict = {}

    def _argv(self, role: str) -> list[str]:
        return [self.python, str(self.script), *(["--role", role] if self.module_style else [role])]

    def start_server(self, hidden: int, uids: list[str], threads: int) -> None:
        self.server = _popen(self._argv("server"), threads)
        plan = {"hidden": hidden, "uids": uids, "threads": threads, "update_period": UPDATE_PERIOD}
        _send(self.server, json.dumps(plan))
        if self.module_style:
            address = read_prefixed(self.server, "ADDRESS", LINE_TIMEOUT)
            self.contact = {"address": address, "dht": read_prefixed(self.server, "DHT", LINE_TIMEOUT)}
        else:
            self.contact = {"initial_peers": json.loads(read_prefixed(self.server, "MADDRS", LINE_TIMEOUT))}

    def pause(self) -> None:
        """Stop the server's processes from using CPU while another system is measured."""
        if self.server is not None:
            _signal_group(self.server, signal.SIGSTOP)

    def resume(self) -> None:
        if self.server is not None:
            _signal_group(self.server, signal.SIGCONT)

    def stop_server(self) -> None:
        if self.server is not None:
            _stop([self.server])
            self.server = None

    def run(self, mode: str, batch: int, clients: int, args: argparse.Namespace) -> float:
        """Aggregate samples/s of `clients` processes stepping together for `args.duration` seconds."""
        procs = [_popen(self._argv("client"), CLIENT_THREADS) for _ in range(clients)]
        uids = server_uids(mode)
        try:
            for i, proc in enumerate(procs):
                plan = {
                    **self.contact,
                    "mode": mode,
                    "hidden": args.hidden,
                    "batch": batch,
                    "uid": uids[i % len(uids)],
                    "grid": list(GRIDS[mode]),
                    "uid_prefix": MOE_PREFIX,
                    "k_best": MOE_K,
                    "warmup": WARMUP_STEPS,
                    "warmup_seconds": WARMUP_SECONDS,
                    "duration": args.duration,
                    "threads": CLIENT_THREADS,
                }
                _send(proc, json.dumps(plan))
            for proc in procs:
                read_prefixed(proc, "READY", args.timeout)
            for proc in procs:
                _send(proc, "go")
            results = [json.loads(read_prefixed(p, "RESULT", args.timeout)) for p in procs]
        finally:
            _stop(procs)
        return sum(r["samples"] for r in results) / max(r["seconds"] for r in results)


def measure(name: str, fn: Callable[[], float]) -> dict:
    """Run one measurement; its rate (None if it did not finish) and the 1-minute load before and after."""
    load_before = os.getloadavg()[0]
    try:
        rate = fn()
    except RuntimeError as e:  # a configuration that does not finish in time is recorded as such
        print(f"  {name} did not finish: {e}", file=sys.stderr)
        rate = None
    return {"samples_per_s": rate, "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_mode(mode: str, systems: list[System], args: argparse.Namespace) -> list[dict]:
    """Every measurement of one mode: per batch, REPEATS rounds of local then each (clients, system), the order
    of systems reversed every other round; only the measured system's server runs."""
    local = LocalReference(mode, args.hidden)
    for system in systems:
        system.start_server(args.hidden, server_uids(mode), args.server_threads)
        system.pause()
    runs = []
    try:
        for batch, rep in itertools.product(args.batches, range(args.repeats)):
            order = systems if rep % 2 == 0 else systems[::-1]
            for clients in args.clients:
                print(f"{mode}, batch {batch}, {clients} clients, repeat {rep + 1}/{args.repeats}", file=sys.stderr)
                key = {"mode": mode, "batch": batch, "clients": clients, "repeat": rep}
                result = measure(LOCAL, lambda b=batch: local.rate(b, args.duration))
                runs.append({**key, "system": LOCAL, **result})
                print(f"  {LOCAL}: {result}", file=sys.stderr)
                for system in order:
                    system.resume()
                    try:
                        result = measure(system.name, lambda s=system, b=batch, c=clients: s.run(mode, b, c, args))
                    finally:
                        system.pause()
                    runs.append({**key, "system": system.name, **result})
                    print(f"  {system.name}: {result}", file=sys.stderr)
    finally:
        for system in systems:
            system.stop_server()
    return runs


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], reference: str | None) -> list[dict]:
    """Per (mode, batch, clients, system): the median rate, and the medians of the ratios to the local run and to
    `reference` (hivemind) taken within the same repeat."""
    by_key: dict[tuple, dict[int, dict]] = {}
    for run in runs:
        by_key.setdefault((run["mode"], run["batch"], run["clients"], run["system"]), {})[run["repeat"]] = run
    records = []
    for (mode, batch, clients, name), reps in by_key.items():
        local = by_key[mode, batch, clients, LOCAL]
        other = by_key.get((mode, batch, clients, reference), {}) if reference else {}
        loads = [load for r in reps.values() for load in r["load_1min"]]

        def ratio(against: dict[int, dict], rep: int, run: dict) -> float | None:
            base = against.get(rep, {}).get("samples_per_s")
            return run["samples_per_s"] / base if run["samples_per_s"] and base else None

        records.append(
            {
                "mode": mode,
                "batch": batch,
                "clients": clients,
                "system": name,
                "samples_per_s": _median([r["samples_per_s"] for r in reps.values()]),
                "vs_local": _median([ratio(local, rep, r) for rep, r in reps.items()]),
                "vs_hivemind": _median([ratio(other, rep, r) for rep, r in reps.items()]) if name != LOCAL else None,
                "load_1min": [min(loads), max(loads)],
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS, help="client processes (1-8)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repeats (medians are reported)")
    parser.add_argument(
        "--server-threads", type=int, default=SERVER_THREADS, help="torch threads of each server and the local run"
    )
    parser.add_argument("--compare", choices=["hivemind"], help="also run hivemind (in its own venv)")
    parser.add_argument("--timeout", type=float, default=LINE_TIMEOUT, help="seconds a client may take to warm up")
    parser.add_argument("--output", default="moe", help="results name under bench/results/local/ (see bench/common.py)")
    args = parser.parse_args(argv)
    if args.role == "server":
        hive_server()
        return 0
    if args.role == "client":
        hive_client()
        return 0

    torch.set_num_threads(args.server_threads)
    systems = [System("hiveengine", sys.executable, Path(__file__).resolve(), module_style=True)]
    if args.compare == "hivemind":
        systems.append(System("hivemind 1.1.12", hivemind_python(), WORKER, module_style=False))
    reference = systems[-1].name if len(systems) > 1 else None
    settings = {
        "hidden": args.hidden,
        "duration": args.duration,
        "repeats": args.repeats,
        "server_threads": args.server_threads,
        "local_threads": args.server_threads,
        "client_threads": CLIENT_THREADS,
        "warmup": {"steps": WARMUP_STEPS, "seconds": WARMUP_SECONDS},
        "command": " ".join(["python3", "bench/moe.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    runs: list[dict] = []
    for mode in args.modes:
        runs += run_mode(mode, systems, args)
        records = summarize(runs, reference)
        path = write_results(args.output, {**settings, "records": records, "runs": runs})  # each mode kept as it ends
    columns = ["mode", "batch", "clients", "system", "samples_per_s", "vs_local", "vs_hivemind", "load_1min"]
    print(format_table(records, columns))
    print(
        f"hidden {args.hidden}; expert: client i calls expert i of 16; moe: k_best={MOE_K} of 4 experts; local = "
        f"same compute in one process (fwd+bwd+Adam); torch threads: server and local {args.server_threads}, each "
        f"client {CLIENT_THREADS}; medians of {args.repeats} interleaved repeats of {args.duration:g} s"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
