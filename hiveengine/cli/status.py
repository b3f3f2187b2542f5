"""`hiveengine status`: the live state of a training run, read from the DHT and refreshed like `top`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from hiveengine.cli.common import UsageError, add_initial_peers, initial_peers
from hiveengine.dht import DHT, get_dht_time
from hiveengine.engine.env import DEFAULT_RUN_ID, INITIAL_PEERS_ENV, RUN_ID_ENV
from hiveengine.optim import SwarmProgress, parse_progress, progress_key
from hiveengine.transport import PeerID

CLEAR_SCREEN = "\x1b[H\x1b[2J"
DEFAULT_INTERVAL = 2.0
NO_PROGRESS_EXIT_CODE = 1
PEER_COLUMN = 12  # characters of a peer id shown (the start of the id in addresses)


def add_commands(sub) -> None:
    status = sub.add_parser("status", help="show a training run's live state (peers, samples/s, progress, loss)")
    add_initial_peers(status, "any peer of the swarm (required)", env=INITIAL_PEERS_ENV)
    status.add_argument("--run-id", default=os.environ.get(RUN_ID_ENV, DEFAULT_RUN_ID), help=f"env {RUN_ID_ENV}")
    status.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between refreshes")
    status.add_argument("--once", action="store_true", help="print the state once and exit")
    status.set_defaults(handler=cmd_status)


def peer_label(peer: str) -> str:
    """A progress record's peer (its id in hex) as addresses write it: base32, cut to PEER_COLUMN characters."""
    try:
        text = str(PeerID(bytes.fromhex(peer)))
    except ValueError:
        text = peer
    return text[:PEER_COLUMN]


def no_progress_message(run_id: str) -> str:
    return (
        f"no peer reports progress under run id {run_id!r}: check --run-id (the launcher prints it: "
        f"`hiveengine launch: watch with: ...`), or the run has not started its optimizer yet"
    )


def render(run_id: str, swarm: SwarmProgress, now: float) -> str:
    """The status screen: a summary line, then one row per peer."""
    target = swarm.target
    progress = f"{swarm.samples}/{target} samples" if target else f"{swarm.samples} samples"
    eta = swarm.eta(target) if target else float("inf")
    lines = [
        f"run {run_id!r}: epoch {swarm.epoch}, {swarm.size} peer(s), {swarm.samples_per_second:.1f} samples/s, "
        f"next step {progress}" + (f" (eta {eta:.1f} s)" if eta != float("inf") else ""),
        f"{'peer':<{PEER_COLUMN + 2}} {'epoch':>6} {'samples':>8} {'samples/s':>10} {'loss':>9} {'seen':>7}",
    ]
    for p in swarm.peers:
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        role = " (client)" if p.client_mode else ""
        lines.append(
            f"{peer_label(p.peer):<{PEER_COLUMN + 2}} {p.epoch:>6} {p.samples:>8} {p.samples_per_second:>10.1f} "
            f"{loss:>9} {max(0.0, now - p.time):>6.1f}s{role}"
        )
    losses = [p.loss for p in swarm.peers if p.loss is not None]
    if losses:
        lines.append(f"mean loss {sum(losses) / len(losses):.4f}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the run's state (every --interval seconds, or --once). Exit 1 when no peer reports progress under
    the run id at the first look: most likely a wrong --run-id."""
    peers = initial_peers(args, os.environ.get(INITIAL_PEERS_ENV))
    if not peers:
        raise UsageError(f"give --initial-peers ADDR (any peer of the swarm) or set {INITIAL_PEERS_ENV}")
    dht = DHT(initial_peers=peers, client_mode=True)
    stop = threading.Event()
    clear = CLEAR_SCREEN if sys.stdout.isatty() and not args.once else ""
    first = True
    try:
        while True:
            swarm = parse_progress(dht.get(progress_key(args.run_id), latest=True))
            if not swarm.peers and first:
                print(f"hiveengine status: {no_progress_message(args.run_id)}", file=sys.stderr, flush=True)
                return NO_PROGRESS_EXIT_CODE
            first = False
            print(clear + time.strftime("%H:%M:%S ") + render(args.run_id, swarm, get_dht_time()), flush=True)
            if args.once or stop.wait(args.interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        dht.shutdown()
