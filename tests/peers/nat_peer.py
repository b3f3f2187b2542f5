"""A peer process for the NAT rig tests: `serve` answers echo and dial-on-request; `ping`, `call`, `bulk` (large
echoes, and the rails they opened) and `upgrade` (a call through a relay, whether the link became direct, and a
second call) report JSON."""

import json
import sys
import threading
import time

import torch

from hiveengine.errors import HiveEngineError
from hiveengine.transport import Peer, PeerAddress
from hiveengine.transport.reachability import check_reachability_sync
from hiveengine.transport.relay import reserve


async def echo(request):
    return request.header, request.tensors


def dialer(peer: Peer):
    async def dial(request):
        """Call echo on the address in the header: what a peer asked to dial an unreachable address costs."""
        start = time.monotonic()
        try:
            await peer.call(request.header["address"], "echo", {}, timeout=float(request.header["timeout"]))
            error = None
        except HiveEngineError as e:
            error = type(e).__name__
        return {"error": error, "seconds": time.monotonic() - start}

    return dial


def serve(peer: Peer) -> None:
    peer.register("echo", echo)
    peer.register("dial", dialer(peer))
    print("ADDRESS", peer.address, flush=True)
    sys.stdin.read()


def ping(peer: Peer, address: str, seconds: float) -> None:
    """Echo calls back to back for `seconds`: the slowest answer and the failures."""

    async def run() -> dict:
        latencies, failures, outcomes = [], [], []
        await peer.call(address, "echo", {}, timeout=10)
        print("PINGING", flush=True)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                await peer.call(address, "echo", {}, timeout=5)
                latencies.append(time.monotonic() - start)
                outcomes.append(True)
            except HiveEngineError as e:
                failures.append(type(e).__name__)
                outcomes.append(False)
        last = outcomes[-3:]
        return {"calls": len(latencies), "max": max(latencies, default=None), "failures": failures, "recovered": last}

    print("RESULT", json.dumps(peer.runtime.run(run(), timeout=seconds + 30)), flush=True)


def join(peer: Peer, address: str) -> None:
    """Serve like `serve`, after one echo call to `address` (which opens our link to it)."""
    call(peer, address, 20)
    serve(peer)


def relayed(peer: Peer, relay: str) -> None:
    """Reserve a slot with the relay at `relay`, then serve at the relayed address."""
    peer.runtime.run(reserve(peer, relay), timeout=30)
    serve(peer)


def upgrade(peer: Peer, address: str) -> None:
    """Call echo at a relayed `address` and report whether our link to it became direct; after a line on stdin
    (the test killed the relay meanwhile), call again and report."""
    call(peer, address, 20)
    direct = peer.runtime.run(peer.pool.upgraded(PeerAddress.parse(address).peer_id), timeout=30)
    print("UPGRADED", json.dumps(direct), flush=True)
    sys.stdin.readline()
    call(peer, address, 20)


def check(peer: Peer, address: str) -> None:
    """Ask the peer at `address` to dial us back; print the verdict and which wire we now dial it with."""
    found = check_reachability_sync(peer, [address], timeout=20)
    link = peer.pool.link_for(PeerAddress.parse(address))
    result = {"reachable": found.reachable, "reason": found.reason, "observed": found.observed_host, "link": link}
    print("RESULT", json.dumps(result), flush=True)


def ask_dial(peer: Peer, address: str, target: str, timeout: float) -> None:
    """Ask the peer at `address` to dial `target`; print what it reports."""
    header, _ = peer.call_sync(address, "dial", {"address": target, "timeout": timeout}, timeout=timeout + 10)
    print("RESULT", json.dumps(header), flush=True)


def call(peer: Peer, address: str, timeout: float) -> None:
    """One echo call with a tensor: whether it worked, the error, how long it took."""
    x = torch.arange(100_000, dtype=torch.float32)
    start = time.monotonic()
    try:
        _, (y,) = peer.call_sync(address, "echo", {"k": 1}, [x], timeout=timeout)
        result = {"ok": bool(torch.equal(x, y)), "error": None}
    except HiveEngineError as e:
        result = {"ok": False, "error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.monotonic() - start
    print("RESULT", json.dumps(result), flush=True)


def bulk(peer: Peer, address: str) -> None:
    """Echo 3 frames of 4 MiB a few times, until our link has its rails (rails.py); report what each carried."""
    frames = [torch.randn(1 << 20) for _ in range(3)]
    wire = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, echoed = peer.call_sync(address, "echo", {}, frames, timeout=30)
        assert all(torch.equal(a, b) for a, b in zip(frames, echoed, strict=True))
        wire = peer.pool.connections[PeerAddress.parse(address).peer_id].wire
        if len(wire.rails) == peer.limits.tcp_rails and min(wire.rails) > 0:
            break
    print("RESULT", json.dumps({"kind": wire.kind, "rails": wire.rails}), flush=True)


if __name__ == "__main__":
    threading.current_thread().name = "peer-main"
    main_peer = Peer()
    mode = sys.argv[1]
    if mode == "serve":
        serve(main_peer)
    elif mode == "ping":
        ping(main_peer, sys.argv[2], float(sys.argv[3]))
    elif mode == "join":
        join(main_peer, sys.argv[2])
    elif mode == "relayed":
        relayed(main_peer, sys.argv[2])
    elif mode == "upgrade":
        upgrade(main_peer, sys.argv[2])
    elif mode == "check":
        check(main_peer, sys.argv[2])
    elif mode == "bulk":
        bulk(main_peer, sys.argv[2])
    elif mode == "ask-dial":
        ask_dial(main_peer, sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        call(main_peer, sys.argv[2], float(sys.argv[3]))
    main_peer.shutdown()
