"""Collaborative optimization: peers step together when the swarm reaches a target batch (sync) or average
pseudo-gradients after local steps (DiLoCo), with progress tracked in the DHT."""

from hiveengine.optim.optimizer import DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM, MODES, Optimizer
from hiveengine.optim.progress import PeerProgress, ProgressTracker, SwarmProgress, parse_progress, progress_key
from hiveengine.optim.state import TrainingState, initialize_optimizer_state

__all__ = [
    "DILOCO_OUTER_LR",
    "DILOCO_OUTER_MOMENTUM",
    "MODES",
    "Optimizer",
    "PeerProgress",
    "ProgressTracker",
    "SwarmProgress",
    "TrainingState",
    "initialize_optimizer_state",
    "parse_progress",
    "progress_key",
]
