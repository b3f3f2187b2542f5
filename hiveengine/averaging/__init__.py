"""Decentralized averaging: groups of peers average tensors with a fault-tolerant butterfly all-reduce."""

from hiveengine.averaging.allreduce import (
    CHUNK_METHOD,
    AllReduceError,
    AllReduceResult,
    AllReduceService,
    run_allreduce,
)
from hiveengine.averaging.averager import DecentralizedAverager
from hiveengine.averaging.group import GroupInfo, GroupMember, Mode
from hiveengine.averaging.matchmaking import Matchmaker, MatchmakingConfig
from hiveengine.averaging.partition import chunk_spans, part_spans

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
    "chunk_spans",
    "part_spans",
    "run_allreduce",
]
