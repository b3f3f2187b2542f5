"""`hiveengine dht`: run a standalone DHT node (e.g. a swarm's bootstrap node) until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
import time

from hiveengine.cli.common import add_initial_peers, initial_peers
from hiveengine.dht import DHT
from hiveengine.engine.env import SWARM_ENV
from hiveengine.transport import Identity, membership
from hiveengine.transport.relay import (
    DEFAULT_RELAY_CIRCUITS,
    DEFAULT_RELAY_MBPS,
    RELAY_CIRCUITS_ENV,
    RELAY_MBPS_ENV,
    Relay,
    RelayLimits,
)

READY_PREFIX = "hiveengine dht node at"
STATUS_PREFIX = "dht status:"
DEFAULT_STATUS_INTERVAL = 30.0
MAX_PINGS_IN_FLIGHT = 16  # liveness checks of quiet peers run at once before a status line


def add_commands(sub) -> None:
    dht = sub.add_parser("dht", help="run a DHT node (a bootstrap node for a swarm); prints its address")
    add_initial_peers(dht, "addresses of nodes to join")
    dht.add_argument("--port", type=int, default=None, help="listen port (default: any; env HIVEENGINE_PORT)")
    dht.add_argument("--identity", default=None, help="file with this node's key (created if missing)")
    dht.add_argument(
        "--status-interval",
        type=float,
        default=DEFAULT_STATUS_INTERVAL,
        help="seconds between status lines (0: none); a status line counts the peers that answered within the "
        "last interval, after pinging the quiet ones (those that do not answer are dropped)",
    )
    dht.add_argument(
        "--swarm",
        default=os.environ.get(SWARM_ENV) or None,
        metavar="FILE",
        help="private swarm: the owner's swarm key or a membership file from `hiveengine swarm invite`; the node "
        f"admits members only. 'open' or none: an open swarm anyone may join (env {SWARM_ENV})",
    )
    dht.add_argument("--relay", action="store_true", help="relay for peers that cannot be dialled (behind a NAT)")
    dht.add_argument(
        "--relay-mbps",
        type=float,
        default=os.environ.get(RELAY_MBPS_ENV, str(DEFAULT_RELAY_MBPS)),  # argparse converts (and checks) it
        help="the relay's bandwidth cap over all circuits, Mbit/s (env HIVEENGINE_RELAY_MBPS)",
    )
    dht.add_argument(
        "--relay-circuits",
        type=int,
        default=os.environ.get(RELAY_CIRCUITS_ENV, str(DEFAULT_RELAY_CIRCUITS)),
        help="circuits relayed at once (env HIVEENGINE_RELAY_CIRCUITS)",
    )
    dht.set_defaults(handler=cmd_dht)


async def count_live_peers(dht: DHT, quiet_after: float) -> tuple[int, int]:
    """(live, dropped): the routing table's nodes that were heard from in the last `quiet_after` seconds or
    answer a ping now, and how many did not answer (the node drops those from its table)."""
    node = dht.node
    contacts = node.table.nearest(node.id, len(node.table))
    now = time.monotonic()
    quiet = [c for c in contacts if now - c.last_seen > quiet_after]
    limit = asyncio.Semaphore(MAX_PINGS_IN_FLIGHT)

    async def ping(contact) -> bool:
        async with limit:
            return await node._ping(contact)  # a node that does not answer is removed from the table

    answered = await asyncio.gather(*[ping(c) for c in quiet])
    dropped = answered.count(False)
    return len(contacts) - dropped, dropped


def status_line(dht: DHT, quiet_after: float) -> str:
    timeout = dht.config.rpc_timeout + 10.0
    live, dropped = dht.peer.runtime.run(count_live_peers(dht, quiet_after), timeout)
    line = f"{STATUS_PREFIX} {live} peers known, {dht.num_keys} keys stored"
    return line + (f" ({dropped} stopped answering and were dropped)" if dropped else "")


def cmd_dht(args: argparse.Namespace) -> int:
    peers = initial_peers(args)
    if args.swarm:  # before any connection: the handshake carries this process's membership
        membership.use(membership.load(args.swarm))
    identity = Identity.load_or_create(args.identity) if args.identity else None
    dht = DHT(initial_peers=peers, identity=identity, port=args.port)
    if args.relay:
        Relay(dht.peer, RelayLimits(max_circuits=args.relay_circuits, bytes_per_second=args.relay_mbps * 125_000))
    print(READY_PREFIX, dht.address, flush=True)
    print(f"join it with: hiveengine dht --initial-peers {dht.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    interval = args.status_interval if args.status_interval > 0 else None
    try:
        while not stop.wait(interval):
            print(status_line(dht, interval), flush=True)
    finally:
        dht.shutdown()
    return 0
