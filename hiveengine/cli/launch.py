"""`hiveengine launch`: start N workers of a training script as peers of one swarm (torchrun for a swarm).

With no initial peers the launcher itself runs the swarm's bootstrap DHT node and prints the address that
other machines join with. Each worker learns the swarm through HIVEENGINE_* variables (read by
`hiveengine.init()`); its output lines are prefixed with its index (and copied to DIR/worker-N.log with
--log-dir). Ctrl-C / SIGTERM are forwarded to every worker's process group; when a worker fails, the others
get SIGTERM. Whatever still runs `--grace` seconds later is killed. The exit code is the first failing
worker's, or 128 + the signal's number after Ctrl-C / SIGTERM (130 / 143), or 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from hiveengine.cli.common import UsageError, add_initial_peers, initial_peers, log_level
from hiveengine.engine.env import (
    CLIENT_MODE_ENV,
    DEFAULT_RUN_ID,
    INITIAL_PEERS_ENV,
    LOG_LEVEL_ENV,
    RUN_ID_ENV,
    SWARM_ENV,
    LaunchEnv,
)
from hiveengine.transport.reactor import SPIN_ENV
from hiveengine.transport.runtime import PORT_ENV

NPROC_ENV = "HIVEENGINE_NPROC"
IDENTITY_DIR_ENV = "HIVEENGINE_IDENTITY_DIR"
GRACE_ENV = "HIVEENGINE_GRACE"
LOG_DIR_ENV = "HIVEENGINE_LOG_DIR"
# Seconds workers get to exit after the launcher signals them (Ctrl-C/SIGTERM forwarded, or SIGTERM because
# another worker failed) before they are killed with SIGKILL.
DEFAULT_GRACE = 10.0
POLL_INTERVAL = 0.2  # seconds between the launcher's checks for signals and the kill deadline
BOOTSTRAP_PREFIX = "hiveengine launch: swarm bootstrap at"
STARTED_PREFIX = "hiveengine launch: started worker"
FAILED_PREFIX = "hiveengine launch: worker"  # "... N exited with code C"
LOG_FILE = "worker-{rank}.log"
THREADS_ENV = "OMP_NUM_THREADS"


def add_commands(sub) -> None:
    env = os.environ
    launch = sub.add_parser(
        "launch",
        help="start N training workers as peers of one swarm (like torchrun)",
        usage="hiveengine launch [options] SCRIPT [ARGS ...]\n       hiveengine launch [options] -m MODULE [ARGS ...]",
        description="Start N workers of SCRIPT (or of MODULE with -m) as peers of one swarm. Everything after "
        "SCRIPT goes to the script. Each option's default comes from the environment variable named in its "
        "help. Exit code: the first failing worker's; 130 after Ctrl-C (143 after SIGTERM); 2 for a usage error.",
    )
    launch.add_argument(
        "--nproc", type=_positive_int, default=env.get(NPROC_ENV, "1"), help=f"workers to start (env {NPROC_ENV})"
    )
    add_initial_peers(launch, "addresses of peers of an existing swarm; none: start a new swarm", env=INITIAL_PEERS_ENV)
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
        "--log-dir",
        default=env.get(LOG_DIR_ENV),
        metavar="DIR",
        help=f"also write worker N's output, unprefixed, to DIR/{LOG_FILE.format(rank='N')} (env {LOG_DIR_ENV})",
    )
    launch.add_argument(
        "--log-level",
        type=log_level,
        default=argparse.SUPPRESS,  # the same as `hiveengine --log-level`, which may come before `launch`
        help=f"logging level of the launcher and its workers' hiveengine loggers (env {LOG_LEVEL_ENV})",
    )
    launch.add_argument(
        "--port",
        type=int,
        default=env.get(PORT_ENV) or None,
        help=f"listen port of the bootstrap node (default: any; env {PORT_ENV})",
    )
    launch.add_argument(
        "--client-mode",
        action="store_true",
        default=env.get(CLIENT_MODE_ENV, "0") == "1",
        help=f"workers cannot accept connections (behind NAT); they still train (env {CLIENT_MODE_ENV}=1)",
    )
    launch.add_argument(
        "--swarm",
        default=env.get(SWARM_ENV) or None,
        metavar="FILE",
        help="private swarm: the owner's swarm key or a membership file from `hiveengine swarm invite`; only members "
        f"may connect. 'open' or none: an open swarm anyone may join (env {SWARM_ENV})",
    )
    launch.add_argument(
        "--grace",
        type=_non_negative_float,
        default=env.get(GRACE_ENV, str(DEFAULT_GRACE)),
        help=f"seconds workers get to exit after they are signalled (Ctrl-C/SIGTERM, or another worker failed) "
        f"before they are killed (default {DEFAULT_GRACE:g}; env {GRACE_ENV})",
    )
    launch.add_argument(
        "-m", "--module", action="store_true", help="SCRIPT is a module name: run `python -m MODULE ARGS`"
    )
    launch.add_argument("script", metavar="SCRIPT", help="the training script (or module, with -m)")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed on to the script")
    launch.set_defaults(handler=cmd_launch)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds ≥ 0, got {text!r}")
    return value


def worker_command(args: argparse.Namespace) -> list[str]:
    """What each worker runs after `python`; a UsageError if the script or module cannot be found."""
    if args.module:
        if not _module_exists(args.script):
            raise UsageError(f"no module named {args.script!r} (-m takes a module importable from here)")
        return ["-m", args.script, *args.args]
    if not Path(args.script).is_file():
        hint = ""
        if "://" in args.script:
            hint = "; it looks like a peer address: give each one with --initial-peers (or separate them with commas)"
        raise UsageError(f"script {args.script!r} not found{hint}")
    return [args.script, *args.args]


def _module_exists(name: str) -> bool:
    """Whether `python -m name` started here would find the module's top-level package (not imported; a
    dotted name's submodule is left to the worker)."""
    top = name.split(".")[0]
    if not top.isidentifier():
        return False
    sys.path.insert(0, os.getcwd())  # where `python -m` looks first
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return True  # cannot tell without importing: let the worker report it
    finally:
        sys.path.pop(0)


def cmd_launch(args: argparse.Namespace) -> int:
    command = worker_command(args)
    peers = initial_peers(args, os.environ.get(INITIAL_PEERS_ENV))
    swarm = args.swarm if args.swarm in (None, "open") else os.path.abspath(args.swarm)
    launcher = Launcher(
        command,
        args.nproc,
        initial_peers=peers,
        run_id=args.run_id,
        identity_dir=args.identity_dir,
        port=args.port,
        client_mode=args.client_mode,
        grace=args.grace,
        log_dir=args.log_dir,
        log_level=getattr(args, "log_level", None),
        swarm=swarm,
    )
    return launcher.run()


def shared_host_defaults(nproc: int, environ: dict[str, str], cores: int | None = None) -> dict[str, str]:
    """What workers sharing this host get unless `environ` sets it: an equal share of the cores each
    (OMP_NUM_THREADS, as torchrun does: oversubscribed OpenMP kernels run many times slower) and, with more workers
    than cores, no polling after network activity (a spinning worker takes the core another one needs)."""
    cores = cores or os.cpu_count() or 1
    defaults = {}
    if nproc > 1:
        defaults[THREADS_ENV] = str(max(1, cores // nproc))
    if nproc > cores:
        defaults[SPIN_ENV] = "0"
    return {name: value for name, value in defaults.items() if name not in environ}


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
        log_dir: str | None = None,
        log_level: str | None = None,
        swarm: str | None = None,
        out: TextIO = sys.stdout,
    ):
        self.command, self.nproc, self.initial_peers, self.run_id = command, nproc, list(initial_peers), run_id
        self.identity_dir, self.port, self.client_mode, self.grace = identity_dir, port, client_mode, grace
        self.log_dir = Path(log_dir) if log_dir else None
        self.log_level, self.swarm = log_level, swarm
        self.out = out
        self.workers: list[subprocess.Popen] = []
        self.shared: dict[str, str] = {}  # shared_host_defaults, once run() has read the environment
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._write_lock = threading.Lock()
        self._out_broken = False
        # Set by the signal handler, acted on by the main loop (a handler must not wait for a lock that a
        # thread writing to a stalled pipe holds).
        self._signals: list[int] = []
        self._signals_seen = 0
        self._stopping = False  # the launcher asked the workers to stop: their exit codes are not failures
        self._kill_at: float | None = None  # monotonic time of the SIGKILL after the grace period

    def say(self, line: str) -> None:
        """Write a line to the launcher's output. If that output is gone (a pipe whose reader died, e.g. `tee`
        stopped by the same Ctrl-C), keep running silently: the workers still get stopped, logged and waited
        for, and the exit code still tells what happened."""
        with self._write_lock:
            if self._out_broken:
                return
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._out_broken = True
                _silence(self.out)

    def run(self) -> int:
        bootstrap = None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.log_dir is not None:
                try:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UsageError(f"--log-dir {str(self.log_dir)!r}: {e.strerror or e}") from None
            if self.swarm:  # a bad file fails here, in one line, before any worker starts
                from hiveengine.transport import membership

                membership.use(membership.load(self.swarm))
            if not self.initial_peers:
                from hiveengine.dht import DHT

                bootstrap = DHT(port=self.port)
                address = bootstrap.address
                self.initial_peers = [str(address)]
                self.say(f"{BOOTSTRAP_PREFIX} {address}")
                where = f"--initial-peers {address} --run-id {self.run_id}"
                self.say(f"hiveengine launch: join with: hiveengine launch {where} SCRIPT")
                self.say(f"hiveengine launch: watch with: hiveengine status {where}")
            self.shared = shared_host_defaults(self.nproc, dict(os.environ))
            if self.shared:
                settings = " ".join(f"{name}={value}" for name, value in self.shared.items())
                self.say(
                    f"hiveengine launch: {self.nproc} workers share {os.cpu_count()} cores: each runs with {settings}"
                )
            for rank in range(self.nproc):
                if self._signals:
                    break  # Ctrl-C while starting: start no more
                self._start(rank)
            return self._wait()
        finally:
            self._stop_all()
            if bootstrap is not None:
                bootstrap.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, rank: int) -> None:
        identity = None
        if self.identity_dir:
            from hiveengine.transport import Identity

            Path(self.identity_dir).mkdir(parents=True, exist_ok=True)
            identity = str(Path(self.identity_dir) / f"worker-{rank}.key")
            Identity.load_or_create(identity)
        env = {**self.shared, **os.environ}
        env.pop(PORT_ENV, None)  # the bootstrap node's port; each worker listens on a free one
        env.update(
            LaunchEnv(
                self.initial_peers, self.run_id, rank, self.nproc, identity, self.client_mode, self.swarm
            ).to_environ()
        )
        if self.log_level:
            env[LOG_LEVEL_ENV] = self.log_level
        env["PYTHONUNBUFFERED"] = "1"
        log = None
        if self.log_dir is not None:  # the pump thread closes it when the worker's output ends
            log = open(self.log_dir / LOG_FILE.format(rank=rank), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
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
        threading.Thread(target=self._pump, args=(rank, worker, log), daemon=True).start()
        self.say(f"{STARTED_PREFIX} {rank} (pid {worker.pid})")

    def _pump(self, rank: int, worker: subprocess.Popen, log: TextIO | None) -> None:
        """Copy the worker's output with a prefix (and to its log file), then report its exit."""
        try:
            for line in worker.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                self.say(f"[worker {rank}] {line.rstrip()}")
        finally:
            if log is not None:
                log.close()
            self.exits.put((rank, worker.wait()))

    def _wait(self) -> int:
        """Wait for every worker; return the first failure's exit code, else 128 + the signal that stopped
        them, else 0. A failure stops the other workers."""
        first_failure, running = 0, len(self.workers)
        while running:
            self._handle_signals()
            try:
                rank, code = self.exits.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                if self._kill_at is not None and time.monotonic() >= self._kill_at:
                    self._kill_at = None
                    self.say(
                        f"hiveengine launch: {running} worker(s) still running {self.grace:g} s after being "
                        "signalled; killing them"
                    )
                    self._signal_all(signal.SIGKILL)
                continue
            running -= 1
            if code == 0 or self._stopping:
                continue  # done, or stopped by us (a forwarded signal, or another worker failed)
            code = 128 - code if code < 0 else code
            self.say(f"{FAILED_PREFIX} {rank} exited with code {code}")
            first_failure = code
            if running:
                self.say(
                    f"hiveengine launch: stopping the other {running} worker(s) (SIGTERM, SIGKILL after "
                    f"{self.grace:g} s)"
                )
                self._stop(signal.SIGTERM)
        if first_failure:
            return first_failure
        return 128 + self._signals[0] if self._signals else 0

    def _on_signal(self, signum: int, _frame) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        """Act on signals received since the last check: forward the first to every worker; a second one
        kills them at once."""
        while self._signals_seen < len(self._signals):
            signum = self._signals[self._signals_seen]
            self._signals_seen += 1
            name = signal.Signals(signum).name
            if self._signals_seen == 1:
                self.say(
                    f"hiveengine launch: got {name}, stopping {len(self.workers)} worker(s) (SIGKILL after "
                    f"{self.grace:g} s; {name} again to kill them now)"
                )
                self._stop(signum)
            else:
                self.say(f"hiveengine launch: got {name} again, killing the workers")
                self._signal_all(signal.SIGKILL)

    def _stop(self, signum: int) -> None:
        """Ask every worker to stop with `signum`; the grace period starts now."""
        self._stopping = True
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self.grace
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        """Signal every worker's process group: one whose worker has exited may still hold children."""
        for worker in self.workers:
            _signal_group(worker, signum)

    def _stop_all(self) -> None:
        """Leave no process behind: terminate, then kill, whatever is still running."""
        alive = [w for w in self.workers if w.poll() is None]
        for worker in alive:
            _signal_group(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for worker in alive:
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(worker, signal.SIGKILL)
                worker.wait()
        for worker in self.workers:  # a worker's own children (same group) may outlive it
            _signal_group(worker, signal.SIGKILL)


def _signal_group(worker: subprocess.Popen, signum: int) -> None:
    """Signal the worker's whole process group (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signum)


def _silence(stream: TextIO) -> None:
    """Point a broken output stream at /dev/null, so that flushing it at exit raises nothing."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
