"""Who takes part in one averaging round, and in what role."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hiveengine.transport import PeerID


class Mode(enum.IntEnum):
    """NODE sends data and reduces a part; CLIENT sends but reduces nothing; AUX reduces but sends nothing."""

    NODE = 0
    CLIENT = 1
    AUX = 2


@dataclass(frozen=True)
class GroupMember:
    peer_id: PeerID
    address: str
    bandwidth: float = 1.0
    mode: Mode = Mode.NODE

    @property
    def reduces(self) -> bool:
        """Whether this member owns and averages a part (not a client, and has bandwidth)."""
        return self.mode != Mode.CLIENT and self.bandwidth > 0

    @property
    def contributes(self) -> bool:
        """Whether this member sends its own data (every mode but auxiliary)."""
        return self.mode != Mode.AUX


@dataclass(frozen=True)
class GroupInfo:
    """One round's group: the same members in the same order on every peer, the round's grid number, and
    the metadata each member attached to its registration (`gathered`, by peer id)."""

    group_id: bytes
    members: tuple[GroupMember, ...]
    round: int = 0
    gathered: dict[PeerID, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        ordered = tuple(sorted(self.members, key=lambda m: m.peer_id.raw))
        object.__setattr__(self, "members", ordered)

    @property
    def reducers(self) -> list[GroupMember]:
        """The members that own a part, in the group's order (one part each)."""
        return [m for m in self.members if m.reduces]

    @property
    def senders(self) -> list[GroupMember]:
        """The members whose data is averaged."""
        return [m for m in self.members if m.contributes]

    def member(self, peer_id: PeerID) -> GroupMember | None:
        """The member with `peer_id`, or None if it is not in this group."""
        return next((m for m in self.members if m.peer_id == peer_id), None)
