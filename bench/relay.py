"""Relay benchmark (issue 18): what a peer behind a NAT gets through a relay, against the relay's cap.

Four peers in network namespaces behind emulated WAN links (tools/netns.WanNetwork, root): peer 0 is public and
relays (at most `--relay-mbps` over all its circuits); peers 1 and 2 accept no incoming connection (as behind a
NAT), and peer 2 reserves a slot with the relay; peer 3 is public. Peer 1 sends SIZE-byte messages, one at a time
and each acknowledged, to peer 2's relayed address and, as the reference of what the links allow, to peer 3
directly. The table shows the throughput, the share of the relay's cap that relayed transfers reach (the issue's
goal: at least 70%), and the direct transfers. Writes bench/results/local/relay.json.
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
from bench.common import format_table, read_prefixed, write_results
from tools.netns import WanNetwork, nat_available

MiB = 1 << 20
SIZES = [4 * MiB, 16 * MiB]
SECONDS_PER_SIZE = 5.0  # repeat each size for about this long (at least 3 times)
LINE_TIMEOUT = 120.0
CALL_TIMEOUT = 120.0
RELAY, SENDER, HIDDEN_SINK, PUBLIC_SINK = 0, 1, 2, 3


def peer_role(role: str, relay: str | None) -> None:
    """One peer: `relay` (its Peer relays, from the environment), `sink` (reserves with `relay` when given) or
    `send` (reads the targets from stdin and times transfers to each)."""
    from hiveengine.transport import Peer
    from hiveengine.transport.reachability import check_reachability_sync
    from hiveengine.transport.relay import reserve

    peer = Peer()
    if relay:
        assert check_reachability_sync(peer, [relay]).reachable is False, "a peer behind the NAT must be unreachable"
    if role == "sink" and relay:
        peer.runtime.run(reserve(peer, relay), timeout=60)

    async def sink(request) -> dict:
        return {"bytes": sum(t.numel() * t.element_size() for t in request.tensors)}

    peer.register("sink", sink)
    print("ADDRESS", peer.address, flush=True)
    if role == "send":
        targets = json.loads(sys.stdin.readline())
        print("RESULT", json.dumps({name: send_to(peer, address) for name, address in targets.items()}), flush=True)
    sys.stdin.readline()  # until the orchestrator is done
    peer.shutdown()


def send_to(peer, address: str) -> dict:
    """{size: bytes/s} of acknowledged transfers of each size to `address` (median after a warm-up)."""
    result = {}
    for size in SIZES:
        payload = torch.randint(0, 255, (size,), dtype=torch.uint8)
        peer.call_sync(address, "sink", {}, [payload], timeout=CALL_TIMEOUT)  # warm-up (and the dial)
        times, start = [], time.monotonic()
        while len(times) < 3 or time.monotonic() - start < SECONDS_PER_SIZE:
            began = time.perf_counter()
            peer.call_sync(address, "sink", {}, [payload], timeout=CALL_TIMEOUT)
            times.append(time.perf_counter() - began)
        result[size] = size / statistics.median(times)
    return result


def run(profile: str, relay_mbps: float) -> list[dict]:
    """One measurement in a fresh WanNetwork: rows for the relayed and the direct transfers."""
    procs: list[subprocess.Popen] = []
    with WanNetwork(4, profile, firewalled=(SENDER, HIDDEN_SINK)) as net:

        def spawn(rank: int, *args: str, env: dict | None = None) -> subprocess.Popen:
            env = {**os.environ, "UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", **(env or {})}
            env["HIVEENGINE_ANNOUNCE_HOST"] = net.host(rank)
            argv = net.command(rank, [sys.executable, __file__, *args])
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
            return procs[-1]

        try:
            relay_env = {"HIVEENGINE_RELAY": "1", "HIVEENGINE_RELAY_MBPS": str(relay_mbps)}
            relay = read_prefixed(spawn(RELAY, "--role", "relay", env=relay_env), "ADDRESS", LINE_TIMEOUT)
            hidden = read_prefixed(spawn(HIDDEN_SINK, "--role", "sink", "--relay", relay), "ADDRESS", LINE_TIMEOUT)
            public = read_prefixed(spawn(PUBLIC_SINK, "--role", "sink"), "ADDRESS", LINE_TIMEOUT)
            sender = spawn(SENDER, "--role", "send", "--relay", relay)
            read_prefixed(sender, "ADDRESS", LINE_TIMEOUT)
            sender.stdin.write(json.dumps({"relayed": hidden, "direct": public}) + "\n")
            sender.stdin.flush()
            result = json.loads(read_prefixed(sender, "RESULT", LINE_TIMEOUT + len(SIZES) * 4 * CALL_TIMEOUT))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
    cap = relay_mbps * 1e6 / 8
    rows = []
    for path, speeds in result.items():
        for size, speed in speeds.items():
            row = {"link": profile, "path": path, "relay_mbps": relay_mbps, "MiB": int(size) // MiB}
            row["mbit_s"] = round(speed * 8 / 1e6, 1)
            row["vs_relay_cap"] = round(speed / cap, 3) if path == "relayed" else None
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wan", default="1gbit-20ms", metavar="PROFILE", help="the links (tools/wanlink.py)")
    parser.add_argument("--relay-mbps", type=float, nargs="+", default=[50.0, 100.0], help="relay caps to measure")
    parser.add_argument("--role", choices=["relay", "sink", "send"], help=argparse.SUPPRESS)  # a peer process
    parser.add_argument("--relay", help=argparse.SUPPRESS)  # a peer behind the NAT: the relay's address
    args = parser.parse_args(argv)
    if args.role:
        peer_role(args.role, args.relay)
        return 0
    if not nat_available():
        raise SystemExit("bench/relay.py needs root, `ip netns` and iptables (apt-get install iptables)")
    rows = [row for mbps in args.relay_mbps for row in run(args.wan, mbps)]
    print(format_table(rows, list(rows[0])))
    write_results("relay", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
