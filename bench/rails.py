"""Rails benchmark (issue 18): how much a TCP wire's extra connections (rails.py) carry over long, lossy links.

Two peers in network namespaces behind emulated WAN links (tools/netns.WanNetwork, root). Peer 0 dials peer 1 over a
TCP wire (HIVEENGINE_LINK=tcp, as a peer behind a NAT does) and sends SIZE bytes as one acknowledged call of 4 MiB
frames (as an all-reduce sends its chunks), with 0 rails (one socket) and with each `--rails` count, in one run.
Plain sockets on the same links give the reference: SIZE bytes over one TCP connection, and split over as many as
the most rails. Reports MB/s and the ratio to one socket. Writes bench/results/local/rails.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, read_prefixed, write_results
from tools.netns import WanNetwork, available

MiB = 1 << 20
FRAME_BYTES = 4 * MiB
RAW_PORT = 29411
LINE_TIMEOUT = 120.0
CALL_TIMEOUT = 300.0
SENDER, SINK = 0, 1


def sink_role() -> None:
    """Peer 1: acknowledges what it is sent, and accepts raw TCP streams on RAW_PORT for the reference rows."""
    from hiveengine.transport import Peer

    peer = Peer()

    async def sink(request) -> dict:
        return {"bytes": sum(t.numel() * t.element_size() for t in request.tensors)}

    peer.register("sink", sink)
    listener = socket.create_server(("0.0.0.0", RAW_PORT), backlog=128)
    threading.Thread(target=_raw_sink, args=(listener,), daemon=True).start()
    print("ADDRESS", peer.address, flush=True)
    sys.stdin.readline()  # until the orchestrator is done
    peer.shutdown()


def _raw_sink(listener: socket.socket) -> None:
    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(MiB):
                pass
            conn.sendall(b"k")

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def send_role(address: str, size: int, repeats: int) -> None:
    """Peer 0: the median seconds of `repeats` acknowledged calls of `size` bytes to `address`, after a warm-up
    call that opens the link and its rails."""
    from hiveengine.transport import Peer

    peer = Peer()
    frames = [torch.randint(0, 255, (FRAME_BYTES,), dtype=torch.uint8) for _ in range(size // FRAME_BYTES)]
    peer.call_sync(address, "sink", {}, frames, timeout=CALL_TIMEOUT)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        peer.call_sync(address, "sink", {}, frames, timeout=CALL_TIMEOUT)
        times.append(time.perf_counter() - began)
    rails = len(peer.pool.connections[next(iter(peer.pool.connections))].wire.rails)
    print("RESULT", statistics.median(times), rails, flush=True)
    peer.shutdown()


def raw_role(host: str, size: int, streams: int, repeats: int) -> None:
    """The median seconds of `repeats` sends of `size` bytes split over `streams` fresh TCP connections."""
    payload = memoryview(bytes(size // streams))

    def one() -> None:
        with socket.create_connection((host, RAW_PORT), timeout=CALL_TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)

    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        threads = [threading.Thread(target=one) for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - began)
    print("RESULT", statistics.median(times), streams, flush=True)


def run(profile: str, size: int, rails: list[int], repeats: int) -> list[dict]:
    """Every configuration over one WanNetwork with `profile`."""
    rows = []
    with WanNetwork(2, profile) as net:

        def spawn(rank: int, *args: str, env: dict | None = None) -> subprocess.Popen:
            env = {**os.environ, "UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", **(env or {})}
            env["HIVEENGINE_ANNOUNCE_HOST"] = net.host(rank)
            argv = net.command(rank, [sys.executable, __file__, *args])
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

        sink = spawn(SINK, "--role", "sink", env={"HIVEENGINE_TCP_RAILS": str(max(rails))})
        try:
            address = read_prefixed(sink, "ADDRESS", LINE_TIMEOUT)
            common = ["--size", str(size), "--repeats", str(repeats)]
            configs = [("hiveengine tcp wire", n, ["--role", "send", "--address", address]) for n in rails]
            configs += [("raw tcp", n, ["--role", "raw", "--address", net.host(SINK)]) for n in (1, max(rails))]
            for system, count, args in configs:
                env = {"HIVEENGINE_LINK": "tcp", "HIVEENGINE_TCP_RAILS": str(count)}
                proc = spawn(SENDER, *args, *common, "--streams", str(count), env=env)
                seconds, used = read_prefixed(proc, "RESULT", LINE_TIMEOUT + (repeats + 1) * CALL_TIMEOUT).split()
                proc.wait(30)
                label = "rails" if system.startswith("hiveengine") else "streams"
                rows.append(
                    {"link": profile, "system": system, label: int(used), "seconds": float(seconds)}
                    | {"MB_s": round(size / float(seconds) / 1e6, 1)}
                )
        finally:
            sink.kill()
            sink.wait(10)
    for row in rows:
        one = next(r for r in rows if r["system"] == row["system"] and r.get("rails", r.get("streams")) in (0, 1))
        row["vs_one_socket"] = round(one["seconds"] / row["seconds"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wan", nargs="+", default=["1gbit-20ms", "1gbit-100ms-2pct-loss"], metavar="PROFILE")
    parser.add_argument("--size-mib", type=int, default=64, help="bytes per call, in MiB (a multiple of 4)")
    parser.add_argument("--rails", type=int, nargs="+", default=[0, 4, 8], help="rail counts to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--role", choices=["sink", "send", "raw"], help=argparse.SUPPRESS)  # a peer process
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "sink":
        sink_role()
    elif args.role == "send":
        send_role(args.address, args.size, args.repeats)
    elif args.role == "raw":
        raw_role(args.address, args.size, args.streams, args.repeats)
    else:
        if not available():
            raise SystemExit("bench/rails.py needs root and `ip netns`")
        if args.size_mib % 4 or 0 not in args.rails:
            parser.error("--size-mib must be a multiple of 4, and --rails must include 0 (the reference)")
        rows = [row for profile in args.wan for row in run(profile, args.size_mib * MiB, args.rails, args.repeats)]
        print(format_table(rows, ["link", "system", "rails", "streams", "seconds", "MB_s", "vs_one_socket"]))
        write_results("rails", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
