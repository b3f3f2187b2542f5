"""A hostile expert client for tests/test_moe_defense.py: sends what an attacker would to a real expert server, or
forges expert declarations in the DHT, and prints what happened as `RESULT name value` lines.

Usage: moe_hostile.py ACTION ADDRESS UID HIDDEN [options]; see `main` for the actions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import torch

from hiveengine.dht import DHT, Record, get_dht_time
from hiveengine.dht.validation import signed_message
from hiveengine.moe.declarations import expert_key
from hiveengine.moe.protocol import BACKWARD, FORWARD, FORWARD_ID
from hiveengine.transport import Identity, Peer, PeerAddress

CALL_TIMEOUT = 60.0
FORGED_TTL = 300.0  # seconds forged records live: longer than the honest server's declarations


def report(name: str, value: object) -> None:
    print("RESULT", name, value, flush=True)


def outcome(peer: Peer, address: str, method: str, header: dict, tensors: list[torch.Tensor]) -> str:
    """'ok', or the class name of the error the call raised."""
    try:
        peer.call_sync(address, method, header, tensors, timeout=CALL_TIMEOUT)
        return "ok"
    except Exception as e:
        return type(e).__name__


def nonfinite(peer: Peer, args) -> None:
    """NaN/Inf inputs and gradients, then gradients so large that the parameters' gradients overflow."""
    x = torch.randn(4, args.hidden)
    nan = torch.full((4, args.hidden), float("nan"))
    inf = x.clone()
    inf[0, 0] = float("inf")
    header = {"uid": args.uid}
    report("nan_forward", outcome(peer, args.address, FORWARD, header, [nan]))
    report("nan_backward", outcome(peer, args.address, BACKWARD, header, [x, nan]))
    report("inf_backward", outcome(peer, args.address, BACKWARD, header, [inf, x]))
    report("overflow_backward", outcome(peer, args.address, BACKWARD, header, [x * 1e6, torch.full_like(x, 3e38)]))


def long(peer: Peer, args) -> None:
    """One sample that is a sequence of --rows positions (a transformer expert's quadratic cost)."""
    row = torch.randn(1, args.rows, args.hidden)
    report("long_forward", outcome(peer, args.address, FORWARD, {"uid": args.uid}, [row]))


def scaled(peer: Peer, args) -> None:
    """One backward call with finite gradients scaled by --scale."""
    x = torch.randn(4, args.hidden)
    grads = torch.randn(4, args.hidden) * args.scale
    report("scaled_backward", outcome(peer, args.address, BACKWARD, {"uid": args.uid}, [x, grads]))


def flood(peer: Peer, args) -> None:
    """A request over the server's byte limit, then --count concurrent requests of --rows rows; reports once
    the first reply is back (so every request has reached the server) and when all are done."""
    huge = torch.randn(args.huge_bytes // (4 * args.hidden), args.hidden)
    report("huge", outcome(peer, args.address, FORWARD, {"uid": args.uid}, [huge]))

    async def run() -> list:
        calls = [
            asyncio.ensure_future(
                peer.call(args.address, FORWARD, {"uid": args.uid}, [torch.randn(args.rows, args.hidden)], timeout=120)
            )
            for _ in range(args.count)
        ]
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        report("loaded", time.time())
        return await asyncio.gather(*calls, return_exceptions=True)

    results = peer.runtime.run(run(), 180)
    report("flood_ok", sum(not isinstance(r, BaseException) for r in results))
    report("flood_done", time.time())


def burst(peer: Peer, args) -> None:
    """--count concurrent requests of --rows rows at once: more bytes than the server lets one client hold."""

    async def run() -> list:
        x = torch.randn(args.rows, args.hidden)
        calls = [peer.call(args.address, FORWARD, {"uid": args.uid}, [x], timeout=120) for _ in range(args.count)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = peer.runtime.run(run(), 180)
    report("burst_ok", sum(not isinstance(r, BaseException) for r in results))
    report("burst_refused", sorted({type(r).__name__ for r in results if isinstance(r, BaseException)}))


def keep(peer: Peer, args) -> None:
    """--count forward calls that name a forward id (the server keeps their activations) and no backward."""
    for fid in range(args.count):
        header = {"uid": args.uid, FORWARD_ID: fid}
        peer.call_sync(args.address, FORWARD, header, [torch.randn(args.rows, args.hidden)], timeout=CALL_TIMEOUT)
    report("kept_sent", args.count)


def forge(dht: DHT, args) -> None:
    """Declarations of `uid` that a reader must not believe: a record signed by this process that claims the
    victim's address (under the uid's key, and under its grid prefix's for a coordinate the victim does not serve);
    an unsigned prefix entry; and records under the victim's owner marker (read from its declaration) with a valid
    signature by another key."""
    victim = PeerAddress.parse(args.address)
    mine = str(PeerAddress(victim.host, victim.port + 1, dht.peer_id))
    expiration = get_dht_time() + FORGED_TTL
    key, prefix = expert_key(args.uid), expert_key(args.uid.rsplit(".", 1)[0] + ".")
    declared = dht.get(key, latest=True)
    victim_marker = next(s for s, item in declared.value.items() if item.value == args.address)  # public: it is read
    own_marker = dht.owner_marker
    report("claims_victim_address", dht.store(key, args.address, expiration, subkey=own_marker))
    report("prefix_claims_victim_address", dht.store(prefix, args.address, expiration, subkey=(1, own_marker)))
    report("prefix_unsigned", dht.store(prefix, mine, expiration, subkey=1))
    impostor = Identity.generate()
    forgeries = {"victim_marker": (key, victim_marker), "prefix_victim": (prefix, (1, victim_marker))}
    for name, (key, subkey) in forgeries.items():
        record = dht.make_record(key, mine, expiration, subkey)
        signature = impostor.sign(signed_message(record))  # a valid signature, by another key than the marker's
        forged = Record(record.key, record.subkey, record.value, record.expiration_time, signature)
        report(name, dht.peer.runtime.run(dht.node.store([forged]), CALL_TIMEOUT)[0])


def squat(dht: DHT, args) -> None:
    """Plain values under the uid and its grid prefix, pointing at this process."""
    victim = PeerAddress.parse(args.address)
    mine = str(PeerAddress(victim.host, victim.port + 1, dht.peer_id))
    expiration = get_dht_time() + FORGED_TTL
    report("plain", dht.store(expert_key(args.uid), mine, expiration))
    report("prefix_plain", dht.store(expert_key(args.uid.rsplit(".", 1)[0] + "."), mine, expiration))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["nonfinite", "long", "scaled", "flood", "burst", "keep", "forge", "squat"])
    parser.add_argument("address", help="the server's address (forge: the victim's)")
    parser.add_argument("uid")
    parser.add_argument("hidden", type=int)
    parser.add_argument("--scale", type=float, default=1e6)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--huge-bytes", type=int, default=16 << 20)
    parser.add_argument("--dht", default=None, help="forge: a DHT node to join")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tensors sent (tests replay them locally)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.action in ("forge", "squat"):
        dht = DHT(initial_peers=[args.dht])
        try:
            (forge if args.action == "forge" else squat)(dht, args)
        finally:
            dht.shutdown()
    else:
        peer = Peer()
        actions = {"nonfinite": nonfinite, "long": long, "scaled": scaled, "flood": flood, "burst": burst, "keep": keep}
        actions[args.action](peer, args)
        peer.shutdown()
    report("exit", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
