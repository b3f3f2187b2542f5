"""The HIVEENGINE_* environment variables through which `hiveengine launch` configures its workers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

INITIAL_PEERS_ENV = "HIVEENGINE_INITIAL_PEERS"  # space-separated peer addresses
RUN_ID_ENV = "HIVEENGINE_RUN_ID"
LOCAL_RANK_ENV = "HIVEENGINE_LOCAL_RANK"  # this worker's index among the launcher's workers
LOCAL_WORLD_SIZE_ENV = "HIVEENGINE_LOCAL_WORLD_SIZE"  # how many workers the launcher started
IDENTITY_ENV = "HIVEENGINE_IDENTITY"  # file with this worker's Ed25519 key (created if missing)
CLIENT_MODE_ENV = "HIVEENGINE_CLIENT_MODE"  # "1": this peer cannot accept connections
# A swarm key file (the owner's) or a membership file (`hiveengine swarm invite`): only members may connect.
# "open" or unset: an open swarm, which anyone who can reach a peer's address may join.
SWARM_ENV = "HIVEENGINE_SWARM"
# Logging level of hiveengine's loggers in a worker (e.g. INFO), set by `hiveengine --log-level`; read by init().
LOG_LEVEL_ENV = "HIVEENGINE_LOG_LEVEL"
DEFAULT_RUN_ID = "hiveengine-run"


@dataclass(frozen=True)
class LaunchEnv:
    """What a worker was told by its launcher (defaults describe a lone peer started by hand)."""

    initial_peers: list[str] = field(default_factory=list)
    run_id: str = DEFAULT_RUN_ID
    local_rank: int = 0
    local_world_size: int = 1
    identity_path: str | None = None
    client_mode: bool = False
    swarm: str | None = None  # swarm key or membership file; None: an open swarm

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> LaunchEnv:
        """Read the HIVEENGINE_* variables (`environ`, default os.environ); missing ones take their defaults."""
        env = os.environ if environ is None else environ
        return cls(
            initial_peers=env.get(INITIAL_PEERS_ENV, "").split(),
            run_id=env.get(RUN_ID_ENV) or DEFAULT_RUN_ID,
            local_rank=int(env.get(LOCAL_RANK_ENV, "0")),
            local_world_size=int(env.get(LOCAL_WORLD_SIZE_ENV, "1")),
            identity_path=env.get(IDENTITY_ENV) or None,
            client_mode=env.get(CLIENT_MODE_ENV, "0").lower() in ("1", "true", "yes"),
            swarm=env.get(SWARM_ENV) or None,
        )

    def to_environ(self) -> dict[str, str]:
        """The HIVEENGINE_* variables that describe this environment to a worker process."""
        env = {
            INITIAL_PEERS_ENV: " ".join(self.initial_peers),
            RUN_ID_ENV: self.run_id,
            LOCAL_RANK_ENV: str(self.local_rank),
            LOCAL_WORLD_SIZE_ENV: str(self.local_world_size),
            CLIENT_MODE_ENV: "1" if self.client_mode else "0",
        }
        if self.identity_path:
            env[IDENTITY_ENV] = self.identity_path
        if self.swarm:
            env[SWARM_ENV] = self.swarm
        return env
