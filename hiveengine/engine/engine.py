"""Engine: one training process's place in a swarm (its DHT node and run), built from the launcher's env."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Mapping

import torch

from hiveengine.dht import DHT
from hiveengine.engine.env import LOG_LEVEL_ENV, LaunchEnv
from hiveengine.errors import ConfigurationError
from hiveengine.optim import Optimizer
from hiveengine.transport import Identity, Peer, membership
from hiveengine.transport.reachability import check_reachability_sync
from hiveengine.transport.relay import reserve_any

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as the hiveengine command's own


class Engine:
    """This process's DHT node and run; `engine.optimizer(...)` builds a hiveengine.Optimizer for the run."""

    def __init__(self, env: LaunchEnv):
        self.env = env
        self._optimizers: list[Optimizer] = []
        self._shut_down = False
        identity = Identity.load_or_create(env.identity_path) if env.identity_path else Identity.generate()
        if env.swarm:  # unset: whatever the process chose (an open swarm unless it called membership.use)
            membership.use(membership.load(env.swarm))
        # A peer that others cannot dial (behind a NAT) runs its DHT node as a client: reachability.py logs why. So
        # does a member whose certificate makes it client-only (others refuse to dial it).
        forced = env.client_mode or membership.client_only()
        self.client_mode = forced or _unreachable(env.initial_peers, identity)
        self.dht = DHT(initial_peers=env.initial_peers, identity=identity, client_mode=self.client_mode)
        if self.dht.peer.runtime.reachable is False:  # others reach us through a relay, if an initial peer is one
            self.dht.peer.runtime.run(reserve_any(self.dht.peer, env.initial_peers), timeout=60)
        # Its optimizers still reduce and serve state if others reach it through a relay (they register a smaller
        # bandwidth, so peers dialled directly take the parts first; a swarm of home peers averages through relays).
        self.averaging_client_mode = forced or (self.client_mode and self.dht.peer.relayed is None)
        logger.info(
            "worker %d/%d of run %r at %s (%s)",
            env.local_rank,
            env.local_world_size,
            env.run_id,
            self.dht.address,
            f"joined {len(env.initial_peers)} initial peer(s)" if env.initial_peers else "a new swarm",
        )

    @property
    def run_id(self) -> str:
        """The run this process trains in (peers with the same run id train one model)."""
        return self.env.run_id

    @property
    def local_rank(self) -> int:
        """This worker's index among the workers of its launch (0 without a launcher)."""
        return self.env.local_rank

    @property
    def local_world_size(self) -> int:
        """How many workers its launch started (1 without a launcher)."""
        return self.env.local_world_size

    @property
    def address(self) -> str:
        """This process's DHT address (`ucx://HOST:PORT/PEER_ID`), which other peers can join with."""
        return str(self.dht.address)

    def optimizer(self, optimizer, params: Iterable[torch.nn.Parameter] | None = None, **options) -> Optimizer:
        """A hiveengine.Optimizer on this engine's DHT and run (options as for hiveengine.Optimizer)."""
        options.setdefault("client_mode", self.averaging_client_mode)
        opt = Optimizer(dht=self.dht, run_id=self.run_id, optimizer=optimizer, params=params, **options)
        self._optimizers.append(opt)
        return opt

    def shutdown(self) -> None:
        """Leave the swarm: shut down the optimizers made by `optimizer()`, then the DHT node; idempotent.
        Runs at exit too, for scripts that end without calling it."""
        if self._shut_down:
            return
        self._shut_down = True
        for opt in self._optimizers:
            opt.shutdown()
        self._optimizers.clear()
        self.dht.shutdown()

    def _shutdown_at_exit(self) -> None:
        """The atexit twin of `shutdown`: the process is ending anyway, so a failure is only logged."""
        try:
            self.shutdown()
        except BaseException as e:  # a second Ctrl-C, or a swarm gone: no traceback at exit
            logger.debug("shutdown at exit: %s: %s", type(e).__name__, e)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _unreachable(initial_peers: list[str], identity: Identity) -> bool:
    """Whether the initial peers, asked to dial this process back, all failed to (a short-lived peer with the DHT's
    identity asks, so a private swarm admits it: the listener it is dialled back on is the process's)."""
    if not initial_peers:
        return False
    asker = Peer(identity)
    try:
        return check_reachability_sync(asker, initial_peers).reachable is False
    finally:
        asker.shutdown()


def configure_logging(environ: Mapping[str, str] = os.environ) -> None:
    """Apply HIVEENGINE_LOG_LEVEL (set by `hiveengine --log-level`) to hiveengine's loggers; when the script has
    configured no logging yet, also give the root logger a handler with the launcher's format (the script's
    own loggers keep their level). Without the variable, nothing is touched."""
    level = environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if not level:
        return
    try:
        logging.getLogger("hiveengine").setLevel(int(level) if level.isdigit() else level)
    except ValueError:
        raise ConfigurationError(f"{LOG_LEVEL_ENV}={level!r} is not a logging level (e.g. INFO, DEBUG)") from None
    if not logging.getLogger().handlers:
        logging.basicConfig(format=LOG_FORMAT)


def init(**overrides) -> Engine:
    """Join the swarm the launcher describes (HIVEENGINE_* variables), like torch.distributed's
    init_process_group; without a launcher, start a lone peer. Keyword arguments override LaunchEnv fields.
    The engine is shut down at exit if the script does not do it."""
    configure_logging()
    env = LaunchEnv.from_environ()
    if overrides:
        env = LaunchEnv(**{**env.__dict__, **overrides})
    engine = Engine(env)
    atexit.register(engine._shutdown_at_exit)  # after the transport runtime's handler, so it runs before it
    return engine
