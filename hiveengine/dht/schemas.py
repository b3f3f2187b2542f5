"""The shapes of the swarm's own DHT records, checked by every node before it stores one and by every reader.

Five kinds of record speak for a peer, each under a key with a reserved ending (or beginning) and a subkey that
names that peer by its owner marker (validation.py), exactly or after a grid coordinate:
- `<prefix>.matchmaking.<key>`: a matchmaking registration, [address, bandwidth, mode, registered_at,
  gather_until, round, gathered] plus optionally the registrant's DHT node id (averaging/matchmaking.py);
- `<run>.progress`: training progress, [epoch, samples, samples_per_second, time, loss, client_mode, target,
  waiting, auxiliary] (optim/progress.py);
- `<prefix>.state`: a state advertisement, [address, epoch, sha256 digest] (averaging/state.py);
- `experts:<uid>`: an expert declaration, the address of the server that serves the expert (moe/declarations.py);
- `experts:<grid prefix>` (the key ends with "."): a grid successor, under the subkey [coordinate, owner marker],
  the address of a server that serves an expert below that coordinate.

A value of None is a withdrawal and always fits. Any other value must have its kind's shape: counts are
non-negative integers below 2**63, times and rates finite, an address names the peer of the subkey. A node refuses
a record that breaks its kind's shape (a plain value, with no owner, included), so garbage costs the writer its
write and nobody else anything; the owner's signature is checked as for any record. User records should not use
these key endings, nor keys that begin with EXPERT_KEY_PREFIX.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from hiveengine.dht.serialization import unpack
from hiveengine.dht.storage import Record
from hiveengine.dht.validation import RecordValidator, signer_of
from hiveengine.errors import ProtocolError
from hiveengine.transport import PeerID

MAX_COUNT = 2**63 - 1  # epochs, samples and round numbers above this are absurd (and overflow int64 readers)
DIGEST_BYTES = 32  # a state advertisement's SHA-256
# without and with the registrant's DHT node id, then the peers it bans, then its accusations
REGISTRATION_FIELDS = (7, 8, 9, 10)
MAX_VOTED_BANS = 32  # peers one registration may name as banned (the most recently caught)
MAX_ACCUSATIONS = 8  # accusations one registration may name: [accused peer id, evidence digest] (averaging)
EVIDENCE_DIGEST_BYTES = 16
MODES = (0, 1, 2)  # averaging.matchmaking.Mode: NODE, CLIENT, AUX
PROGRESS_FIELDS = 9
# The longest a registrant may claim to have waited for its gathering (gather_until - registered_at): matchmaking_time
# and a scheduled gathering's lead are capped to it. A registration that claims an earlier start (a Sybil's bid to
# sort first when a gathering overfills) is absurd and refused.
MAX_GATHERING_SECONDS = 3600.0
EXPERT_KEY_PREFIX = "experts:"  # expert declarations: the uid or grid prefix follows (moe/declarations.py)
GRID_DELIMITER = "."  # a grid prefix ends with it (moe/uids.py names it UID_DELIMITER)


def reserved_name_problem(name: str, what: str) -> str | None:
    """Why `name` (a `what`: an averaging prefix or a run id) cannot name the swarm's records, or None: under a name
    that begins with EXPERT_KEY_PREFIX they would be judged as expert declarations, and refused."""
    if name.startswith(EXPERT_KEY_PREFIX):
        return f"{what} {name!r} begins with {EXPERT_KEY_PREFIX!r}, which is reserved for expert declarations"
    return None


def is_count(value: object) -> bool:
    """A non-negative integer (not a bool) up to MAX_COUNT."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def is_finite(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def names_peer(address: object, peer_id: PeerID) -> bool:
    """Whether `address` is a string whose last path part is `peer_id` (as peer addresses end)."""
    return isinstance(address, str) and "/" in address and address.rsplit("/", 1)[1] == str(peer_id)


def registration_problem(peer_id: PeerID, value: object) -> str | None:
    """What is wrong with `peer_id`'s matchmaking registration `value`, or None if it has the right shape."""
    if not isinstance(value, list | tuple) or len(value) not in REGISTRATION_FIELDS:
        return f"a registration is a list of {' or '.join(map(str, REGISTRATION_FIELDS))} fields"
    address, bandwidth, mode, registered_at, gather_until, round_number, _, *rest = value
    dht_node, bans = rest[:1], rest[1] if len(rest) > 1 else []
    accusations = rest[2] if len(rest) > 2 else []
    if not names_peer(address, peer_id):
        return "its address names another peer"
    if not (is_finite(bandwidth) and bandwidth >= 0):
        return f"bandwidth {bandwidth!r:.40} is not a finite number ≥ 0"
    if not (isinstance(mode, int) and not isinstance(mode, bool) and mode in MODES):
        return f"mode {mode!r:.40} is not one of {MODES}"
    if not (is_finite(registered_at) and is_finite(gather_until)):
        return "its times are not finite numbers"
    if gather_until - registered_at > MAX_GATHERING_SECONDS:
        return (
            f"it claims to have registered over MAX_GATHERING_SECONDS ({MAX_GATHERING_SECONDS:g}) before its deadline"
        )
    if not is_count(round_number):
        return f"round {round_number!r:.40} is not a count"
    node = dht_node[0] if dht_node else None
    if node is not None and not (isinstance(node, bytes) and len(node) == len(peer_id.raw)):
        return "its DHT node id is not a peer id"
    if not (isinstance(bans, list | tuple) and len(bans) <= MAX_VOTED_BANS):
        return f"its bans are not a list of at most {MAX_VOTED_BANS}"
    if not all(isinstance(b, bytes) and len(b) == len(peer_id.raw) for b in bans):
        return "its bans are not peer ids"
    if not (isinstance(accusations, list | tuple) and len(accusations) <= MAX_ACCUSATIONS):
        return f"its accusations are not a list of at most {MAX_ACCUSATIONS}"
    if not all(_is_accusation(a, len(peer_id.raw)) for a in accusations):
        return "its accusations are not [peer id, evidence digest] pairs"
    return None


def _is_accusation(value: object, id_bytes: int) -> bool:
    if not (isinstance(value, list | tuple) and len(value) == 2):
        return False
    accused, digest = value
    return (
        isinstance(accused, bytes)
        and len(accused) == id_bytes
        and isinstance(digest, bytes)
        and len(digest) == EVIDENCE_DIGEST_BYTES
    )


def progress_problem(value: object) -> str | None:
    """What is wrong with a progress report `value`, or None if it has the right shape."""
    if not isinstance(value, list | tuple) or len(value) != PROGRESS_FIELDS:
        return f"a progress report is a list of {PROGRESS_FIELDS} fields"
    epoch, samples, speed, reported, loss, client, target, waiting, auxiliary = value
    if not all(is_count(c) for c in (epoch, samples, target)):
        return "its epoch, samples and target are not all counts"
    if not (is_finite(speed) and speed >= 0):
        return f"samples per second {speed!r:.40} is not a finite number ≥ 0"
    if not is_finite(reported):
        return "its time is not a finite number"
    if loss is not None and not is_finite(loss):
        return f"loss {loss!r:.40} is neither None nor a finite number"
    if not all(isinstance(flag, bool) for flag in (client, waiting, auxiliary)):
        return "its flags are not booleans"
    return None


def state_ad_problem(peer_id: PeerID, value: object) -> str | None:
    """What is wrong with `peer_id`'s state advertisement `value`, or None if it has the right shape."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        return "a state advertisement is [address, epoch, digest]"
    address, epoch, digest = value
    if not names_peer(address, peer_id):
        return "its address names another peer"
    if not is_count(epoch):
        return f"epoch {epoch!r:.40} is not a count"
    if not (isinstance(digest, bytes) and len(digest) == DIGEST_BYTES):
        return f"its digest is not {DIGEST_BYTES} bytes"
    return None


def address_problem(peer_id: PeerID, value: object) -> str | None:
    """What is wrong with an expert declaration (or grid successor) `value`, or None: it must be an address of
    `peer_id`, the server that signed it."""
    return None if names_peer(value, peer_id) else "its value is not an address of the peer that signed it"


Check = Callable[[PeerID, object], str | None]


@functools.lru_cache(maxsize=4096)
def kind_of(key: bytes) -> str | None:
    """The swarm record kind a serialized key reserves ("registration", "progress", "state", "declaration",
    "successor"), or None."""
    try:
        name = unpack(key)
    except ProtocolError:
        return None
    if not isinstance(name, str):
        return None
    if name.startswith(EXPERT_KEY_PREFIX):
        return "successor" if name.endswith(GRID_DELIMITER) else "declaration"
    if ".matchmaking." in name:
        return "registration"
    if name.endswith(".progress"):
        return "progress"
    if name.endswith(".state"):
        return "state"
    return None


CHECKS: dict[str, Check] = {
    "registration": registration_problem,
    "progress": lambda _, value: progress_problem(value),
    "state": state_ad_problem,
    "declaration": address_problem,
    "successor": address_problem,
}


def owner_named_by(kind: str, subkey: object) -> PeerID | None:
    """The peer a reserved record's subkey names: its owner marker exactly, or for a grid successor
    [coordinate, owner marker] (a coordinate is a count)."""
    if kind != "successor":
        return signer_of(subkey)
    if isinstance(subkey, tuple) and len(subkey) == 2 and is_count(subkey[0]):
        return signer_of(subkey[1])
    return None


def shape_problem(record: Record) -> str | None:
    """What is wrong with a record under a reserved key (see the module docstring), or None if it fits (records
    under other keys always do)."""
    kind = kind_of(bytes(record.key))
    if kind is None:
        return None
    try:
        subkey = None if record.subkey is None else unpack(record.subkey, hashable=True)
        value = unpack(record.value)
    except ProtocolError as e:
        return f"a {kind} record that does not decode: {e}"
    owner = owner_named_by(kind, subkey)
    if owner is None:
        shape = "[coordinate, its owner's marker]" if kind == "successor" else "exactly its owner's marker"
        return f"a {kind} record's subkey must be {shape}"
    if value is None:
        return None
    problem = CHECKS[kind](owner, value)
    return None if problem is None else f"a malformed {kind} record: {problem}"


class SchemaValidator(RecordValidator):
    """Refuses records under the swarm's reserved keys whose value does not have their kind's shape."""

    def validate(self, record: Record) -> bool:
        return shape_problem(record) is None
