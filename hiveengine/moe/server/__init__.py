"""Server side of the Mixture-of-Experts: expert classes, backends, the batching runtime and the Server."""

from hiveengine.moe.server.backend import DEFAULT_MAX_KEPT_BYTES, ExpertBackend
from hiveengine.moe.server.background import BackgroundServerInfo, background_server
from hiveengine.moe.server.experts import EXPERT_CLASSES, ExpertClass, get_expert_class, register_expert_class
from hiveengine.moe.server.runtime import DEFAULT_BATCH_WAIT, DEFAULT_MAX_BATCH_SIZE, BatchingRuntime, RuntimeStats
from hiveengine.moe.server.server import (
    DEFAULT_MAX_CLIENT_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SAMPLE_BYTES,
    DEFAULT_UPDATE_PERIOD,
    Server,
)

__all__ = [
    "DEFAULT_BATCH_WAIT",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_CLIENT_BYTES",
    "DEFAULT_MAX_KEPT_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_SAMPLE_BYTES",
    "DEFAULT_UPDATE_PERIOD",
    "EXPERT_CLASSES",
    "BackgroundServerInfo",
    "BatchingRuntime",
    "ExpertBackend",
    "ExpertClass",
    "RuntimeStats",
    "Server",
    "background_server",
    "get_expert_class",
    "register_expert_class",
]
