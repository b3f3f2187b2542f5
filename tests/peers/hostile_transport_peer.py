"""A hostile peer for the transport security tests: it speaks the protocol by hand through a Peer's connection.

`python hostile_transport_peer.py local-copy VICTIM_ADDRESS VICTIM_SOCKET_HEX BYSTANDER_SOCKET_HEX SECRET_ADDRESS`
opens two connections to the victim, as two identities: the first offers the victim's own Unix socket as its
"same-host" proof (a reflection), the second the socket of a bystander process that holds no such session. It
prints `IDS <id1> <id2>` and waits for a line on stdin; then each connection claims, unproven, that it may be
read (LOCAL_READY) and sends an `echo` request whose one frame is announced by address at SECRET_ADDRESS (memory
of the victim). It prints one JSON line with what came back for each.
"""

import asyncio
import json
import sys
import threading

from hiveengine.transport import Peer, TransportLimits
from hiveengine.transport.wire import Kind

FRAME_BYTES = 4096


async def _attack(peer: Peer, address: str, offer: bytes, secret_address: int, go: asyncio.Event):
    conn = await peer.connect(address)
    conn.post_quietly({"k": Kind.LOCAL_OFFER, "i": 0, "u": offer})
    await go.wait()
    conn.post_quietly({"k": Kind.LOCAL_READY, "i": 0})
    request_id = conn.new_request_id()
    reply = conn.pending[request_id] = asyncio.get_running_loop().create_future()
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


if __name__ == "__main__":
    threading.current_thread().name = "hostile-main"
    if sys.argv[1] == "local-copy":
        local_copy_attack(sys.argv[2], bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4]), int(sys.argv[5]))
