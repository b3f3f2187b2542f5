"""Decentralized averaging: groups of peers average tensors with a fault-tolerant, Byzantine-tolerant butterfly
all-reduce. One round in three files: matchmaking.py (the group), allreduce.py (partition, buffers, sending and
reducing), averager.py (the public object); state.py serves newcomers' downloads, a separate concern."""

from hiveengine.averaging.allreduce import (
    CHUNK_METHOD,
    AllReduceError,
    AllReduceResult,
    AllReduceService,
    RoundOptions,
    balanced_shares,
    chunk_spans,
    part_spans,
    run_allreduce,
)
from hiveengine.averaging.averager import DecentralizedAverager
from hiveengine.averaging.matchmaking import GroupInfo, GroupMember, Matchmaker, MatchmakingConfig, Mode
from hiveengine.averaging.verification import ReducerCheatedError

__all__ = [
    "CHUNK_METHOD",
    "AllReduceError",
    "AllReduceResult",
    "AllReduceService",
    "DecentralizedAverager",
    "GroupInfo",
    "GroupMember",
    "Matchmaker",
    "MatchmakingConfig",
    "Mode",
    "ReducerCheatedError",
    "RoundOptions",
    "balanced_shares",
    "chunk_spans",
    "part_spans",
    "run_allreduce",
]
