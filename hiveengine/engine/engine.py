"""Engine: one training process's place in a swarm (its DHT node and run), built from the launcher's env."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from hiveengine.dht import DHT
from hiveengine.engine.env import LaunchEnv
from hiveengine.optim import Optimizer
from hiveengine.transport import Identity

logger = logging.getLogger(__name__)


class Engine:
    """This process's DHT node and run; `engine.optimizer(...)` builds a hiveengine.Optimizer for the run."""

    def __init__(self, env: LaunchEnv):
        self.env = env
        identity = Identity.load_or_create(env.identity_path) if env.identity_path else None
        self.dht = DHT(initial_peers=env.initial_peers, identity=identity, client_mode=env.client_mode)
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
        return self.env.run_id

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def local_world_size(self) -> int:
        return self.env.local_world_size

    @property
    def address(self) -> str:
        return str(self.dht.address)

    def optimizer(self, optimizer, params: Iterable[torch.nn.Parameter] | None = None, **options) -> Optimizer:
        """A hiveengine.Optimizer on this engine's DHT and run (options as for hiveengine.Optimizer)."""
        options.setdefault("client_mode", self.env.client_mode)
        return Optimizer(dht=self.dht, run_id=self.run_id, optimizer=optimizer, params=params, **options)

    def shutdown(self) -> None:
        """Leave the swarm; idempotent."""
        self.dht.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def init(**overrides) -> Engine:
    """Join the swarm the launcher describes (HIVEENGINE_* variables), like torch.distributed's
    init_process_group; without a launcher, start a lone peer. Keyword arguments override LaunchEnv fields."""
    env = LaunchEnv.from_environ()
    if overrides:
        env = LaunchEnv(**{**env.__dict__, **overrides})
    return Engine(env)
