"""`hiveengine status`: the live state of a training run, read from the DHT and refreshed like `top`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from hiveengine.dht import DHT, get_dht_time
from hiveengine.engine.env import DEFAULT_RUN_ID, INITIAL_PEERS_ENV, RUN_ID_ENV
from hiveengine.optim import SwarmProgress, parse_progress, progress_key

CLEAR_SCREEN = "\x1b[H\x1b[2J"
DEFAULT_INTERVAL = 2.0


def add_commands(sub) -> None:
    status = sub.add_parser("status", help="show a training run's live state (peers, samples/s, progress, loss)")
    status.add_argument(
        "--initial-peers",
        nargs="+",
        default=os.environ.get(INITIAL_PEERS_ENV, "").split() or None,
        metavar="ADDR",
        required=not os.environ.get(INITIAL_PEERS_ENV),
        help=f"any peer of the swarm (env {INITIAL_PEERS_ENV})",
    )
    status.add_argument("--run-id", default=os.environ.get(RUN_ID_ENV, DEFAULT_RUN_ID), help=f"env {RUN_ID_ENV}")
    status.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between refreshes")
    status.add_argument("--once", action="store_true", help="print the state once and exit")
    status.set_defaults(handler=cmd_status)


def render(run_id: str, swarm: SwarmProgress, now: float) -> str:
    """The status screen: a summary line, then one row per peer."""
    target = swarm.target
    progress = f"{swarm.samples}/{target} samples" if target else f"{swarm.samples} samples"
    eta = swarm.eta(target) if target else float("inf")
    lines = [
        f"run {run_id!r}: epoch {swarm.epoch}, {swarm.size} peer(s), {swarm.samples_per_second:.1f} samples/s, "
        f"next step {progress}" + (f" (eta {eta:.1f} s)" if eta != float("inf") else ""),
        f"{'peer':<14} {'epoch':>6} {'samples':>8} {'samples/s':>10} {'loss':>9} {'seen':>7}",
    ]
    for p in swarm.peers:
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        role = " (client)" if p.client_mode else ""
        lines.append(
            f"{p.peer[:12]:<14} {p.epoch:>6} {p.samples:>8} {p.samples_per_second:>10.1f} {loss:>9} "
            f"{max(0.0, now - p.time):>6.1f}s{role}"
        )
    losses = [p.loss for p in swarm.peers if p.loss is not None]
    if losses:
        lines.append(f"mean loss {sum(losses) / len(losses):.4f}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    dht = DHT(initial_peers=args.initial_peers, client_mode=True)
    stop = threading.Event()
    clear = CLEAR_SCREEN if sys.stdout.isatty() and not args.once else ""
    try:
        while True:
            swarm = parse_progress(dht.get(progress_key(args.run_id), latest=True))
            print(clear + time.strftime("%H:%M:%S ") + render(args.run_id, swarm, get_dht_time()), flush=True)
            if args.once or stop.wait(args.interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        dht.shutdown()
