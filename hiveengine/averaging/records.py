"""DHT records that speak for an averager (matchmaking registrations, state advertisements), signed by it.

The averager's transport identity, not its DHT node's, is the one that takes part in an all-reduce or serves
state, and the two may differ. So such a record is written under the subkey `[owner:<public key>]` of the
averager's Ed25519 key (hiveengine.dht.validation's owner-signed convention) and carries that key's
signature: Ed25519 over msgpack([SIGNATURE_DOMAIN, key, subkey, value, expiration_time]) (validation.py's
`signed_message`), made with `cryptography`'s Ed25519 through transport.Identity. Every DHT node refuses the
record unless the signature verifies, and every reader checks it again; readers take the peer a record speaks
for only from a subkey that is exactly one owner marker, so a record naming another peer (its raw id, another
key, or junk) speaks for nobody. A peer can still sign lies about itself: what a record claims is checked by
its reader (matchmaking.py, state.py).
"""

from __future__ import annotations

from typing import Any

from hiveengine.dht import DHT, Record, owner_marker
from hiveengine.dht.serialization import unpack
from hiveengine.dht.validation import signed_message, signer_of
from hiveengine.errors import ProtocolError
from hiveengine.transport import Identity, PeerID


def signed_subkey(identity: Identity) -> str:
    """The subkey under which `identity` writes the records that speak for it."""
    return owner_marker(identity.public_key)


def signed_record(dht: DHT, identity: Identity, key: str, value: Any, expiration_time: float) -> Record:
    """A record of `value` under `key` and `identity`'s subkey, signed by `identity` (sized as `dht` sends it)."""
    record = dht.make_record(key, value, expiration_time, signed_subkey(identity))
    signature = identity.sign(signed_message(record))
    return Record(record.key, record.subkey, record.value, record.expiration_time, signature)


async def store_signed(dht: DHT, identity: Identity, key: str, value: Any, expiration_time: float) -> bool:
    """Store a signed record of `value` under `key` (see `signed_record`); whether any node accepted it."""
    (accepted,) = await dht.node.store([signed_record(dht, identity, key, value, expiration_time)])
    return accepted


def record_signer(record: Record) -> PeerID | None:
    """The peer a record (as a DHT node holds it: serialized) speaks for, by its subkey (see `signer_of`)."""
    try:
        return None if record.subkey is None else signer_of(unpack(record.subkey, hashable=True))
    except ProtocolError:
        return None
