"""Collaborative training benchmark and demo: a small byte-level transformer LM on Python's own source code.

`hiveengine launch --nproc 4 bench/train.py` trains it with 4 peers (sync mode, int8) and prints progress;
`python bench/train.py --baseline` trains it in one process with the swarm's total batch; `hiveengine bench
train` (or `python bench/train.py`) runs the single-process baseline, a 4-peer sync swarm and a 4-peer DiLoCo
swarm side by side, and compares held-out loss after the same number of samples, bytes averaged, and
samples/s. Every run writes metrics as JSON lines (tools/plot_metrics.py draws them); a worker's "samples" are its own
times the swarm size, an estimate of the swarm's.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, results_dir, write_results
from hiveengine.cli.launch import BOOTSTRAP_PREFIX
from hiveengine.optim import DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM

RESULT_PREFIX = "RESULT"
CORPUS_BYTES = 4 << 20  # how much of the standard library's source to train on
HELDOUT_FRACTION = 0.05
EVAL_SEQUENCES = 128
PROGRESS_SECONDS = 5.0  # how often a worker prints its progress line
VOCAB = 256  # bytes
PEERS_PER_DATA_SEED = 100  # data streams of one seed: rank r reads stream 1000 + 100 * data_seed + r


def build_corpus(max_bytes: int = CORPUS_BYTES) -> torch.Tensor:
    """The standard library's .py files, concatenated as bytes (the same on every machine with this Python)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A causal byte-level language model."""

    def __init__(self, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, dim), nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(x)))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def sample_batch(data: torch.Tensor, gen: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def evaluate(model: nn.Module, heldout: torch.Tensor, seq: int) -> float:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return lm_loss(model, sample_batch(heldout, gen, EVAL_SEQUENCES, seq)).item()


def split_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    corpus = build_corpus()
    cut = int(corpus.numel() * (1 - HELDOUT_FRACTION))
    return corpus[:cut], corpus[cut:]


def make_model(args) -> TinyLM:
    """The model every run starts from: seed-0 parameters, or those saved in `--init` (a warm start)."""
    torch.manual_seed(0)  # every peer starts from the same parameters
    model = TinyLM(args.dim, args.layers, args.heads, args.seq)
    if args.init:
        model.load_state_dict(torch.load(args.init, weights_only=True))
    return model


def data_stream(args, rank: int) -> torch.Generator:
    """The random source of one run's training batches: distinct per peer, and per data seed (the warm-up
    reads other samples than the runs that continue from it)."""
    return torch.Generator().manual_seed(1000 + PEERS_PER_DATA_SEED * args.data_seed + rank)


class Metrics:
    """Appends one JSON object per line to `path` (if given)."""

    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None  # noqa: SIM115 (closed in close())

    def write(self, **row) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def progress_line(done: float, loss: float, speed: float, peers: int, epoch: int) -> str:
    width = 30
    filled = int(width * min(1.0, done))
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {100 * done:5.1f}% epoch {epoch} loss {loss:.3f} {speed:7.1f} samples/s {peers} peer(s)"


def run_worker(args) -> dict:
    """One peer of the swarm (started by `hiveengine launch`)."""
    import hiveengine

    engine = hiveengine.init()
    # Under its own launcher (--wan), a worker is the swarm's peer `--rank` of `--peers`.
    rank = engine.local_rank if args.rank is None else args.rank
    peers = engine.local_world_size if args.rank is None else args.peers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // peers))
    train, heldout = split_corpus()
    model = make_model(args)
    options = dict(batch_size_per_step=args.batch, codec=args.codec, matchmaking_time=args.matchmaking_time)
    if args.mode == "sync":
        options.update(target_batch_size=args.target_batch_size, progress_interval=0.2)
        epochs = args.samples // args.target_batch_size
    else:
        options.update(inner_steps=args.inner_steps, progress_interval=1.0)
        options.update(outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
        epochs = max(1, args.samples // (args.inner_steps * args.batch * peers))
    opt = engine.optimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), mode=args.mode, **options)
    opt.wait_for_peers(peers, timeout=120)
    metrics = Metrics(args.metrics and f"{args.metrics}-worker{rank}.jsonl")
    gen = data_stream(args, rank)
    start = last_print = time.monotonic()
    samples = 0
    while opt.epoch < epochs:
        loss = lm_loss(model, sample_batch(train, gen, args.batch, args.seq))
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        samples += args.batch
        now = time.monotonic()
        speed = opt.swarm.samples_per_second
        row = dict(t=now - start, samples=samples * peers, epoch=opt.epoch, loss=loss.item())
        metrics.write(**row, swarm_samples_per_s=speed)
        if now - last_print >= PROGRESS_SECONDS and rank == 0:
            last_print = now
            print(progress_line(opt.epoch / epochs, loss.item(), speed, opt.swarm.size, opt.epoch), flush=True)
    wall = time.monotonic() - start
    result = {
        "mode": args.mode,
        "codec": args.codec,
        "rank": rank,
        "peers": peers,
        "epochs": opt.epoch,
        "eval_loss": evaluate(model, heldout, args.seq),
        "local_samples": samples,
        "wall_s": wall,
        "bytes_averaged": opt.bytes_averaged,
        "rounds": opt.rounds,
    }
    metrics.write(**result)
    metrics.close()
    print(RESULT_PREFIX, json.dumps(result), flush=True)
    opt.shutdown()
    engine.shutdown()
    return result


def run_baseline(args) -> dict:
    """One process, one optimizer, the swarm's total batch per step (what the swarm should match)."""
    torch.set_num_threads(os.cpu_count() or 1)
    train, heldout = split_corpus()
    model = make_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = data_stream(args, 0)
    metrics = Metrics(args.metrics and f"{args.metrics}-baseline.jsonl")
    steps, start = args.samples // args.target_batch_size, time.monotonic()
    for step in range(steps):
        loss = lm_loss(model, sample_batch(train, gen, args.target_batch_size, args.seq))
        loss.backward()
        opt.step()
        opt.zero_grad()
        metrics.write(t=time.monotonic() - start, samples=(step + 1) * args.target_batch_size, loss=loss.item())
    result = {
        "mode": "single process",
        "codec": "-",
        "peers": 1,
        "epochs": steps,
        "eval_loss": evaluate(model, heldout, args.seq),
        "local_samples": steps * args.target_batch_size,
        "wall_s": time.monotonic() - start,
        "bytes_averaged": 0,
    }
    if args.save:
        torch.save(model.state_dict(), args.save)
    metrics.write(**result)
    metrics.close()
    print(RESULT_PREFIX, json.dumps(result), flush=True)
    return result


def model_args(args) -> list[str]:
    keys = ["dim", "layers", "heads", "seq", "batch", "lr", "samples", "target_batch_size", "inner_steps"]
    keys += ["outer_lr", "outer_momentum"]
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def collect(command: list[str], timeout: float) -> list[dict]:
    """Run a command, echo its output, and return the RESULT objects it printed."""
    results = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        watchdog = threading.Timer(timeout, proc.kill)  # ends the run even if it hangs without printing
        watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                _, found, rest = line.partition(RESULT_PREFIX + " ")
                if found:
                    results.append(json.loads(rest))
        finally:
            watchdog.cancel()
        if proc.wait() != 0:
            raise SystemExit(f"{command} failed with exit code {proc.returncode} (killed after {timeout:.0f} s?)")
    return results


def compare(args) -> int:
    """The benchmark: baseline, sync swarm and DiLoCo swarm, one after the other, then a table."""
    here, common = str(Path(__file__).resolve()), model_args(args)
    metrics = str(results_dir() / "train")
    if args.warmup_samples:
        common += ["--init", warm_start(args, here)]
    runs = {"single process": collect([sys.executable, here, "--baseline", *common, "--metrics", metrics], 3600)}
    for mode, codec in (("sync", args.codec), ("diloco", args.diloco_codec)):
        launch = [sys.executable, "-m", "hiveengine.cli", "launch", "--nproc", str(args.peers), "--run-id", mode]
        worker = [here, *common, "--mode", mode, "--codec", codec, "--metrics", f"{metrics}-{mode}"]
        runs[mode] = collect([*launch, *worker, "--matchmaking-time", str(args.matchmaking_time)], 3600)
    baseline = runs["single process"][0]
    sync_bytes = max(r["bytes_averaged"] for r in runs["sync"])
    rows = [_row("single process", [baseline], baseline, sync_bytes)]
    rows += [_row(mode, runs[mode], baseline, sync_bytes) for mode in ("sync", "diloco")]
    print(format_table(rows, list(rows[0])))
    write_results("train", {"args": vars(args), "rows": rows})
    if args.plot:
        from tools.plot_metrics import plot

        runs = ("baseline", "sync-worker0", "diloco-worker0")
        plot(Path(args.plot), [results_dir() / f"train-{run}.jsonl" for run in runs])
    return 0


def compare_wan(args) -> int:
    """Issue 18's WAN goal, in one run: DiLoCo throughput with each peer behind an emulated WAN link against the same
    swarm on loopback. Each peer runs under its own launcher in both, so that only the links differ."""
    from tools.netns import WanNetwork
    from tools.netns import available as netns_available

    if not netns_available():
        raise SystemExit("--wan needs root and `ip netns` (network namespaces)")
    here = str(Path(__file__).resolve())
    worker = [here, *model_args(args), "--mode", "diloco", "--codec", args.diloco_codec, "--peers", str(args.peers)]
    worker += ["--matchmaking-time", str(args.matchmaking_time)]
    runs = {"loopback": run_spread(worker, args.peers, None, "diloco-loopback")}
    with WanNetwork(args.peers, args.wan) as net:
        runs[args.wan] = run_spread(worker, args.peers, net, "diloco-wan")
    rows = []
    for link, results in runs.items():
        samples, wall = sum(r["local_samples"] for r in results), max(r["wall_s"] for r in results)
        rows.append(
            {
                "link": link,
                "codec": args.diloco_codec,
                "peers": args.peers,
                "rounds": results[0]["rounds"].get("averaged", 0),
                "eval_loss": round(sum(r["eval_loss"] for r in results) / len(results), 4),
                "samples_per_s": round(samples / wall, 1),
            }
        )
    for row in rows:
        row["vs_loopback"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 3)
    print(format_table(rows, list(rows[0])))
    write_results(f"train-wan-{args.wan}", {"args": vars(args), "rows": rows})
    return 0


def run_spread(worker: list[str], peers: int, net, run_id: str, timeout: float = 3600) -> list[dict]:
    """The swarm with each peer under its own launcher, peer 0's bootstrapping the others; with `net` (a
    tools.netns.WanNetwork), peer r runs in namespace r over TCP only (shared memory or a direct copy would bypass
    the link). Echoes their output and returns their RESULT objects."""
    output = _MergedOutput()
    watchdog = threading.Timer(timeout, output.kill)  # ends the run even if it hangs without printing
    watchdog.start()
    try:
        for rank in range(peers):
            launch = [sys.executable, "-m", "hiveengine.cli", "launch", "--nproc", "1", "--run-id", run_id]
            initial = ["--initial-peers", output.address] if rank else []
            argv, env = [*launch, *initial, *worker, "--rank", str(rank)], dict(os.environ)
            if net is not None:
                env.update(UCX_TLS="tcp,self", HIVEENGINE_LOCAL_COPY="0", HIVEENGINE_ANNOUNCE_HOST=net.host(rank))
                argv = net.command(rank, argv)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            output.add(rank, proc)
            while output.address is None and output.running:
                output.read_line()
            if output.address is None:
                raise SystemExit(f"peer 0's launcher exited ({proc.wait()}) before printing its bootstrap address")
        while output.running:
            output.read_line()
    finally:
        watchdog.cancel()
        output.kill()
    codes = [proc.wait() for proc in output.procs]
    if any(codes) or len(output.results) < peers:
        raise SystemExit(f"the {run_id} swarm failed: exit codes {codes} (killed after {timeout:.0f} s?)")
    return output.results


class _MergedOutput:
    """Several peers' output on one queue: each line echoed with its peer's rank; RESULT objects and the first
    launcher's bootstrap address kept."""

    def __init__(self):
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.results: list[dict] = []
        self.address: str | None = None
        self.running = 0

    def add(self, rank: int, proc: subprocess.Popen) -> None:
        self.procs.append(proc)
        self.running += 1
        threading.Thread(target=self._pump, args=(rank, proc), daemon=True).start()

    def _pump(self, rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put((rank, line))
        self.lines.put((rank, None))

    def read_line(self) -> None:
        rank, line = self.lines.get()
        if line is None:
            self.running -= 1
            return
        sys.stdout.write(f"[peer {rank}] {line}")
        _, found, rest = line.partition(RESULT_PREFIX + " ")
        if found:
            self.results.append(json.loads(rest))
        elif line.startswith(BOOTSTRAP_PREFIX) and self.address is None:
            self.address = line[len(BOOTSTRAP_PREFIX) :].strip()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def warm_start(args, here: str) -> str:
    """Train the single-process baseline for `--warmup-samples` and return the checkpoint every compared run
    starts from (the DiLoCo paper's protocol: the methods are compared from a pretrained model, not from
    random weights, where averaging models that drifted apart for H steps loses most of their progress)."""
    path = results_dir() / f"train-warm-{args.warmup_samples}.pt"
    warm = [*model_args(args), "--samples", str(args.warmup_samples), "--save", str(path), "--data-seed", "1"]
    collect([sys.executable, here, "--baseline", *warm], 3600)
    return str(path)


def _row(name: str, results: list[dict], baseline: dict, sync_bytes: int) -> dict:
    loss = sum(r["eval_loss"] for r in results) / len(results)
    samples = sum(r["local_samples"] for r in results)
    wall = max(r["wall_s"] for r in results)
    sent = max(r["bytes_averaged"] for r in results)
    return {
        "run": name,
        "codec": results[0]["codec"],
        "peers": results[0]["peers"],
        "samples": samples,
        "eval_loss": round(loss, 4),
        "loss_vs_single": round(loss / baseline["eval_loss"] - 1, 4),
        "samples_per_s": round(samples / wall, 1),
        "rounds": results[0].get("rounds", {}).get("averaged", 0),
        "MB_averaged_per_peer": round(sent / 1e6, 2),
        "bytes_vs_sync": round(sync_bytes / sent, 1) if sent else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="store_true", help="train single-process (the comparison baseline)")
    parser.add_argument("--mode", choices=["sync", "diloco"], default="sync", help="worker mode under the launcher")
    parser.add_argument("--codec", default="int8", help="all-reduce codec (sync mode, and workers)")
    parser.add_argument("--diloco-codec", default="int4", help="codec of the DiLoCo run in the comparison")
    parser.add_argument("--peers", type=int, default=4, help="swarm size in the comparison")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="sequences per local step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=12800, help="training samples, all peers together")
    parser.add_argument("--target-batch-size", type=int, default=64, help="sync: samples per swarm step")
    parser.add_argument("--inner-steps", type=int, default=100, help="diloco: local steps between averaging")
    parser.add_argument("--outer-lr", type=float, default=DILOCO_OUTER_LR, help="diloco: outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=DILOCO_OUTER_MOMENTUM, help="diloco: Nesterov momentum")
    parser.add_argument("--init", default=None, help="start from the model parameters saved in this file")
    parser.add_argument("--data-seed", type=int, default=0, help="which stream of training batches to read")
    parser.add_argument("--save", default=None, help="baseline: save the trained model parameters to this file")
    parser.add_argument(
        "--warmup-samples", type=int, default=0, help="comparison: every run starts from a model pretrained this long"
    )
    parser.add_argument("--matchmaking-time", type=float, default=0.5, help="seconds peers gather for a round")
    parser.add_argument("--metrics", default=None, help="write JSON-lines metrics to PREFIX-*.jsonl")
    parser.add_argument("--plot", default=None, help="comparison: also draw the metrics into this PNG")
    parser.add_argument(
        "--wan",
        metavar="PROFILE",
        help="instead: the DiLoCo swarm on loopback and with each peer in its own namespace behind an emulated WAN "
        "link (tools/wanlink.py, e.g. 100mbit-50ms; root), side by side: samples/s and their ratio",
    )
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # a worker under its own launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hiveengine.engine.env import LOCAL_RANK_ENV

    args = parse_args(argv)
    if LOCAL_RANK_ENV in os.environ:
        run_worker(args)
    elif args.baseline:
        run_baseline(args)
    elif args.wan:
        return compare_wan(args)
    else:
        return compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
