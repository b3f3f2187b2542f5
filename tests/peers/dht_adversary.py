"""A process hosting adversarial DHT nodes whose ids are ground next to one key (a key-hiding attack).

Each node pays the proof of work for an id that shares --prefix-bits leading bits with the key's id, so the nodes
sit among the key's closest. They say yes to every store and keep nothing. A find for any other id gets an honest
answer (so they stay in everyone's routing tables); a find for the key is answered by --mode:
- empty: no contacts at all;
- sybil: only each other (pulling the lookup toward the adversaries);
- junk: forged contacts (a bait peer under unproven nonces, garbage entries) and records that do not verify;
- stall: no answer until the caller gives up.
Prints `ADDRESS <addr> <id nonce>` per node and `READY`; on a stdin line `bait` prints `BAIT <calls the bait peer got>`;
exits when stdin closes.
"""

import argparse
import asyncio
import sys

from hiveengine.dht import DHT, DHTConfig, protocol
from hiveengine.dht.ids import proven_id
from hiveengine.dht.routing import key_id
from hiveengine.dht.serialization import pack
from hiveengine.transport import Identity, Peer


def ground_nonce(identity: Identity, target: int, prefix_bits: int, difficulty: int) -> int:
    """A nonce proving an id for `identity` at `difficulty` whose top `prefix_bits` equal `target`'s."""
    nonce = 0
    while True:
        node = proven_id(identity.peer_id.raw, nonce, difficulty)
        if node is not None and (node ^ target) >> (256 - prefix_bits) == 0:
            return nonce
        nonce += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--key", required=True, help="the DHT key (a string) to hide")
    parser.add_argument("--mode", choices=["empty", "sybil", "junk", "stall"], required=True)
    parser.add_argument("--prefix-bits", type=int, default=8)
    parser.add_argument("--k", type=int, default=DHTConfig.k)
    parser.add_argument("--difficulty", type=int, default=DHTConfig.id_difficulty)
    args = parser.parse_args()
    config = DHTConfig(k=args.k, id_difficulty=args.difficulty)
    target = key_id(pack(args.key, "key"))
    bait = Peer(Identity.generate())
    # Nonces that do not prove an id for the bait's key (about 1 in 10 small nonces would at a low difficulty, and a
    # contact under it is a real one that lookups may call).
    unproven = [n for n in range(64) if proven_id(bait.peer_id.raw, n, args.difficulty) is None][:8]
    bait_calls = [0]

    async def count(request):
        bait_calls[0] += 1
        return {}

    for method in protocol.METHODS:
        bait.register(method, count)

    nodes: list[DHT] = []
    for _ in range(args.nodes):
        node = DHT(initial_peers=args.initial_peers, start=False, identity=Identity.generate(), config=config)
        nonce = ground_nonce(node.identity, target, args.prefix_bits, args.difficulty)
        node.peer = Peer(node.identity)
        node.peer.runtime.run(node._start(nonce), 60)
        nodes.append(node)

    def reply(request):
        if args.mode == "sybil":
            return protocol.find_reply([_me(other) for other in nodes], None, _yes(request))
        if args.mode == "junk":
            forged = [[str(bait.address), nonce] for nonce in unproven] + [["ucx://x", "y"], 5, [None, None]]
            header, tensors = protocol.encode_blob([forged, [[None, b"\xc1", 1e12, None], "junk"]])
            stored = _yes(request)
            if stored is not None:
                header["ok"] = stored
            return protocol.versioned(header), tensors
        return protocol.find_reply([], None, _yes(request))

    def on_find(node: DHT):
        async def handle(request):
            if protocol.find_target(request)[0] != target:
                return await node.node._on_find(request)
            if args.mode == "stall":
                await asyncio.sleep(3600)
            return reply(request)

        return handle

    async def on_store(request):
        return protocol.versioned({"ok": [True] * len(protocol.parse_store(request))})

    for node in nodes:
        node.peer.register(protocol.FIND, on_find(node))
        node.peer.register(protocol.STORE, on_store)
        print("ADDRESS", node.address, node.node.nonce, flush=True)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "bait":
            print("BAIT", bait_calls[0], flush=True)
    for node in nodes:
        node.shutdown()


def _me(dht: DHT):
    """This adversary as a contact others can be pointed to."""
    return protocol.proven_contact(dht.address, dht.node.nonce, dht.config.id_difficulty)


def _yes(request) -> list[bool] | None:
    """Say every offered record was stored (none is)."""
    if not protocol.offers_records(request):
        return None
    return [True] * len(protocol.parse_store(request))


if __name__ == "__main__":
    main()
