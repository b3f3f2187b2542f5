"""Expert declarations in the DHT, signed by the server that serves the experts, and how clients read them.

Records (every one names its owner: the text `owner_marker(public key)` of the server's transport identity):
- under the key `expert_key(uid)` (`experts:<uid>`): subkey `marker`, value the server's address;
- for a grid uid, under the key of every uid prefix (`experts:ffn.`, `experts:ffn.3.` for `ffn.3.17`): subkey
  `[next coordinate, marker]`, value the server's address, so a beam search can walk the grid level by level.
Those keys are reserved (hiveengine.dht.schemas): every DHT node refuses a record there that is not signed by the
owner its subkey names, or whose value is not that owner's address.

Construction: the DHT's owner-signed records (hiveengine.dht.validation). A record whose subkey names an owner is
stored by a DHT node, and returned to a reader, only with that owner's Ed25519 signature over the key, subkey,
value and expiration time. The server signs its records with the identity its address names (its transport
Peer's, not its DHT node's). A reader then accepts a record only if the peer id in its address is the hash of the
owner's public key. So nobody can declare an expert at an address whose key they do not hold; a plain value, a
subkey without a marker, or a record whose address names another peer is ignored. Several servers may declare one
uid: each has its own subkey, and readers take the declaration that expires last.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

from hiveengine.dht import DHT, OwnerSignatureValidator, Record, get_dht_time, owner_marker
from hiveengine.dht.schemas import EXPERT_KEY_PREFIX
from hiveengine.dht.validation import named_owners_of
from hiveengine.errors import ConfigurationError
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.moe.uids import check_uid, is_grid_uid, uid_prefixes
from hiveengine.transport import Identity, PeerAddress, PeerID


def expert_key(uid_or_prefix: str) -> str:
    """The DHT key under which an expert uid (or a grid prefix, for the beam search) is declared."""
    return EXPERT_KEY_PREFIX + uid_or_prefix


def declared_by(marker: object, address: object) -> str | None:
    """`address` if it is a peer address whose peer id is the one owner named by `marker` (the owner-marker
    part of a subkey, which the DHT checked was signed by that owner), else None."""
    owners = named_owners_of(marker)
    if len(owners) != 1 or not isinstance(address, str):
        return None
    try:
        parsed = PeerAddress.parse(address)
    except ValueError:
        return None
    return address if parsed.peer_id == PeerID.from_public_key(owners.pop()) else None


def parse_declarations(found) -> str | None:
    """The address a uid's DHT value declares (the signed declaration that expires last), or None."""
    subkeys = found.value if found is not None and isinstance(found.value, dict) else {}
    valid = [
        (item.expiration_time, address)
        for marker, item in subkeys.items()
        if (address := declared_by(marker, item.value)) is not None
    ]
    return max(valid)[1] if valid else None


def parse_successors(found) -> dict[int, str]:
    """A uid prefix's DHT value as {next coordinate: address of a server declaring an expert below it}."""
    subkeys = found.value if found is not None and isinstance(found.value, dict) else {}
    best: dict[int, tuple[float, str]] = {}
    for subkey, item in subkeys.items():
        if not (isinstance(subkey, tuple) and len(subkey) == 2 and type(subkey[0]) is int):
            continue
        coord, marker = subkey
        address = declared_by(marker, item.value)
        if address is not None and (coord not in best or item.expiration_time > best[coord][0]):
            best[coord] = (item.expiration_time, address)
    return {coord: address for coord, (_, address) in best.items()}


def declaration_records(
    dht: DHT, identity: Identity, uids: Sequence[str], address: str, expiration_time: float
) -> list[Record]:
    """The signed records that declare `uids` at `address` (which must name `identity`) until `expiration_time`."""
    if PeerAddress.parse(address).peer_id != identity.peer_id:
        raise ConfigurationError(f"{address} names another peer than the declaring identity {identity.peer_id}")
    marker = owner_marker(identity.public_key)
    items: dict[tuple[str, object], None] = {}
    for uid in uids:
        items[expert_key(check_uid(uid)), marker] = None
        if is_grid_uid(uid):
            items.update({(expert_key(prefix), (coord, marker)): None for prefix, coord in uid_prefixes(uid)})
    signer = OwnerSignatureValidator(identity)
    return [signer.sign(dht.make_record(key, address, expiration_time, subkey)) for key, subkey in items]


async def adeclare_experts(
    dht: DHT, uids: Sequence[str], address: str, expiration_time: float, *, identity: Identity
) -> int:
    """Declare, signed by `identity`, that `address` (which must name `identity`) serves `uids` until
    `expiration_time`. Returns how many records at least one DHT node accepted."""
    if expiration_time <= get_dht_time():
        return 0
    if dht.node is None:
        raise RuntimeError("the DHT is not started; call start() first")
    by_key: dict[bytes, list[Record]] = defaultdict(list)
    for record in declaration_records(dht, identity, uids, address, expiration_time):
        by_key[record.key].append(record)
    results = await asyncio.gather(*[dht.node.store(records) for records in by_key.values()], return_exceptions=True)
    return sum(sum(r) for r in results if isinstance(r, list))


async def aget_experts(dht: DHT, uids: Sequence[str]) -> dict[str, str | None]:
    """The address serving each uid according to its signed DHT declarations (None for uids nobody declares).
    Reads every one of a uid's closest nodes (`latest=True`): a node that holds only forged subkeys (the attacker's
    own, say) must not hide the declarations others hold."""
    found = await asyncio.gather(*[dht.aget(expert_key(uid), latest=True) for uid in uids])
    return {uid: parse_declarations(item) for uid, item in zip(uids, found, strict=True)}


def get_experts(dht: DHT, uids: Sequence[str], timeout: float = DHT_TIMEOUT) -> dict[str, str | None]:
    """Blocking twin of `aget_experts`."""
    return dht.peer.runtime.run(aget_experts(dht, uids), timeout)
