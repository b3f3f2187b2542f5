"""`hiveengine peer serve|send` and `hiveengine demo`: run a peer, send it a tensor, or both at once."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

import torch

from hiveengine.cli.common import check_addresses
from hiveengine.transport import Peer
from hiveengine.transport.services import SINK_METHOD, serve_sink

DEMO_MIB = 64
SERVE_READY_PREFIX = "hiveengine peer listening at"
DEMO_START_TIMEOUT = 60.0


def add_commands(sub) -> None:
    peer = sub.add_parser("peer", help="run a transport peer or send one a tensor")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    serve = peer_sub.add_parser("serve", help="run a peer that receives tensors; prints its address")
    serve.add_argument("--port", type=int, default=None, help="listen port (default: any; env HIVEENGINE_PORT)")
    serve.set_defaults(handler=cmd_serve)
    send = peer_sub.add_parser("send", help="send a random tensor to a serving peer and check it arrived intact")
    send.add_argument("address", help="the peer's address, ucx://HOST:PORT/PEER_ID")
    send.add_argument("--mib", type=int, default=DEMO_MIB, help=f"tensor size in MiB (default {DEMO_MIB})")
    send.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up (default 120)")
    send.set_defaults(handler=cmd_send)
    demo = sub.add_parser("demo", help="start a second peer process and send it a tensor (the quick start)")
    demo.add_argument("--mib", type=int, default=DEMO_MIB, help=f"tensor size in MiB (default {DEMO_MIB})")
    demo.set_defaults(handler=cmd_demo)


def cmd_serve(args: argparse.Namespace) -> int:
    peer = Peer(port=args.port)
    serve_sink(peer)
    print(SERVE_READY_PREFIX, peer.address, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    peer.shutdown()
    return 0


def send_random_tensor(address: str, mib: int, timeout: float) -> bool:
    """Stream `mib` MiB of random floats to `address`'s sink; print what happened; True if intact."""
    peer = Peer()
    try:
        x = torch.randn(mib * (1 << 20) // 4)
        start = time.perf_counter()
        reply = peer.runtime.run(peer.send_tensor(address, SINK_METHOD, x, timeout=timeout), timeout)
        seconds = time.perf_counter() - start
        intact = reply["checksum"] == float(x.double().sum()) and reply["numel"] == x.numel()
        print(
            f"sent {x.numel() * 4 / 2**20:.0f} MiB to {address} in {seconds * 1e3:.1f} ms "
            f"({x.numel() * 4 / seconds / 1e9:.2f} GB/s, including the receiver's checksum); "
            f"checksum {'matches' if intact else 'DIFFERS'}"
        )
        return intact
    finally:
        peer.shutdown()


def cmd_send(args: argparse.Namespace) -> int:
    check_addresses([args.address], "ADDRESS")
    return 0 if send_random_tensor(args.address, args.mib, args.timeout) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "hiveengine.cli", "peer", "serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        address = _wait_for_address(server)
        print(f"started a peer in process {server.pid}: {address}")
        return 0 if send_random_tensor(address, args.mib, timeout=120) else 1
    finally:
        server.terminate()
        server.wait(10)


def _wait_for_address(server: subprocess.Popen) -> str:
    lines: list[str] = []

    def read() -> None:
        for line in server.stdout:
            lines.append(line)
            if line.startswith(SERVE_READY_PREFIX):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(DEMO_START_TIMEOUT)
    if not lines or not lines[-1].startswith(SERVE_READY_PREFIX):
        raise SystemExit(f"the peer process did not start within {DEMO_START_TIMEOUT} s (exit code {server.poll()})")
    return lines[-1][len(SERVE_READY_PREFIX) :].strip()
