"""Decentralized Mixture-of-Experts: expert servers that batch requests from many clients and declare their experts
in the DHT, and RemoteExpert / RemoteMixtureOfExperts modules that call them with fault tolerance."""

from hiveengine.moe.client import (
    Dispatch,
    ExpertInfo,
    MoEBeamSearcher,
    RemoteExpert,
    RemoteMixtureOfExperts,
    RemoteSwitchMixtureOfExperts,
    get_remote_experts,
)
from hiveengine.moe.declarations import adeclare_experts, aget_experts, expert_key, get_experts
from hiveengine.moe.errors import (
    ExpertError,
    InvalidExpertUIDError,
    NonFiniteReplyError,
    NonFiniteRequestError,
    NotEnoughExpertsError,
    SampleTooLargeError,
    UnknownExpertClassError,
)
from hiveengine.moe.protocol import TensorSchema
from hiveengine.moe.server import (
    EXPERT_CLASSES,
    BackgroundServerInfo,
    BatchingRuntime,
    ExpertBackend,
    Server,
    background_server,
    get_expert_class,
    register_expert_class,
)
from hiveengine.moe.uids import check_uid, expand_pattern, is_grid_uid, split_uid, uids_from_pattern

__all__ = [
    "EXPERT_CLASSES",
    "BackgroundServerInfo",
    "BatchingRuntime",
    "Dispatch",
    "ExpertBackend",
    "ExpertError",
    "ExpertInfo",
    "InvalidExpertUIDError",
    "MoEBeamSearcher",
    "NonFiniteReplyError",
    "NonFiniteRequestError",
    "NotEnoughExpertsError",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "SampleTooLargeError",
    "Server",
    "TensorSchema",
    "UnknownExpertClassError",
    "adeclare_experts",
    "aget_experts",
    "background_server",
    "check_uid",
    "expand_pattern",
    "expert_key",
    "get_expert_class",
    "get_experts",
    "get_remote_experts",
    "is_grid_uid",
    "register_expert_class",
    "split_uid",
    "uids_from_pattern",
]
