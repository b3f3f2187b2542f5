"""Client side of the Mixture-of-Experts: RemoteExpert, RemoteMixtureOfExperts and the DHT beam search."""

from hiveengine.moe.client.beam_search import ExpertInfo, MoEBeamSearcher
from hiveengine.moe.client.calls import DEFAULT_BACKWARD_TIMEOUT, DEFAULT_FORWARD_TIMEOUT, client_peer
from hiveengine.moe.client.expert import RemoteExpert, get_remote_experts
from hiveengine.moe.client.moe import Dispatch, RemoteMixtureOfExperts
from hiveengine.moe.client.switch import RemoteSwitchMixtureOfExperts

__all__ = [
    "DEFAULT_BACKWARD_TIMEOUT",
    "DEFAULT_FORWARD_TIMEOUT",
    "Dispatch",
    "ExpertInfo",
    "MoEBeamSearcher",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "client_peer",
    "get_remote_experts",
]
