"""MoE benchmark: forward+backward samples/s through expert servers, vs the local compute ceiling and hivemind.

A server process hosts ffn experts (Adam): 16 (ffn.[0:4].[0:4]) for RemoteExpert, where client i calls expert i,
and 4 (ffn.[0:2].[0:2]) for RemoteMixtureOfExperts with k_best=2 (beam search over the DHT). Client processes run
forward+backward steps concurrently for a fixed duration. The local ceiling
is the same computation in this process with no network: the expert (or a local mixture of the same experts)
forward, backward and optimizer step. With --compare hivemind, hivemind's Server, RemoteExpert and
RemoteMixtureOfExperts run the same configurations (in their own venv). Writes bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, hivemind_python, read_prefixed, write_results
from bench.hivemind_moe_worker import timed_steps
from hiveengine.moe.server.backend import optimizer_factory

HIDDEN = 1024
GRIDS = {"expert": (4, 4), "moe": (2, 2)}  # the server's experts per mode: ffn.[0:4].[0:4] or ffn.[0:2].[0:2]
BATCHES = [64, 256]
CLIENTS = [1, 4]
MODES = ["expert", "moe"]
MOE_PREFIX, MOE_K = "ffn.", 2
LR = 1e-3  # Adam's default, as hivemind's server uses
DURATION = 8.0  # seconds each configuration is measured
WARMUP = 2  # steps each client runs before measuring
LINE_TIMEOUT = 600.0
WORKER = Path(__file__).resolve().parent / "hivemind_moe_worker.py"
CALL_TIMEOUT = 300.0


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
    server = Server.create("ffn", plan["uids"], plan["hidden"], optimizer=adam, dht=dht, seed=0)
    print("ADDRESS", server.address, flush=True)
    print("DHT", dht.address, flush=True)
    sys.stdin.read()
    stats = server.stats()
    print("STATS", json.dumps({"rows": stats.rows, "batches": stats.batches}), flush=True)
    server.shutdown()
    dht.shutdown()


def hive_client() -> None:
    from hiveengine.dht import DHT
    from hiveengine.moe import RemoteExpert, RemoteMixtureOfExperts

    plan = json.loads(sys.stdin.readline())
    torch.set_num_threads(1)
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


# ---------------------------------------------------------------- local ceilings


def local_rate(mode: str, hidden: int, batch: int, duration: float) -> float:
    """Samples/s of the same computation in this process: no network, all cores."""
    from hiveengine.moe import get_expert_class

    torch.set_num_threads(os.cpu_count() or 1)
    klass = get_expert_class("ffn")
    n = 1 if mode == "expert" else len(server_uids(mode))
    experts = [klass.build(hidden, seed=i) for i in range(n)]
    opts = [optimizer_factory("adam", LR)(e.parameters()) for e in experts]
    proj = torch.nn.Linear(hidden, n)
    x = torch.randn(batch, hidden, requires_grad=True)

    def expert_step() -> None:
        experts[0](x).sum().backward()

    def moe_step() -> None:
        top = proj(x).topk(MOE_K, dim=1)
        weights = torch.softmax(top.values, dim=1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            rows, slots = (top.indices == e).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, weights[rows, slots, None] * expert(x[rows]))
        out.sum().backward()

    step = expert_step if mode == "expert" else moe_step
    samples, start = 0, None
    for i in range(WARMUP + 1_000_000):
        if i == WARMUP:
            start = time.perf_counter()
        step()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if start is not None:
            samples += batch
            if time.perf_counter() - start >= duration:
                break
    return samples / (time.perf_counter() - start)


def measure_ceilings(args: argparse.Namespace) -> dict[tuple, float]:
    """The local rate of each (mode, batch) configuration, keyed like the remote rates with 0 clients."""
    rates = {}
    for mode, batch in itertools.product(args.modes, args.batches):
        print(f"measuring the local ceiling: {mode}, batch {batch} ...", file=sys.stderr, flush=True)
        rates[mode, batch, 0, "local"] = local_rate(mode, args.hidden, batch, args.duration)
    return rates


# ---------------------------------------------------------------- orchestration


def _popen(argv: list[str], threads: int, own_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=own_session
    )


def _send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _stop(procs: list[subprocess.Popen], own_session: bool) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            if own_session:
                os.killpg(p.pid, signal.SIGKILL)  # hivemind's p2pd and runtime processes go with it
            else:
                p.kill()
        p.wait(30)


class System:
    """One side of the comparison: how to start its server and its client processes."""

    def __init__(self, name: str, python: str, script: Path, own_session: bool):
        self.name, self.python, self.script, self.own_session = name, python, script, own_session
        self.server: subprocess.Popen | None = None
        self.contact: dict = {}

    def start_server(self, hidden: int, uids: list[str]) -> None:
        threads = os.cpu_count() or 1
        role = ["server"] if self.own_session else ["--role", "server"]
        self.server = _popen([self.python, str(self.script), *role], threads, self.own_session)
        _send(self.server, json.dumps({"hidden": hidden, "uids": uids, "threads": threads}))
        if self.own_session:
            self.contact = {"initial_peers": json.loads(read_prefixed(self.server, "MADDRS", LINE_TIMEOUT))}
        else:
            address = read_prefixed(self.server, "ADDRESS", LINE_TIMEOUT)
            self.contact = {"address": address, "dht": read_prefixed(self.server, "DHT", LINE_TIMEOUT)}

    def stop_server(self) -> None:
        if self.server is not None:
            _stop([self.server], self.own_session)
            self.server = None

    def run(self, mode: str, hidden: int, batch: int, clients: int, duration: float, timeout: float) -> float:
        """Aggregate samples/s of `clients` processes stepping together for `duration` seconds."""
        role = ["client"] if self.own_session else ["--role", "client"]
        procs = [_popen([self.python, str(self.script), *role], 1, self.own_session) for _ in range(clients)]
        uids = server_uids(mode)
        try:
            for i, proc in enumerate(procs):
                plan = {
                    **self.contact,
                    "mode": mode,
                    "hidden": hidden,
                    "batch": batch,
                    "uid": uids[i % len(uids)],
                    "grid": list(GRIDS[mode]),
                    "uid_prefix": MOE_PREFIX,
                    "k_best": MOE_K,
                    "warmup": WARMUP,
                    "duration": duration,
                }
                _send(proc, json.dumps(plan))
            for proc in procs:
                read_prefixed(proc, "READY", timeout)
            for proc in procs:
                _send(proc, "go")
            results = [json.loads(read_prefixed(p, "RESULT", timeout)) for p in procs]
        finally:
            _stop(procs, self.own_session)
        return sum(r["samples"] for r in results) / max(r["seconds"] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS, help="client processes (1-8)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds per configuration")
    parser.add_argument("--compare", choices=["hivemind"], help="also run hivemind (in its own venv)")
    parser.add_argument("--timeout", type=float, default=LINE_TIMEOUT, help="seconds a client may take to warm up")
    args = parser.parse_args(argv)
    if args.role == "server":
        hive_server()
        return 0
    if args.role == "client":
        hive_client()
        return 0

    systems = [System("hiveengine", sys.executable, Path(__file__).resolve(), own_session=False)]
    if args.compare == "hivemind":
        systems.append(System("hivemind 1.1.12", hivemind_python(), WORKER, own_session=True))
    load_before = os.getloadavg()
    ceilings = measure_ceilings(args)
    rates: dict[tuple, float] = {}
    for mode, system in itertools.product(args.modes, systems):
        system.start_server(args.hidden, server_uids(mode))
        try:
            for batch in args.batches:
                for clients in args.clients:
                    print(f"measuring {system.name}: {mode}, batch {batch}, {clients} clients ...", file=sys.stderr)
                    try:
                        rate = system.run(mode, args.hidden, batch, clients, args.duration, args.timeout)
                    except RuntimeError as e:  # a configuration that does not finish in time is recorded as such
                        print(f"  {system.name} did not finish: {e}", file=sys.stderr)
                        rate = None
                    rates[mode, batch, clients, system.name] = rate
        finally:
            system.stop_server()
    # The machine is shared: the ceiling is measured before and after the remote runs, and their mean is used.
    after = measure_ceilings(args)
    rates.update({key: (before + after[key]) / 2 for key, before in ceilings.items()})
    records = []
    for (mode, batch, clients, name), rate in sorted(rates.items(), key=lambda item: item[0][:3]):
        local = rates[mode, batch, 0, "local"]
        hivemind = rates.get((mode, batch, clients, systems[-1].name)) if len(systems) > 1 else None
        records.append(
            {
                "mode": mode,
                "batch": batch,
                "clients": clients or None,
                "system": name,
                "samples_per_s": rate,
                "vs_local": rate / local if rate else None,
                "vs_hivemind": rate / hivemind if rate and hivemind and name != "local" else None,
            }
        )
    print(format_table(records, ["mode", "batch", "clients", "system", "samples_per_s", "vs_local", "vs_hivemind"]))
    print(
        f"hidden {args.hidden}; expert: client i calls expert i of 16; moe: k_best={MOE_K} of 4 experts; "
        f"local = same compute in one process (fwd+bwd+Adam); load before/after: {load_before[0]:.2f}/"
        f"{os.getloadavg()[0]:.2f}"
    )
    payload = {
        "hidden": args.hidden,
        "duration": args.duration,
        "load_1min": [load_before[0], os.getloadavg()[0]],
        "local_before_after": [[*key[:2], ceilings[key], after[key]] for key in ceilings],
    }
    path = write_results("moe", {**payload, "records": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
