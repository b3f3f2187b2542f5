"""Expert uids: `name.c0.c1...` with integer grid coordinates, patterns like `ffn.[0:4].[0:4]`, DHT prefixes."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Collection, Sequence

from hiveengine.moe.errors import InvalidExpertUIDError

UID_DELIMITER = "."
MAX_UID_LENGTH = 256
MAX_PATTERN_EXPERTS = 1 << 20  # a pattern may describe at most this many uids
_NAME_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_RANGE = re.compile(r"^\[(\d+):(\d+)\]$")


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """`ffn.3.17` -> (`ffn`, (3, 17)): the name (parts before the first number) and the grid coordinates."""
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_LENGTH:
        raise InvalidExpertUIDError(f"expert uid must be a non-empty string of at most {MAX_UID_LENGTH} characters")
    parts = uid.split(UID_DELIMITER)
    first_number = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    name, coords = parts[:first_number], parts[first_number:]
    if not name or not coords or not all(_NAME_PART.match(p) for p in name) or not all(p.isdigit() for p in coords):
        raise InvalidExpertUIDError(
            f"malformed expert uid {uid!r:.80}: expected a name and integer coordinates, e.g. 'ffn.3.17'"
        )
    return UID_DELIMITER.join(name), tuple(int(c) for c in coords)


def uid_prefixes(uid: str) -> list[tuple[str, int]]:
    """The (prefix key, next coordinate) pairs that make `uid` findable level by level: for `ffn.3.17`,
    [(`ffn.`, 3), (`ffn.3.`, 17)]."""
    name, coords = split_uid(uid)
    prefix = name + UID_DELIMITER
    pairs = []
    for c in coords:
        pairs.append((prefix, c))
        prefix += f"{c}{UID_DELIMITER}"
    return pairs


def check_prefix(prefix: str) -> None:
    """Refuse a uid prefix that no uid could have, e.g. `ffn` (it must end with the delimiter)."""
    if not isinstance(prefix, str) or not prefix.endswith(UID_DELIMITER):
        raise InvalidExpertUIDError(f"uid prefix {prefix!r:.80} must end with {UID_DELIMITER!r}, e.g. 'ffn.'")
    split_uid(prefix + "0")


def expand_pattern(pattern: str) -> list[str]:
    """Every uid a pattern describes, in order: `ffn.[0:2].[0:2]` -> ffn.0.0, ffn.0.1, ffn.1.0, ffn.1.1."""
    if not isinstance(pattern, str) or UID_DELIMITER not in pattern:
        raise InvalidExpertUIDError(f"malformed expert pattern {pattern!r:.80}, expected e.g. 'ffn.[0:4].[0:4]'")
    parts = pattern.split(UID_DELIMITER)
    choices: list[Sequence[str]] = []
    for part in parts:
        match = _RANGE.match(part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if low >= high:
                raise InvalidExpertUIDError(f"empty range {part!r} in expert pattern {pattern!r:.80}")
            choices.append([str(c) for c in range(low, high)])
        else:
            choices.append([part])
    total = 1
    for c in choices:
        total *= len(c)
    if total > MAX_PATTERN_EXPERTS:
        raise InvalidExpertUIDError(f"pattern {pattern!r:.80} describes {total} uids; at most {MAX_PATTERN_EXPERTS}")
    uids = [UID_DELIMITER.join(combo) for combo in itertools.product(*choices)]
    for uid in uids:
        split_uid(uid)
    return uids


def uids_from_pattern(
    pattern: str, num_experts: int | None = None, taken: Collection[str] = (), seed: int | None = None
) -> list[str]:
    """`num_experts` uids from `pattern` that are not `taken` (all free ones if None): in order when every free
    uid is wanted, a random sample otherwise (so servers started together spread over the grid)."""
    free = [uid for uid in expand_pattern(pattern) if uid not in taken]
    if num_experts is None or num_experts == len(free):
        return free
    if not 0 < num_experts <= len(free):
        raise InvalidExpertUIDError(
            f"pattern {pattern!r:.80} has {len(free)} free uids, cannot choose {num_experts}; widen the pattern"
        )
    return sorted(random.Random(seed).sample(free, num_experts), key=lambda u: split_uid(u)[1])
