"""Expert uids, uid patterns and the DHT prefixes that make grid experts findable.

The grammar follows hivemind's, so that uids that work there work here:

- **Any uid** is a string of 1 to MAX_UID_LENGTH characters with no control characters (newlines, tabs, NUL...),
  no line or paragraph separators and no lone surrogates (a uid travels in msgpack headers, DHT keys, log lines
  and checkpoint file names), that does not end with UID_DELIMITER (keys ending with it are the prefixes under
  which grid experts are declared). Anything else is allowed: `transformer::encoder.2`, `0.1.2`, `专家.3`, `my expert`.
  `RemoteExpert`, `ExpertBackend` and `Server` accept every such uid.
- **A grid uid** is a name followed by one or more integer coordinates, joined by UID_DELIMITER (`.`):
  `ffn.3.17` is the name `ffn` with coordinates (3, 17); `0.1.2` is the name `0` with (1, 2); `layer.mlp.0` is
  the name `layer.mlp` with (0,). The name is the first part plus every later part before the trailing run of
  integer parts. A uid whose last part is made of ASCII digits (after at least one delimiter) is taken as a grid
  uid and must be a valid one; other uids (`ffn`, `ffn.x`, `ffn.-1`) are plain uids.
  A server declares a grid uid in the DHT under the uid's key (declarations.expert_key) and under each of its
  prefixes' (`ffn.` with subkey 3, `ffn.3.` with subkey 17), which is what `RemoteMixtureOfExperts`' beam search
  walks; a plain uid is declared under the uid's key only (`get_experts` and `get_remote_experts` find it; a beam
  search cannot).

Restrictions on grid uids, each needed by the beam search, which rebuilds a uid as `prefix + str(coordinate)`:

- coordinates are ASCII decimal integers without leading zeros (`ffn.01` would be found as `ffn.1`, a uid
  nobody serves), at most MAX_COORDINATE (the DHT stores them as 64-bit msgpack integers);
- no part of the name is empty (`ffn..3`, `.3`), as in hivemind.

Beyond hivemind, a grid uid's name may contain the delimiter (`layer.mlp.0`); hivemind allows one part only.
Patterns such as `ffn.[0:4].[0:4]` describe sets of grid uids for servers to choose from.
"""

from __future__ import annotations

import itertools
import random
import re
import unicodedata
from collections.abc import Collection, Sequence

from hiveengine.dht.schemas import GRID_DELIMITER
from hiveengine.moe.errors import InvalidExpertUIDError

UID_DELIMITER = GRID_DELIMITER  # "."; DHT nodes tell a grid prefix's key by it (hiveengine.dht.schemas)
MAX_UID_LENGTH = 256  # characters; a uid is repeated in every request header and DHT record
MAX_COORDINATE = (1 << 63) - 1  # grid coordinates are DHT subkeys, stored as signed 64-bit msgpack integers
MAX_PATTERN_EXPERTS = 1 << 20  # a pattern may describe at most this many uids
FORBIDDEN_CATEGORIES = {
    "Cc": "a control character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_COORDINATE = re.compile(r"[0-9]+", re.ASCII)
_RANGE = re.compile(r"^\[(\d+):(\d+)\]$", re.ASCII)
_EXAMPLES = "e.g. 'ffn.3.17' or 'transformer::encoder.2'"


def check_uid(uid: object) -> str:
    """Return `uid` if it is a valid expert uid (see the module docstring); raise InvalidExpertUIDError naming the
    problem otherwise. A uid that looks like a grid uid (last part numeric) must also be a valid grid uid."""
    if not isinstance(uid, str):
        raise InvalidExpertUIDError(f"an expert uid must be a string, got {type(uid).__name__}")
    if not uid:
        raise InvalidExpertUIDError(f"an expert uid must not be empty ({_EXAMPLES})")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidExpertUIDError(
            f"expert uid {uid[:40]!r}... is {len(uid)} characters long; at most {MAX_UID_LENGTH} are allowed"
        )
    for position, char in enumerate(uid):
        what = FORBIDDEN_CATEGORIES.get(unicodedata.category(char))
        if what is not None:
            raise InvalidExpertUIDError(
                f"expert uid {uid!r:.80} contains {what} ({char!r}, U+{ord(char):04X}) at position {position}"
            )
    if uid.endswith(UID_DELIMITER):
        raise InvalidExpertUIDError(
            f"expert uid {uid!r:.80} ends with {UID_DELIMITER!r}: that is a uid prefix (the experts below it are "
            f"declared under its DHT key), not a uid"
        )
    if is_grid_uid(uid):
        _split_grid(uid)
    return uid


def is_grid_uid(uid: str) -> bool:
    """Whether `uid` has the form of a grid uid: a delimiter, then a last part of ASCII digits."""
    _, delimiter, last = uid.rpartition(UID_DELIMITER)
    return bool(delimiter) and _COORDINATE.fullmatch(last) is not None


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """A grid uid's name and coordinates: `ffn.3.17` -> (`ffn`, (3, 17)), `0.1.2` -> (`0`, (1, 2)),
    `layer.mlp.0` -> (`layer.mlp`, (0,)). Raises InvalidExpertUIDError for anything that is not a grid uid."""
    check_uid(uid)
    if not is_grid_uid(uid):
        raise InvalidExpertUIDError(
            f"{uid!r:.80} is not a grid expert uid: expected a name and integer coordinates, e.g. 'ffn.3.17' "
            "(only grid uids can be found by a beam search)"
        )
    return _split_grid(uid)


def _split_grid(uid: str) -> tuple[str, tuple[int, ...]]:
    parts = uid.split(UID_DELIMITER)
    first_coordinate = len(parts)
    while first_coordinate > 1 and _COORDINATE.fullmatch(parts[first_coordinate - 1]):
        first_coordinate -= 1
    name, coords = parts[:first_coordinate], parts[first_coordinate:]
    if any(not part for part in name):
        raise InvalidExpertUIDError(
            f"expert uid {uid!r:.80} has an empty name part; a grid uid is a name and integer coordinates, "
            "e.g. 'ffn.3.17'"
        )
    for c in coords:
        if len(c) > 1 and c[0] == "0":
            raise InvalidExpertUIDError(
                f"expert uid {uid!r:.80}: coordinate {c!r} has a leading zero; write {int(c)} (a beam search "
                "finds experts by integer coordinates, so it would look for another uid)"
            )
        if int(c) > MAX_COORDINATE:
            raise InvalidExpertUIDError(f"expert uid {uid!r:.80}: coordinate {c} exceeds {MAX_COORDINATE}")
    return UID_DELIMITER.join(name), tuple(int(c) for c in coords)


def uid_prefixes(uid: str) -> list[tuple[str, int]]:
    """The (prefix key, next coordinate) pairs that make a grid uid findable level by level: for `ffn.3.17`,
    [(`ffn.`, 3), (`ffn.3.`, 17)]."""
    name, coords = split_uid(uid)
    prefix = name + UID_DELIMITER
    pairs = []
    for c in coords:
        pairs.append((prefix, c))
        prefix += f"{c}{UID_DELIMITER}"
    return pairs


def check_prefix(prefix: str) -> None:
    """Refuse a uid prefix that no grid uid could have, e.g. `ffn` (it must end with the delimiter)."""
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
