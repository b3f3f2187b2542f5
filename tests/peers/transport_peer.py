"""A real peer process for the transport tests: `serve` prints its address and serves until killed or stdin closes."""

import asyncio
import json
import os
import sys
import threading
import time

import torch

from hiveengine.errors import RemoteError
from hiveengine.transport import Peer, PeerAddress, TransportLimits

MAX_FRAME_ENV = "TEST_MAX_FRAME_BYTES"


async def echo(request):
    return request.header, request.tensors


async def sleep(request):
    await asyncio.sleep(float(request.header["seconds"]))
    return {"slept": request.header["seconds"]}


async def fail(request):
    raise ValueError("boom: handler failed on purpose")


async def matmul(request):
    a = request.tensor(0, dtype=torch.float32, shape=(4, 4))
    b = request.tensor(1, dtype=torch.float32, shape=(4, 4))
    return {}, [a @ b]


async def sink(request):
    """Receive a streamed tensor chunk by chunk straight into one preallocated buffer."""
    total = int(request.header["numel"])
    dest = torch.empty(total, dtype=getattr(torch, request.header["dtype"]))
    announced = False
    async for chunk in request.chunks:
        offset = int(chunk.header["offset"])
        await chunk.read(out=dest[offset : offset + chunk.spec.numel])
        if not announced:
            print("FIRST_CHUNK", flush=True)
            announced = True
        if request.header.get("chunk_delay"):
            await asyncio.sleep(float(request.header["chunk_delay"]))
    return {"sum": float(dest.double().sum()), "numel": dest.numel()}


def serve() -> None:
    limits = TransportLimits(max_frame_bytes=int(os.environ.get(MAX_FRAME_ENV, TransportLimits.max_frame_bytes)))
    peer = Peer(limits=limits)
    for name, handler in [("echo", echo), ("sleep", sleep), ("fail", fail), ("matmul", matmul)]:
        peer.register(name, handler)

    async def round_trip(request):
        return {"rtt": peer.round_trip(request.sender)}

    peer.register("round_trip", round_trip)
    peer.register_stream("sink", sink)
    print("ADDRESS", peer.address, flush=True)
    name = peer.runtime.local_copy.name
    print("LOCAL_SOCKET", name.hex() if name else "-", flush=True)
    sys.stdin.read()  # serve until the test closes our stdin (or kills us)
    peer.shutdown()


def shut_down_on_request(keep_worker: str) -> None:
    """Serve until a line on stdin, shut the process's transport down and print SHUT, then exit after a second
    line. `keep_worker` "yes": hold the UCX worker past the shutdown, as an endpoint kept to the exit does."""
    peer = Peer()
    print("ADDRESS", peer.address, flush=True)
    sys.stdin.readline()
    held = peer.runtime.reactor.worker if keep_worker == "yes" else None
    peer.runtime.shutdown()
    print("SHUT", flush=True)
    sys.stdin.readline()
    print("BYE", held is not None, flush=True)


def client(address: str, timeout: str = "30") -> None:
    """Echo 4 MiB to `address`, stream it 4 MiB, and print what came back, and both sides' round trips, as JSON;
    each call within `timeout` seconds."""
    peer = Peer()
    seconds = float(timeout)
    x = torch.randn(1 << 20)
    header, (y,) = peer.call_sync(address, "echo", {"k": "v"}, [x], timeout=seconds)
    stream_reply = peer.runtime.run(
        peer.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}, timeout=seconds), seconds * 2
    )
    server_id = PeerAddress.parse(address).peer_id
    their_view, _ = peer.call_sync(address, "round_trip", timeout=seconds)
    result = {
        "rtt": peer.round_trip(server_id),
        "their_rtt": their_view["rtt"],
        "link": peer.pool.connections[server_id].kind,
        "echo_equal": bool(torch.equal(x, y)),
        "header": header,
        "sum_ok": stream_reply["sum"] == float(x.double().sum()),
    }
    print(json.dumps(result), flush=True)
    peer.shutdown()


def refused(address: str) -> None:
    """Send 1 MiB to a method `address` does not serve (it drops the frames), then echo 1 MiB on the same link;
    print whether the echo came back whole, and over which link, as JSON."""
    peer = Peer()
    x = torch.randn(1 << 18)
    refusal = None
    try:
        peer.call_sync(address, "no-such-method", {}, [x], timeout=120)
    except RemoteError as e:
        refusal = type(e).__name__
    _, (y,) = peer.call_sync(address, "echo", {}, [x], timeout=120)
    server_id = PeerAddress.parse(address).peer_id
    result = {"refusal": refusal, "echo_equal": bool(torch.equal(x, y)), "link": peer.pool.connections[server_id].kind}
    print(json.dumps(result), flush=True)
    peer.shutdown()


def dial(address: str) -> None:
    """Call `address` once; print how long it took and what it raised (null if nothing) as JSON."""
    peer = Peer()
    started = time.monotonic()
    try:
        peer.call_sync(address, "echo", {}, [torch.ones(4)], timeout=30)
        error = None
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e)}
    print(json.dumps({"error": error, "seconds": time.monotonic() - started}), flush=True)
    peer.shutdown()


def ping(address: str) -> None:
    """Only dial `address` and ask for its view of the round trip; print both sides' round trips as JSON."""
    peer = Peer()
    their_view, _ = peer.call_sync(address, "round_trip", timeout=60)
    server_id = PeerAddress.parse(address).peer_id
    result = {
        "rtt": peer.round_trip(server_id),
        "their_rtt": their_view["rtt"],
        "link": peer.pool.connections[server_id].kind,
    }
    print(json.dumps(result), flush=True)
    peer.shutdown()


if __name__ == "__main__":
    threading.current_thread().name = "peer-main"
    modes = {
        "serve": serve,
        "client": client,
        "ping": ping,
        "dial": dial,
        "refused": refused,
        "shut_down_on_request": shut_down_on_request,
    }
    modes[sys.argv[1]](*sys.argv[2:])
