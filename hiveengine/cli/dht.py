"""`hiveengine dht`: run a standalone DHT node (e.g. a swarm's bootstrap node) until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from hiveengine.dht import DHT
from hiveengine.transport import Identity

READY_PREFIX = "hiveengine dht node at"
STATUS_PREFIX = "dht status:"


def add_commands(sub) -> None:
    dht = sub.add_parser("dht", help="run a DHT node (a bootstrap node for a swarm); prints its address")
    dht.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR", help="addresses of nodes to join")
    dht.add_argument("--port", type=int, default=None, help="listen port (default: any; env HIVEENGINE_PORT)")
    dht.add_argument("--identity", default=None, help="file with this node's key (created if missing)")
    dht.add_argument("--status-interval", type=float, default=30.0, help="seconds between status lines (0: none)")
    dht.set_defaults(handler=cmd_dht)


def cmd_dht(args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(args.identity) if args.identity else None
    dht = DHT(initial_peers=args.initial_peers, identity=identity, port=args.port)
    print(READY_PREFIX, dht.address, flush=True)
    print(f"join it with: hiveengine dht --initial-peers {dht.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    interval = args.status_interval if args.status_interval > 0 else None
    while not stop.wait(interval):
        print(f"{STATUS_PREFIX} {dht.num_peers} peers known, {dht.num_keys} keys stored", flush=True)
    dht.shutdown()
    return 0
