"""All-reduce benchmark: hiveengine's butterfly all-reduce (per codec) vs torch.distributed gloo.

Each configuration runs N peer processes on this host. A round's time is the slowest peer's; the table
shows the median over rounds, the algorithm bandwidth (tensor bytes / round time) and the bytes each
peer put on the wire. Writes bench/results/local/allreduce.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, hivemind_python, host_copies, kill_worker, read_prefixed, write_results
from tools.netns import INNER_IFACE, ShapedNetwork, WanNetwork, nat_available
from tools.netns import available as netns_available

MiB = 1 << 20
PEERS = [2, 4]
SIZES = [16 * MiB, 32 * MiB]  # fp32 elements: 64 MB and 128 MB
CODECS = ["none", "fp16", "int8", "int4"]
ROUNDS = 5
LINE_TIMEOUT = 300.0
HIVEMIND_CODECS = {"none": "none", "fp16": "fp16", "int8": "int8"}  # ours -> hivemind's nearest compression


# ---------------------------------------------------------------- hiveengine worker


def hive_worker(relay: str | None) -> None:
    """One peer; with `relay`, a peer behind a NAT: it learns so by dial-back and reserves a slot with that relay."""
    from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, run_allreduce
    from hiveengine.codec import get_codec
    from hiveengine.transport import Peer, PeerID
    from hiveengine.transport.reachability import check_reachability_sync
    from hiveengine.transport.relay import reserve

    peer = Peer()
    if relay:
        assert check_reachability_sync(peer, [relay]).reachable is False, "a peer behind the NAT must be unreachable"
        peer.runtime.run(reserve(peer, relay), timeout=60)
    service = AllReduceService(peer)
    print("ADDRESS", peer.address, flush=True)
    plan = json.loads(sys.stdin.readline())
    members = tuple(GroupMember(PeerID.from_string(a.rsplit("/", 1)[1]), a) for a in plan["addresses"])
    codec = get_codec(plan["codec"])
    device = torch.device(plan.get("device", "cpu"))
    flat = torch.randn(plan["numel"], generator=torch.Generator().manual_seed(plan["rank"])).to(device)
    residual = torch.zeros_like(flat) if codec.supports_error_feedback else None
    barrier = torch.zeros(1)
    none = get_codec("none")

    def group(tag: str) -> GroupInfo:
        return GroupInfo(hashlib.sha256(tag.encode()).digest()[:16], members)

    async def one_round(tag: str) -> float:
        await run_allreduce(service, group(f"barrier-{tag}"), barrier, none, timeout=120)
        start = time.perf_counter()
        result = await run_allreduce(
            service, group(f"round-{tag}"), flat, codec, residual=residual, timeout=300, sender_timeout=120
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert not result.failed_parts, result.failed_parts
        return time.perf_counter() - start

    async def rounds() -> list[float]:
        return [await one_round(str(r)) for r in range(plan["rounds"] + 1)][1:]

    offered = peer.runtime.relay
    relayed_before = offered.relayed_bytes if offered else 0
    times = peer.runtime.run(rounds(), timeout=3600)
    result = {"times": times, "wire_bytes": _wire_bytes(codec, plan)}
    if offered:  # bytes both ways through our relay per round (the barriers' are negligible)
        result["relayed_bytes"] = (offered.relayed_bytes - relayed_before) / (len(times) + 1)
    if plan.get("profile"):  # one more round under the profiler: the host<->device copies it made
        result["host_copies"] = host_copies(lambda: peer.runtime.run(one_round("profiled"), timeout=600))
    print("RESULT", json.dumps(result), flush=True)
    sys.stdin.read()
    peer.shutdown()


def _wire_bytes(codec, plan) -> int:
    """Bytes this peer sends per round: its data for the others' parts plus the means it returns."""
    n, k = plan["numel"], len(plan["addresses"])
    others = n * (k - 1) // k
    return 2 * codec.payload_nbytes(others)


# ---------------------------------------------------------------- gloo worker


def gloo_worker(rank: int, world: int, store: str, numel: int, rounds: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(rounds + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        x /= world
        times.append(time.perf_counter() - start)
    print(
        "RESULT", json.dumps({"times": times[1:], "wire_bytes": 2 * x.numel() * 4 * (world - 1) // world}), flush=True
    )
    dist.destroy_process_group()


# ---------------------------------------------------------------- orchestration


def _spawn(
    *args: str, peers: int, rank: int, net: ShapedNetwork | WanNetwork | None, env: dict | None = None
) -> subprocess.Popen:
    """A worker process; peers on one host share its cores as `hiveengine launch` workers do (shared_host_defaults:
    oversubscribed OpenMP kernels run many times slower, and a peer polling UCX takes the core another peer needs,
    where on separate machines it would take nobody's). With `net`, it runs in namespace `rank`."""
    from hiveengine.cli.launch import shared_host_defaults

    env = {**shared_host_defaults(peers, os.environ), **os.environ, **(env or {})}
    argv = [sys.executable, __file__, *args]
    if net is not None:
        # TCP only: shared memory or direct copies between namespaces would bypass the shaped link.
        env.update(
            UCX_TLS="tcp,self",
            HIVEENGINE_LOCAL_COPY="0",
            HIVEENGINE_ANNOUNCE_HOST=net.host(rank),
            GLOO_SOCKET_IFNAME=INNER_IFACE,
        )
        argv = net.command(rank, argv)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def run_hive(
    peers: int,
    numel: int,
    codec: str,
    rounds: int,
    net: ShapedNetwork | WanNetwork | None,
    relay_mbps: float = 0,
    device: str = "cpu",
    profile: bool = False,
) -> dict:
    """Our all-reduce of buffers on `device`; in a WanNetwork with firewalled peers, peer 0 relays for them (at
    most `relay_mbps`). With `profile`, each peer runs one more round under the torch profiler and reports its
    host<->device copies (the list of their byte counts)."""
    hidden = set(getattr(net, "firewalled", ()))
    relay_env = {"HIVEENGINE_RELAY": "1", "HIVEENGINE_RELAY_MBPS": str(relay_mbps)} if hidden else {}
    procs = [_spawn("--role", "hive", peers=peers, rank=0, net=net, env=relay_env)]
    try:
        addresses = [read_prefixed(procs[0], "ADDRESS", LINE_TIMEOUT)]
        for r in range(1, peers):
            relay = ["--relay", addresses[0]] if r in hidden else []
            procs.append(_spawn("--role", "hive", *relay, peers=peers, rank=r, net=net))
        addresses += [read_prefixed(p, "ADDRESS", LINE_TIMEOUT) for p in procs[1:]]
        for rank, proc in enumerate(procs):
            plan = {
                "addresses": addresses,
                "codec": codec,
                "numel": numel,
                "rank": rank,
                "rounds": rounds,
                "device": device,
                "profile": profile,
            }
            proc.stdin.write(json.dumps(plan) + "\n")
            proc.stdin.flush()
        return _combine([json.loads(read_prefixed(p, "RESULT", LINE_TIMEOUT)) for p in procs])
    finally:
        for p in procs:
            p.kill()


def run_gloo(peers: int, numel: int, rounds: int, net: ShapedNetwork | WanNetwork | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            _spawn(
                "--role",
                "gloo",
                "--rank",
                str(r),
                "--world",
                str(peers),
                "--store",
                store,
                "--numel",
                str(numel),
                "--rounds",
                str(rounds),
                peers=peers,
                rank=r,
                net=net,
            )
            for r in range(peers)
        ]
        try:
            return _combine([json.loads(read_prefixed(p, "RESULT", LINE_TIMEOUT)) for p in procs])
        finally:
            for p in procs:
                p.kill()


def run_hivemind(peers: int, numel: int, codec: str, rounds: int) -> dict:
    """hivemind's DecentralizedAverager, timing its all-reduce alone: each round, every peer forms its group
    and reports READY, then all start together (our rounds and gloo's also start from a formed group)."""
    worker = str(Path(__file__).resolve().parent / "hivemind_worker.py")
    python = hivemind_python()
    procs = []
    try:
        initial: list[str] = []
        for rank in range(peers):
            # Own session: hivemind starts an averager process and a p2pd daemon that must go with it.
            proc = subprocess.Popen(
                [python, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
            )
            procs.append(proc)
            plan = {"initial_peers": initial, "numel": numel, "peers": peers, "rounds": rounds, "rank": rank}
            proc.stdin.write(json.dumps({**plan, "compression": HIVEMIND_CODECS[codec]}) + "\n")
            proc.stdin.flush()
            maddrs = json.loads(read_prefixed(proc, "MADDRS", LINE_TIMEOUT))
            initial = initial or maddrs
        for _ in range(rounds + 1):
            for proc in procs:
                read_prefixed(proc, "READY", LINE_TIMEOUT)
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
        results = [json.loads(read_prefixed(p, "RESULT", LINE_TIMEOUT)) for p in procs]
        for r in results:
            r["wire_bytes"] = None
        return _combine(results)
    finally:
        for p in procs:
            kill_worker(p)


def _combine(results: list[dict]) -> dict:
    per_round = [max(r["times"][i] for r in results) for i in range(len(results[0]["times"]))]
    combined = {"seconds": statistics.median(per_round), "rounds": per_round, "wire_bytes": results[0]["wire_bytes"]}
    if "relayed_bytes" in results[0]:
        combined["relay_mbps"] = results[0]["relayed_bytes"] * 8 / 1e6 / combined["seconds"]
    if "host_copies" in results[0]:
        combined["host_copies"] = [r["host_copies"] for r in results]
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["hive", "gloo"])
    parser.add_argument("--relay", help=argparse.SUPPRESS)  # a worker behind a NAT: the relay to reserve with
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--store", help="file for the gloo rendezvous")
    parser.add_argument("--numel", type=int)
    parser.add_argument("--peers", type=int, nargs="+", default=PEERS)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="fp32 elements")
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--compare", choices=["hivemind"], help="also run hivemind (in its own venv)")
    parser.add_argument(
        "--wan",
        metavar="PROFILE",
        help="run each peer in its own namespace behind an emulated WAN link (tools/wanlink.py), e.g. "
        "100mbit-50ms, 1gbit-20ms, 1gbit-20ms-1pct-loss (round trip and loss between two peers; root)",
    )
    parser.add_argument(
        "--nat",
        type=int,
        default=0,
        metavar="N",
        help="with --wan: the last N peers accept no incoming connection (as behind a NAT) and reserve with a relay "
        "on peer 0; gloo cannot run then",
    )
    parser.add_argument("--relay-mbps", type=float, default=100.0, help="with --nat: the relay's bandwidth cap")
    parser.add_argument(
        "--netns",
        metavar="RATE",
        help="run each peer in its own network namespace on a link shaped to RATE (e.g. 1gbit; root)",
    )
    args = parser.parse_args(argv)
    if args.role == "hive":
        hive_worker(args.relay)
        return 0
    if args.role == "gloo":
        gloo_worker(args.rank, args.world, args.store, args.numel, args.rounds)
        return 0

    if (args.netns or args.wan) and args.compare:
        parser.error("--compare runs hivemind on loopback only: use it without --netns or --wan")
    if args.nat and not args.wan:
        parser.error("--nat needs --wan")
    if args.netns and args.wan:
        parser.error("choose one of --netns (a shaped link) and --wan (delay and loss too)")
    if args.nat and not nat_available():
        print("--nat needs root, ip, tc and iptables; skipping the run", file=sys.stderr)
        return 0
    if (args.netns or args.wan) and not netns_available():
        print("--netns needs root, ip and tc; skipping the shaped-link run", file=sys.stderr)
        return 0
    rows, records = [], []
    for peers in args.peers:
        with _network(args, peers) as net:
            measure_peers(args, peers, net, rows, records)
    columns = ["peers", "mbytes", "system", "s/round", "algbw_gbs", "wire MB/peer", "vs_gloo"]
    columns += ["link use"] if args.wan or args.netns else []
    columns += ["relay_mbps"] if args.nat else []
    print(format_table(rows, columns))
    print("vs_gloo > 1 means faster than gloo; every system's rounds start from a formed group")
    link = f"{args.wan}-nat{args.nat}" if args.nat else args.wan or args.netns
    name = f"allreduce-{link}" if link else "allreduce"
    path = write_results(f"{name}-vs-hivemind" if args.compare else name, {"records": records})
    print(f"wrote {path}")
    return 0


def _network(args, peers: int):
    """The network the peers run in: a WAN emulation, a shaped link, or none (loopback)."""
    if args.wan:
        return WanNetwork(peers, args.wan, firewalled=range(peers - args.nat, peers))
    return ShapedNetwork(peers, args.netns) if args.netns else contextlib.nullcontext()


def measure_peers(args, peers: int, net: ShapedNetwork | WanNetwork | None, rows: list, records: list) -> None:
    """Every size and system for one group size, appending table rows and JSON records."""
    from tools.wanlink import Profile

    link = args.wan or args.netns
    rate = Profile.parse(link).rate if link else None  # bytes per second each way
    for numel in args.sizes:
        configs, gloo = [], None
        if not args.nat:  # gloo dials every peer: it cannot run with peers behind a NAT
            print(f"measuring gloo, {peers} peers, {numel * 4 // MiB} MB ...", file=sys.stderr, flush=True)
            gloo = run_gloo(peers, numel, args.rounds, net)
            configs.append(("gloo", gloo))
        for codec in args.codecs:
            print(f"measuring hiveengine {codec}, {peers} peers ...", file=sys.stderr, flush=True)
            hive = run_hive(peers, numel, codec, args.rounds, net, args.relay_mbps)
            configs.append((f"hiveengine {codec}", hive))
        if args.compare == "hivemind":
            for codec in [c for c in args.codecs if c in HIVEMIND_CODECS]:
                print(f"measuring hivemind {codec}, {peers} peers ...", file=sys.stderr, flush=True)
                try:
                    configs.append((f"hivemind {codec}", run_hivemind(peers, numel, codec, args.rounds)))
                except RuntimeError as e:  # hivemind's own matchmaking sometimes never forms the group
                    print(f"hivemind {codec}, {peers} peers did not finish: {e}", file=sys.stderr, flush=True)
                    records.append(
                        {"peers": peers, "mbytes": numel * 4 // MiB, "system": f"hivemind {codec}", "error": str(e)}
                    )
        for name, r in configs:
            record = {
                "peers": peers,
                "mbytes": numel * 4 // MiB,
                "system": name,
                "link": args.wan or args.netns or "loopback",
                "behind_nat": args.nat,
                **r,
            }
            record["algbw_gbs"] = numel * 4 / r["seconds"] / 1e9
            record["vs_gloo"] = gloo["seconds"] / r["seconds"] if gloo else None
            records.append(record)
            wire = None if r["wire_bytes"] is None else r["wire_bytes"] / 1e6
            if rate is not None and r["wire_bytes"] is not None:  # what each peer sent, of what its link carries
                record["link_use"] = r["wire_bytes"] / r["seconds"] / rate
            rows.append({**record, "wire MB/peer": wire, "s/round": r["seconds"], "link use": record.get("link_use")})


if __name__ == "__main__":
    sys.exit(main())
