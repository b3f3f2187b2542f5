"""A hostile peer for the transport security tests: it speaks the protocol by hand through a Peer's connection.

`python hostile_transport_peer.py local-copy VICTIM_ADDRESS VICTIM_SOCKET_HEX BYSTANDER_SOCKET_HEX SECRET_ADDRESS`
opens two connections to the victim, as two identities: the first offers the victim's own Unix socket as its
"same-host" proof (a reflection), the second the socket of a bystander process that holds no such session. It
prints `IDS <id1> <id2>` and waits for a line on stdin; then each connection claims, unproven, that it may be
read (LOCAL_READY) and sends an `echo` request whose one frame is announced by address at SECRET_ADDRESS (memory
of the victim). It prints one JSON line with what came back for each.

`python hostile_transport_peer.py flood MODE VICTIM_ADDRESS COUNT` floods the victim and prints `DONE <json>` (what
came back, by error kind), then holds its connections until stdin closes. Modes:
- phantom: COUNT requests that each announce a 256 MiB frame and never send it;
- discards: COUNT requests to an unknown method, each announcing 256 frames that never come;
- calls: COUNT concurrent calls of the victim's slow `gate` method;
- streams: COUNT concurrent `sink` streams that never end, and one announcing a 4 GiB tensor;
- identities: COUNT fresh identities that each call `echo` once and stay connected;
- unauthenticated: COUNT UCX connections that never start the handshake, and COUNT that stop after HELLO.
"""

import asyncio
import collections
import json
import os
import sys
import threading

import numpy as np
import torch

from hiveengine.transport import Identity, Peer, PeerAddress, Runtime, TransportLimits
from hiveengine.transport.handshake import NO_TARGET, Hello, _ephemeral
from hiveengine.transport.wire import Kind

FRAME_BYTES = 4096


async def _attack(peer: Peer, address: str, offer: bytes, secret_address: int, go: asyncio.Event):
    conn = await peer.connect(address)
    conn.post_quietly({"k": Kind.LOCAL_OFFER, "i": 0, "u": offer})
    await go.wait()
    conn.post_quietly({"k": Kind.LOCAL_READY, "i": 0})
    request_id = conn.new_request_id()
    reply = conn.expect_reply(request_id)
    body = {
        "k": Kind.REQUEST,
        "i": request_id,
        "m": "echo",
        "h": {},
        "d": 10,
        "f": [["uint8", [FRAME_BYTES], "cpu"]],
        "s": 0,
        "a": [secret_address],
    }
    conn.post_quietly(body)
    try:
        async with asyncio.timeout(20):
            _, tensors = await reply
        return {"tensors": [t.tolist() for t in tensors]}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}


def local_copy_attack(address: str, victim_socket: bytes, bystander_socket: bytes, secret_address: int) -> None:
    peers = [Peer(limits=TransportLimits(local_copy=False)) for _ in range(2)]
    runtime = peers[0].runtime
    go = runtime.run(_make_event(), 10)
    attacks = [
        runtime.submit(_attack(peer, address, offer, secret_address, go))
        for peer, offer in zip(peers, (victim_socket, bystander_socket), strict=True)
    ]
    print("IDS", *(peer.peer_id for peer in peers), flush=True)
    sys.stdin.readline()
    runtime.call_soon(go.set)
    print(json.dumps([attack.result(60) for attack in attacks]), flush=True)
    sys.stdin.read()
    for peer in peers:
        peer.shutdown()


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


def _kind(outcome) -> str:
    return type(outcome).__name__ if isinstance(outcome, BaseException) else "ok"


async def _raw_requests(peer: Peer, address: str, count: int, method: str, frames: list) -> dict:
    """`count` requests announcing `frames` (descriptors) whose frames are never sent; their outcomes by kind."""
    conn = await peer.connect(address)
    replies = []
    for _ in range(count):
        if conn.closed:
            break
        request_id = conn.new_request_id()
        reply = conn.expect_reply(request_id)
        body = {"k": Kind.REQUEST, "i": request_id, "m": method, "h": {}, "d": 60, "f": frames, "z": 1}
        body["s"] = conn._reserve_seqs(len(frames))
        conn.post_quietly(body)
        replies.append(reply)
    done, _ = await asyncio.wait(replies, timeout=5) if replies else (set(), set())
    kinds = collections.Counter(_kind(r.exception()) for r in done if not r.cancelled())
    return {"kinds": dict(kinds), "sent": len(replies), "unanswered": len(replies) - len(done), "closed": conn.closed}


async def _outcomes(coros, wait: float) -> dict:
    tasks = [asyncio.ensure_future(c) for c in coros]
    done, _ = await asyncio.wait(tasks, timeout=wait)
    kinds = collections.Counter(_kind(t.exception()) for t in done)
    return {"kinds": dict(kinds), "unanswered": len(tasks) - len(done), "tasks": tasks}


async def _never_ending():
    """A stream that never ends. A sender looks at the receiver's answer only between chunks, so a second chunk
    comes after a pause (the attacker's pace, not a synchronization): a refused stream learns it then."""
    yield {"offset": 0, "total": 4}, torch.ones(4)
    await asyncio.sleep(2)
    yield {"offset": 0, "total": 4}, torch.ones(4)
    await asyncio.Event().wait()


async def _unauthenticated(address: str, count: int) -> dict:
    runtime = Runtime.get()
    lib, target = runtime.reactor.lib, PeerAddress.parse(address)
    endpoints = []
    for i in range(2 * count):
        ep = lib.UCXEndpoint.create(runtime.reactor.worker, target.host, target.port, True)
        endpoints.append(ep)
        if i >= count:  # half of them send a HELLO and stop there
            hello = Hello(1, NO_TARGET, Identity.generate().public_key, os.urandom(32), _ephemeral()[1]).pack()
            runtime.reactor.stream_send(ep, np.frombuffer(hello, dtype=np.uint8).copy())
    _HELD.extend(endpoints)
    return {"opened": len(endpoints)}


_HELD: list = []


async def _flood(mode: str, address: str, count: int, peers: list[Peer]) -> dict:
    if mode == "unauthenticated":
        return await _unauthenticated(address, count)
    peer = peers[0]
    if mode == "phantom":
        return await _raw_requests(peer, address, count, "echo", [["uint8", [256 << 20], "cpu"]])
    if mode == "discards":
        return await _raw_requests(peer, address, count, "no-such-method", [["uint8", [65536], "cpu"]] * 256)
    if mode == "calls":
        result = await _outcomes((peer.call(address, "gate", {}, timeout=60) for _ in range(count)), wait=10)
        _HELD.append(result.pop("tasks"))
        return result
    if mode == "streams":
        huge_chunks = [({"offset": 0, "total": 1 << 30}, torch.ones(4))]
        huge = await _outcomes([peer.stream(address, "hiveengine.sink", huge_chunks, timeout=20)], wait=20)
        huge.pop("tasks")
        streams = [peer.stream(address, "hiveengine.sink", _never_ending(), timeout=60) for _ in range(count)]
        result = await _outcomes(streams, wait=8)
        _HELD.append(result.pop("tasks"))
        return {"huge": huge["kinds"], **result}
    if mode == "identities":
        result = await _outcomes((p.call(address, "echo", {}, timeout=30) for p in peers), wait=30)
        result.pop("tasks")
        return result
    raise SystemExit(f"unknown mode {mode}")


def flood(mode: str, address: str, count: int) -> None:
    runtime = Runtime.get()
    limits = TransportLimits(local_copy=False, max_connections=4 * count + 16)
    peers = [Peer(limits=limits) for _ in range(count if mode == "identities" else 1)]
    summary = runtime.run(_flood(mode, address, count, peers), 120)
    print("DONE", json.dumps(summary), flush=True)
    sys.stdin.read()
    os._exit(0)  # the victim must cope with a peer that vanishes without closing anything


if __name__ == "__main__":
    threading.current_thread().name = "hostile-main"
    if sys.argv[1] == "local-copy":
        local_copy_attack(sys.argv[2], bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "flood":
        flood(sys.argv[2], sys.argv[3], int(sys.argv[4]))
