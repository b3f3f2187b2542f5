"""The DHT's wire protocol over the transport: method names, limits, and how requests and replies are encoded.

Every request and every reply header carries "pv", the DHT protocol version (PROTOCOL_VERSION, bumped by any
change that older nodes cannot follow). A node refuses a request of another version, or of none, before reading
anything else in it, with a ProtocolError that names both versions; a caller treats a reply of another version as
a failed call. So nodes of different versions never enter each other's routing tables or store each other's
records, and bootstrapping from such a node fails with a BootstrapError that names both versions.

Every request header also carries "s", the sender's address, or None for a node in client mode (which must not be
added to routing tables because nobody can dial it), and "n", the nonce that proves the sender's node id (ids.py;
absent in client mode). A contact enters a routing table or a lookup only with a valid proof for the peer id the
transport authenticated (the sender) or that its address names (a contact in a reply).

Records and found values travel as one msgpack blob: a small blob (at most HEADER_BLOB_BYTES) as bytes under "b"
in the header, which spares both sides any tensor handling; a larger one as a uint8 tensor, so values are not
bound by the transport's 64 KiB header limit.

- dht.ping   header {pv, s, n}                 -> {pv, n}
- dht.store  header {pv, s, n}, blob [record…] -> {pv, ok: [bool…]}
                                                  record = [key, subkey, value, expiration, signature]
- dht.find   header {pv, s, n, id, v}          -> {pv}, blob [[[address, nonce]…], values]
                                                  values = None | [[subkey, value, exp, sig]…]

A find made while storing may carry the records as a blob: a node that counts itself among the k closest to the
id stores them at once and adds {ok: [bool…]} to its reply, which saves the store round trip to it.
"""

from __future__ import annotations

import msgpack
import torch

from hiveengine.dht.ids import proven_id
from hiveengine.dht.routing import ID_BYTES, Contact, id_from_bytes
from hiveengine.dht.storage import Record
from hiveengine.errors import ProtocolError
from hiveengine.transport import PeerAddress, Request

KiB, MiB = 1 << 10, 1 << 20

PING, STORE, FIND = "dht.ping", "dht.store", "dht.find"
METHODS = (PING, STORE, FIND)

# The version of this protocol that every request and reply carries under VERSION_FIELD (see the docstring).
PROTOCOL_VERSION = 1
VERSION_FIELD = "pv"

# A serialized value may hold at most this many bytes; larger ones are refused by the writer and by every node.
MAX_VALUE_BYTES = 256 * KiB
# A serialized key or subkey may hold at most this many bytes.
MAX_KEY_BYTES = 4 * KiB
# Records one store request may carry, and the size of any request's or reply's blob.
MAX_RECORDS_PER_STORE = 4096
MAX_BLOB_BYTES = 64 * MiB
MAX_ADDRESS_CHARS = 512
# Blobs up to this size travel inside the message header (kept below the transport's compression threshold).
HEADER_BLOB_BYTES = 3 * KiB
BLOB_FIELD = "b"


def encode_blob(obj) -> tuple[dict, list[torch.Tensor]]:
    """Pack `obj` with msgpack: the header fields and tensors that carry it (refusing more than MAX_BLOB_BYTES)."""
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) <= HEADER_BLOB_BYTES:
        return {BLOB_FIELD: data}, []
    if len(data) > MAX_BLOB_BYTES:
        raise ProtocolError(f"DHT message of {len(data)} bytes exceeds MAX_BLOB_BYTES = {MAX_BLOB_BYTES}")
    return {}, [torch.frombuffer(bytearray(data), dtype=torch.uint8)]


def decode_blob(header: dict, tensors: list[torch.Tensor], what: str):
    """Unpack the msgpack blob a DHT message carries (in its header or as its only tensor); ProtocolError if
    malformed."""
    data = header.get(BLOB_FIELD)
    if data is not None or not tensors:
        if not isinstance(data, bytes) or tensors:
            raise ProtocolError(f"{what} must carry one msgpack blob: bytes under {BLOB_FIELD!r} or one tensor")
    elif len(tensors) != 1 or tensors[0].dtype != torch.uint8 or tensors[0].dim() != 1:
        raise ProtocolError(f"{what} must carry exactly one 1-D uint8 tensor (a msgpack blob)")
    elif tensors[0].numel() > MAX_BLOB_BYTES:
        raise ProtocolError(f"{what}: blob of {tensors[0].numel()} bytes exceeds {MAX_BLOB_BYTES}")
    else:
        data = tensors[0].numpy().tobytes()
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"{what}: undecodable blob ({type(e).__name__})") from None


def versioned(header: dict) -> dict:
    """`header` with this node's protocol version added: every DHT request and reply carries it."""
    return {**header, VERSION_FIELD: PROTOCOL_VERSION}


def foreign_version(header: dict) -> str | None:
    """The protocol version a message carries, as text ("v2", "unversioned"), when it is not ours; None when it is."""
    version = header.get(VERSION_FIELD)
    if type(version) is int and version == PROTOCOL_VERSION:
        return None
    return "unversioned" if version is None else f"v{version!r:.40}"


def version_mismatch(what: str, theirs: str) -> str:
    """The one-line explanation of a message (`what`: "the request", "the reply from ADDRESS") of version
    `theirs`."""
    return (
        f"this DHT node speaks DHT protocol v{PROTOCOL_VERSION}; {what} is {theirs} (nodes of different DHT protocol "
        "versions never mix: every node of a swarm must run a hiveengine release of the same DHT protocol version)"
    )


def record_size_error(record: Record) -> str | None:
    """Why a record breaks the size limits, or None when it fits."""
    if len(record.value) > MAX_VALUE_BYTES:
        return f"the serialized value has {len(record.value)} bytes; MAX_VALUE_BYTES is {MAX_VALUE_BYTES}"
    if len(record.key) > MAX_KEY_BYTES or len(record.subkey or b"") > MAX_KEY_BYTES:
        return f"the serialized key or subkey is longer than MAX_KEY_BYTES = {MAX_KEY_BYTES}"
    return None


def proven_contact(address: PeerAddress, nonce, difficulty: int, text: str | None = None) -> Contact | None:
    """A contact for `address` if `nonce` proves a node id for its peer id at `difficulty`, else None."""
    node = proven_id(address.peer_id.raw, nonce, difficulty)
    return None if node is None else Contact(address, node, nonce, text)


def sender_contact(request: Request, difficulty: int) -> Contact | None:
    """The requester as a contact, if it sent an address that is well formed and really its own, and a nonce
    that proves its node id."""
    text = request.header.get("s")
    if not isinstance(text, str) or len(text) > MAX_ADDRESS_CHARS:
        return None
    try:
        address = PeerAddress.parse(text)
    except ValueError:
        return None
    if address.peer_id != request.sender:
        return None
    return proven_contact(address, request.header.get("n"), difficulty, text)


# ---- the serving side


def check_version(request: Request) -> None:
    """Refuse a request of another protocol version (ProtocolError, which its caller sees): a handler calls this
    first, so neither the sender nor its records get in."""
    theirs = foreign_version(request.header)
    if theirs is not None:
        raise ProtocolError(version_mismatch("the request", theirs))


def parse_store(request: Request) -> list[Record | None]:
    """The records a request carries (None for each malformed one); ProtocolError if the request is malformed."""
    items = decode_blob(request.header, request.tensors, request.method)
    if not isinstance(items, list) or len(items) > MAX_RECORDS_PER_STORE:
        raise ProtocolError(f"{STORE} expects a list of at most {MAX_RECORDS_PER_STORE} records")
    return [Record.from_wire(item) for item in items]


def find_target(request: Request) -> tuple[int, bool]:
    """The target id of a find request and whether values are wanted (its offered records left undecoded)."""
    target = id_from_bytes(request.header.get("id"))
    if target is None:
        raise ProtocolError(f"{FIND} expects 'id': {ID_BYTES} bytes")
    want_values = request.header.get("v", False)
    if not isinstance(want_values, bool):
        raise ProtocolError(f"{FIND} expects 'v' to be a bool")
    return target, want_values


def offers_records(request: Request) -> bool:
    """Whether a find request carries records to store."""
    return bool(request.tensors) or BLOB_FIELD in request.header


def offered_bytes(request: Request) -> int:
    """The bytes of records a store (or a find that offers records) carries, before decoding: what pacing charges."""
    blob = request.header.get(BLOB_FIELD)
    return (len(blob) if isinstance(blob, bytes) else 0) + sum(t.nbytes for t in request.tensors)


def find_reply(
    contacts: list[Contact], records: list[Record] | None, stored: list[bool] | None
) -> tuple[dict, list[torch.Tensor]]:
    """A find's reply: the nearest `contacts`, the target's `records` if values were wanted, and which offered
    records were `stored` if any were offered."""
    values = None if records is None else [r.to_wire_without_key() for r in records]
    header, tensors = encode_blob([[c.to_wire() for c in contacts], values])
    if stored is not None:
        header["ok"] = stored
    return versioned(header), tensors


# ---- the calling side


def reply_version_problem(address: PeerAddress, header: dict) -> str | None:
    """Why a reply from `address` must not be used (it is of another protocol version), or None."""
    theirs = foreign_version(header)
    return None if theirs is None else version_mismatch(f"the reply from {address}", theirs)


def records_blob(records: list[Record]) -> tuple[dict, list[torch.Tensor]]:
    """The header fields and tensors that carry `records` in a store or find request."""
    return encode_blob([r.to_wire() for r in records])


def find_request(sender: dict, target: int, want_values: bool, offer: dict | None = None) -> dict:
    """A find request's header; `sender` holds the sender fields (pv, s, n), `offer` the header fields of records
    offered for storing."""
    return {**sender, "id": target.to_bytes(ID_BYTES, "big"), "v": want_values, **(offer or {})}


def parse_store_reply(header: dict, count: int) -> list[bool]:
    ok = header.get("ok")
    if not isinstance(ok, list) or len(ok) != count:
        raise ProtocolError(f"{STORE} reply must list {count} results")
    return [item is True for item in ok]


def parse_find_reply(header: dict, tensors: list[torch.Tensor], key: bytes | None, max_nodes: int, offered: int):
    """([address, nonce] pairs, records or None, stored or None) from a find reply; malformed entries are skipped
    (the contacts are parsed and their proofs checked by the caller, which skips those it has seen already)."""
    stored = header.get("ok")
    if stored is not None:
        stored = parse_store_reply(header, offered)
    reply = decode_blob(header, tensors, f"{FIND} reply")
    if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[0], list):
        raise ProtocolError(f"{FIND} reply must be [addresses, values]")
    addresses = [item for item in reply[0][:max_nodes] if _contact_item(item)]
    records = None
    if key is not None and isinstance(reply[1], list):
        records = [r for r in (Record.from_wire_with_key(key, item) for item in reply[1]) if r is not None]
    return addresses, records, stored


def _contact_item(item) -> bool:
    return isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and len(item[0]) <= MAX_ADDRESS_CHARS


def contact_from_wire(item: list, difficulty: int) -> Contact | None:
    """The contact an [address, nonce] pair from a find reply names, or None when it is malformed or its nonce
    does not prove its node id."""
    try:
        address = PeerAddress.parse(item[0])
    except ValueError:
        return None
    return proven_contact(address, item[1], difficulty, item[0])
