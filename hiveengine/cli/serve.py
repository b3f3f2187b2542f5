"""`hiveengine serve`: host Mixture-of-Experts experts, declare them in the DHT, serve until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
import time

import torch

from hiveengine.cli.common import add_initial_peers, initial_peers
from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.moe import Server, get_experts, uids_from_pattern
from hiveengine.moe.server import (
    DEFAULT_BATCH_WAIT,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CLIENT_BYTES,
    DEFAULT_MAX_KEPT_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SAMPLE_BYTES,
    DEFAULT_UPDATE_PERIOD,
)
from hiveengine.moe.server.backend import OPTIMIZERS, optimizer_factory

READY_PREFIX = "hiveengine expert server at"
DHT_PREFIX = "dht node at"
EXPERTS_PREFIX = "experts:"
THROUGHPUT_PREFIX = "throughput:"
DEFAULT_LR = 1e-3
DEFAULT_STATS_INTERVAL = 30.0
DEFAULT_CHECKPOINT_INTERVAL = 600.0


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="host Mixture-of-Experts experts and declare them in the DHT")
    serve.add_argument("--expert-cls", default="ffn", help="expert class (ffn, transformer or a registered one)")
    serve.add_argument("--expert-uids", nargs="*", default=None, metavar="UID", help="explicit uids, e.g. ffn.0.1")
    serve.add_argument("--expert-pattern", default=None, help="uid pattern, e.g. 'ffn.[0:4].[0:4]'")
    serve.add_argument("--num-experts", type=int, default=None, help="how many uids to take from the pattern")
    serve.add_argument("--hidden-dim", type=int, default=1024)
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    serve.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    serve.add_argument("--lr", type=float, default=DEFAULT_LR)
    serve.add_argument(
        "--accumulate-batches", type=int, default=1, help="optimizer step every N backward batches (0: never)"
    )
    serve.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="rows per batch")
    serve.add_argument("--batch-wait", type=float, default=DEFAULT_BATCH_WAIT, help="seconds to wait to fill a batch")
    serve.add_argument(
        "--clip-grad-norm", type=float, default=None, help="clip each expert's gradient norm to this before updates"
    )
    serve.add_argument(
        "--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="larger requests are refused"
    )
    serve.add_argument(
        "--max-client-bytes",
        type=int,
        default=DEFAULT_MAX_CLIENT_BYTES,
        help="request bytes one client may have queued or computing",
    )
    serve.add_argument(
        "--max-sample-bytes",
        type=int,
        default=DEFAULT_MAX_SAMPLE_BYTES,
        help="input bytes per sample (e.g. a sequence) beyond which requests are refused",
    )
    serve.add_argument(
        "--max-kept-bytes",
        type=int,
        default=DEFAULT_MAX_KEPT_BYTES,
        help="bytes of forward activations each expert keeps for backward calls",
    )
    add_initial_peers(serve, "DHT nodes to join")
    serve.add_argument("--no-dht", action="store_true", help="serve without declaring experts in a DHT")
    serve.add_argument("--update-period", type=float, default=DEFAULT_UPDATE_PERIOD, help="seconds between DHT updates")
    serve.add_argument("--port", type=int, default=None, help="listen port (default: any; env HIVEENGINE_PORT)")
    serve.add_argument("--checkpoint-dir", default=None, help="load experts from here at start, save here on exit")
    serve.add_argument("--checkpoint-interval", type=float, default=DEFAULT_CHECKPOINT_INTERVAL, help="seconds")
    serve.add_argument("--stats-interval", type=float, default=DEFAULT_STATS_INTERVAL, help="seconds (0: never)")
    serve.add_argument("--seed", type=int, default=None, help="initialize expert i from seed + i")
    serve.set_defaults(handler=cmd_serve)


def choose_uids(args: argparse.Namespace, dht: DHT | None) -> list[str]:
    """The uids to serve: explicit ones, or free ones from the pattern (skipping uids the DHT says are served)."""
    if args.expert_uids:
        return list(args.expert_uids)
    if args.expert_pattern is None:
        raise ConfigurationError("give --expert-uids or --expert-pattern (e.g. 'ffn.[0:4].[0:4]')")
    taken: set[str] = set()
    if dht is not None:
        candidates = uids_from_pattern(args.expert_pattern)
        taken = {uid for uid, address in get_experts(dht, candidates).items() if address is not None}
    return uids_from_pattern(args.expert_pattern, args.num_experts, taken)


def build_server(args: argparse.Namespace) -> tuple[Server, DHT | None]:
    """The DHT node (unless --no-dht) and the started Server the arguments describe."""
    peers = initial_peers(args)
    dht = None if args.no_dht else DHT(initial_peers=peers)
    try:
        uids = choose_uids(args, dht)
        server = Server.create(
            args.expert_cls,
            uids,
            args.hidden_dim,
            device=args.device,
            optimizer=optimizer_factory(args.optimizer, args.lr),
            accumulate_batches=args.accumulate_batches,
            clip_grad_norm=args.clip_grad_norm,
            max_kept_bytes=args.max_kept_bytes,
            max_request_bytes=args.max_request_bytes,
            max_client_bytes=args.max_client_bytes,
            max_sample_bytes=args.max_sample_bytes,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            dht=dht,
            max_batch_size=args.max_batch_size,
            batch_wait=args.batch_wait,
            update_period=args.update_period,
            port=args.port,
        )
    except BaseException:
        if dht is not None:
            dht.shutdown()
        raise
    return server, dht


def throughput_line(server: Server, previous: dict[str, int], seconds: float) -> str:
    """Samples per second forward and backward since `previous` (updated in place), and the mean batch size."""
    stats = server.stats()
    line = []
    for kind in ("fwd", "bwd"):
        rows = sum(v for k, v in stats.rows.items() if k.endswith(kind))
        batches = sum(v for k, v in stats.batches.items() if k.endswith(kind))
        delta_rows, delta_batches = rows - previous.get(kind, 0), batches - previous.get(kind + "_b", 0)
        previous[kind], previous[kind + "_b"] = rows, batches
        mean = delta_rows / delta_batches if delta_batches else 0.0
        line.append(f"{kind} {delta_rows / seconds:.1f} samples/s (mean batch {mean:.1f})")
    return f"{THROUGHPUT_PREFIX} {', '.join(line)}"


def cmd_serve(args: argparse.Namespace) -> int:
    server, dht = build_server(args)
    print(READY_PREFIX, server.address, flush=True)
    if dht is not None:
        print(DHT_PREFIX, dht.address, flush=True)
    print(EXPERTS_PREFIX, " ".join(server.experts), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    periods = [p for p in (args.stats_interval, args.checkpoint_interval if args.checkpoint_dir else 0) if p > 0]
    tick = min(periods) if periods else None
    previous: dict[str, int] = {}
    last_stats = last_checkpoint = time.monotonic()
    try:
        while not stop.wait(tick):
            now = time.monotonic()
            if args.stats_interval > 0 and now - last_stats >= args.stats_interval:
                print(throughput_line(server, previous, now - last_stats), flush=True)
                last_stats = now
            if args.checkpoint_dir and now - last_checkpoint >= args.checkpoint_interval:
                server.save_checkpoints(args.checkpoint_dir)
                last_checkpoint = now
    finally:
        server.shutdown()
        if args.checkpoint_dir:
            server.save_checkpoints(args.checkpoint_dir)
        if dht is not None:
            dht.shutdown()
    print("expert server stopped", flush=True)
    return 0
