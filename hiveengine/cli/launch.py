"""`hiveengine launch`: start N workers of a training script as peers of one swarm (torchrun for a swarm).

With no initial peers the launcher itself runs the swarm's bootstrap DHT node and prints the address that
other machines join with. Each worker learns the swarm through HIVEENGINE_* variables (read by
`hiveengine.init()`); its output lines are prefixed with its index; Ctrl-C / SIGTERM are forwarded to every
worker's process group, and whatever is still running after the grace period is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

from hiveengine.dht import DHT
from hiveengine.engine.env import (
    CLIENT_MODE_ENV,
    DEFAULT_RUN_ID,
    INITIAL_PEERS_ENV,
    RUN_ID_ENV,
    LaunchEnv,
)
from hiveengine.transport import Identity
from hiveengine.transport.runtime import PORT_ENV

NPROC_ENV = "HIVEENGINE_NPROC"
IDENTITY_DIR_ENV = "HIVEENGINE_IDENTITY_DIR"
GRACE_ENV = "HIVEENGINE_GRACE"
DEFAULT_GRACE = 10.0  # seconds workers get to exit after a forwarded signal before they are killed
BOOTSTRAP_PREFIX = "hiveengine launch: swarm bootstrap at"
STARTED_PREFIX = "hiveengine launch: started worker"


def add_commands(sub) -> None:
    env = os.environ
    launch = sub.add_parser(
        "launch",
        help="start N training workers as peers of one swarm (like torchrun)",
        description="Start N workers of SCRIPT (or -m MODULE) as peers of one swarm. Each option's default "
        "comes from the environment variable named in its help.",
    )
    launch.add_argument(
        "--nproc", type=int, default=int(env.get(NPROC_ENV, "1")), help=f"workers to start (env {NPROC_ENV})"
    )
    launch.add_argument(
        "--initial-peers",
        nargs="*",
        default=env.get(INITIAL_PEERS_ENV, "").split(),
        metavar="ADDR",
        help=f"addresses of peers of an existing swarm; none: start a new swarm (env {INITIAL_PEERS_ENV})",
    )
    launch.add_argument(
        "--run-id",
        default=env.get(RUN_ID_ENV, DEFAULT_RUN_ID),
        help=f"name of the training run; peers with the same run id train together (env {RUN_ID_ENV})",
    )
    launch.add_argument(
        "--identity-dir",
        default=env.get(IDENTITY_DIR_ENV),
        help=f"keep each worker's key in DIR/worker-N.key so its peer id survives restarts (env {IDENTITY_DIR_ENV})",
    )
    launch.add_argument(
        "--port",
        type=int,
        default=int(env[PORT_ENV]) if env.get(PORT_ENV) else None,
        help=f"listen port of the bootstrap node (default: any; env {PORT_ENV})",
    )
    launch.add_argument(
        "--client-mode",
        action="store_true",
        default=env.get(CLIENT_MODE_ENV, "0") == "1",
        help=f"workers cannot accept connections (behind NAT); they still train (env {CLIENT_MODE_ENV}=1)",
    )
    launch.add_argument(
        "--grace",
        type=float,
        default=float(env.get(GRACE_ENV, DEFAULT_GRACE)),
        help=f"seconds workers get to exit after Ctrl-C/SIGTERM before they are killed (env {GRACE_ENV})",
    )
    launch.add_argument("-m", dest="module", default=None, help="run a module (python -m MODULE) instead of a script")
    launch.add_argument("script", nargs="?", help="the training script")
    launch.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the script")
    launch.set_defaults(handler=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    if args.module:
        command = ["-m", args.module, *([args.script] if args.script else []), *args.args]
    elif args.script:
        command = [args.script, *args.args]
    else:
        raise SystemExit("hiveengine launch: give a training script or -m MODULE")
    if args.nproc < 1:
        raise SystemExit(f"hiveengine launch: --nproc must be ≥ 1, got {args.nproc}")
    launcher = Launcher(
        command,
        args.nproc,
        initial_peers=args.initial_peers,
        run_id=args.run_id,
        identity_dir=args.identity_dir,
        port=args.port,
        client_mode=args.client_mode,
        grace=args.grace,
    )
    return launcher.run()


class Launcher:
    """Runs the workers (and, for a new swarm, the bootstrap node) until every worker has exited."""

    def __init__(
        self,
        command: list[str],
        nproc: int,
        *,
        initial_peers: list[str],
        run_id: str,
        identity_dir: str | None = None,
        port: int | None = None,
        client_mode: bool = False,
        grace: float = DEFAULT_GRACE,
        out: TextIO = sys.stdout,
    ):
        self.command, self.nproc, self.initial_peers, self.run_id = command, nproc, list(initial_peers), run_id
        self.identity_dir, self.port, self.client_mode, self.grace = identity_dir, port, client_mode, grace
        self.out = out
        self.workers: list[subprocess.Popen] = []
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._write_lock = threading.RLock()  # the signal handler writes too
        self._signal: int | None = None

    def say(self, line: str) -> None:
        with self._write_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def run(self) -> int:
        bootstrap = None
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if not self.initial_peers:
                bootstrap = DHT(port=self.port)
                self.initial_peers = [str(bootstrap.address)]
                self.say(f"{BOOTSTRAP_PREFIX} {bootstrap.address}")
                self.say(f"hiveengine launch: join with: hiveengine launch --initial-peers {bootstrap.address} ...")
            for rank in range(self.nproc):
                self._start(rank)
            return self._wait()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bootstrap is not None:
                bootstrap.shutdown()

    def _start(self, rank: int) -> None:
        identity = None
        if self.identity_dir:
            Path(self.identity_dir).mkdir(parents=True, exist_ok=True)
            identity = str(Path(self.identity_dir) / f"worker-{rank}.key")
            Identity.load_or_create(identity)
        env = dict(os.environ)
        env.pop(PORT_ENV, None)  # the bootstrap node's port; each worker listens on a free one
        env.update(
            LaunchEnv(self.initial_peers, self.run_id, rank, self.nproc, identity, self.client_mode).to_environ()
        )
        env["PYTHONUNBUFFERED"] = "1"
        worker = subprocess.Popen(
            [sys.executable, *self.command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: signals and kills reach its children too
        )
        self.workers.append(worker)
        threading.Thread(target=self._pump, args=(rank, worker), daemon=True).start()
        self.say(f"{STARTED_PREFIX} {rank} (pid {worker.pid})")

    def _pump(self, rank: int, worker: subprocess.Popen) -> None:
        """Copy the worker's output with a prefix, then report its exit."""
        for line in worker.stdout:
            self.say(f"[worker {rank}] {line.rstrip()}")
        self.exits.put((rank, worker.wait()))

    def _wait(self) -> int:
        """Wait for every worker; return the first failure's exit code (0 if all succeeded)."""
        first_failure, running = 0, self.nproc
        while running:
            try:
                rank, code = self.exits.get(timeout=self.grace if self._signal is not None else None)
            except queue.Empty:
                self.say(f"hiveengine launch: workers still running {self.grace:.0f} s after the signal; killing them")
                self._kill_all(signal.SIGKILL)
                continue
            running -= 1
            if code != 0:
                code = 128 - code if code < 0 else code
                self.say(f"hiveengine launch: worker {rank} exited with code {code}")
                first_failure = first_failure or code
        if self._signal is not None:
            return first_failure or 128 + self._signal
        return first_failure

    def _forward(self, signum: int, _frame) -> None:
        if self._signal is None:
            self.say(f"hiveengine launch: got {signal.Signals(signum).name}, stopping {self.nproc} worker(s)")
        self._signal = signum
        self._kill_all(signum)

    def _kill_all(self, signum: int) -> None:
        for worker in self.workers:
            _signal_group(worker, signum)

    def _stop_all(self) -> None:
        """Leave no process behind: terminate, then kill, whatever is still running."""
        alive = [w for w in self.workers if w.poll() is None]
        for worker in alive:
            _signal_group(worker, signal.SIGTERM)
        for worker in alive:
            try:
                worker.wait(self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        for worker in self.workers:  # a worker's own children (same group) may outlive it
            _signal_group(worker, signal.SIGKILL)


def _signal_group(worker: subprocess.Popen, signum: int) -> None:
    """Signal the worker's whole process group (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signum)
