"""A process hosting several DHT nodes for the tests: prints `ADDRESS <addr>` per node, then `PEERS <n>...` (how
many nodes each knows once started), then `READY`, and serves until its stdin closes (or it is killed)."""

import argparse
import sys

from hiveengine.dht import DHT, DHTConfig, protocol
from hiveengine.transport import membership


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--rpc-timeout", type=float, default=DHTConfig.rpc_timeout)
    parser.add_argument("--max-stored-bytes", type=int, default=DHTConfig.max_stored_bytes)
    parser.add_argument("--max-stored-bytes-per-peer", type=int, default=DHTConfig.max_stored_bytes_per_peer)
    parser.add_argument("--k", type=int, default=DHTConfig.k)
    parser.add_argument("--id-difficulty", type=int, default=DHTConfig.id_difficulty)
    parser.add_argument("--swarm", default=None, help="swarm key or membership file (default: an open swarm)")
    parser.add_argument("--protocol-version", type=int, default=protocol.PROTOCOL_VERSION, help="as another release")
    args = parser.parse_args()
    protocol.PROTOCOL_VERSION = args.protocol_version
    if args.swarm:
        membership.use(membership.load(args.swarm))
    config = DHTConfig(
        rpc_timeout=args.rpc_timeout,
        max_stored_bytes=args.max_stored_bytes,
        max_stored_bytes_per_peer=args.max_stored_bytes_per_peer,
        k=args.k,
        id_difficulty=args.id_difficulty,
    )
    nodes = []
    for _ in range(args.nodes):
        initial = args.initial_peers or [str(n.address) for n in nodes[:1]]
        nodes.append(DHT(initial_peers=initial, config=config))
        print("ADDRESS", nodes[-1].address, flush=True)
    print("PEERS", *(node.num_peers for node in nodes), flush=True)
    print("READY", flush=True)
    sys.stdin.read()
    for node in nodes:
        node.shutdown()


if __name__ == "__main__":
    main()
