"""Kademlia routing: 256-bit node ids, XOR distance, k-buckets and the routing table built from them."""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict

from hiveengine.transport import PeerAddress

ID_BITS = 256
ID_BYTES = ID_BITS // 8


def key_id(serialized_key: bytes) -> int:
    """The 256-bit id a serialized key is stored under: its SHA-256."""
    return int.from_bytes(hashlib.sha256(serialized_key).digest(), "big")


def id_to_bytes(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


def id_from_bytes(raw) -> int | None:
    """The id in a wire field, or None when the field is not exactly ID_BYTES bytes."""
    if isinstance(raw, bytes) and len(raw) == ID_BYTES:
        return int.from_bytes(raw, "big")
    return None


def bucket_index(local: int, other: int) -> int:
    """Which bucket of `local`'s table holds `other`: floor(log2(local XOR other)); -1 for itself."""
    return (local ^ other).bit_length() - 1


def random_id_in_bucket(local: int, index: int) -> int:
    """A random id whose distance from `local` falls in bucket `index` (used to refresh that bucket)."""
    return local ^ ((1 << index) | random.getrandbits(index))


class Contact:
    """A remote DHT node: how to reach it, its node id and the nonce that proves it (ids.py), when we last heard
    from it. Build contacts from the network with protocol.proven_contact, which checks the proof."""

    __slots__ = ("address", "id", "last_seen", "nonce", "text")

    def __init__(self, address: PeerAddress, node_id: int, nonce: int, text: str | None = None):
        self.address = address
        self.id = node_id
        self.nonce = nonce
        self.text = text or str(address)  # the address as sent on the wire (formatting it is not free)
        self.last_seen = time.monotonic()

    @property
    def peer(self) -> bytes:
        """The raw peer id (the hash of the key the transport authenticates)."""
        return self.address.peer_id.raw

    def to_wire(self) -> list:
        """[address, nonce], as find replies list contacts."""
        return [self.text, self.nonce]

    def __repr__(self) -> str:
        return f"Contact({self.text})"


class KBucket:
    """Up to k contacts ordered least- to most-recently seen, plus a few replacements for when one dies."""

    def __init__(self, k: int):
        self.k = k
        self.contacts: OrderedDict[int, Contact] = OrderedDict()
        self.replacements: OrderedDict[int, Contact] = OrderedDict()
        self.last_lookup = time.monotonic()

    def __len__(self) -> int:
        return len(self.contacts)

    def touch(self, contact: Contact) -> Contact | None:
        """Record that `contact` is alive. Returns the least-recently-seen contact to ping when the bucket is
        full (the newcomer then waits among the replacements), else None."""
        contact.last_seen = time.monotonic()
        known = self.contacts.get(contact.id)
        if known is not None:
            known.last_seen, known.address = contact.last_seen, contact.address
            self.contacts.move_to_end(contact.id)
            return None
        if len(self.contacts) < self.k:
            self.contacts[contact.id] = contact
            self.replacements.pop(contact.id, None)
            return None
        self.replacements[contact.id] = contact
        self.replacements.move_to_end(contact.id)
        while len(self.replacements) > self.k:
            self.replacements.popitem(last=False)
        return next(iter(self.contacts.values()))

    def remove(self, contact_id: int) -> bool:
        """Drop a contact (it failed to answer) and promote the freshest replacement; True if it was here."""
        self.replacements.pop(contact_id, None)
        if self.contacts.pop(contact_id, None) is None:
            return False
        if self.replacements:
            _, replacement = self.replacements.popitem(last=True)
            self.contacts[replacement.id] = replacement
        return True


class RoutingTable:
    """The k-buckets of one node: bucket i holds contacts at XOR distance in [2**i, 2**(i+1)). One key may prove
    several node ids (ids.py), each at full price; the table still holds at most one of them per peer id."""

    def __init__(self, local_id: int, k: int):
        self.local_id = local_id
        self.k = k
        self.buckets = [KBucket(k) for _ in range(ID_BITS)]
        self._contacts: dict[int, Contact] = {}  # every bucket's contacts (not replacements), for nearest()
        self._ids: dict[bytes, int] = {}  # peer id -> the node id it holds here

    def __len__(self) -> int:
        return len(self._contacts)

    def __contains__(self, contact_id: int) -> bool:
        return contact_id in self._contacts

    def get(self, contact_id: int) -> Contact | None:
        return self._contacts.get(contact_id)

    def has_peer(self, peer: bytes) -> bool:
        """Whether a contact of this raw peer id is in the table (under whichever node id it proved)."""
        return peer in self._ids

    def touch(self, contact: Contact) -> Contact | None:
        """Add or refresh a contact; returns a contact to ping when its bucket is full (see KBucket.touch). A
        contact whose peer id is held under another node id is ignored."""
        index = bucket_index(self.local_id, contact.id)
        if index < 0 or self._ids.get(contact.peer, contact.id) != contact.id:
            return None
        bucket = self.buckets[index]
        stale = bucket.touch(contact)
        if contact.id not in self._contacts and contact.id in bucket.contacts:
            self._contacts[contact.id] = contact
            self._ids[contact.peer] = contact.id
        return stale

    def remove(self, contact_id: int) -> bool:
        index = bucket_index(self.local_id, contact_id)
        if index < 0 or not self.buckets[index].remove(contact_id):
            return False
        contact = self._contacts.pop(contact_id)
        del self._ids[contact.peer]
        self._admit(self.buckets[index])  # a replacement may have been promoted
        return True

    def _admit(self, bucket: KBucket) -> None:
        """Index a promoted replacement; drop one whose peer id is held under another node id (and retry)."""
        while True:
            new = next((c for c in bucket.contacts.values() if c.id not in self._contacts), None)
            if new is None:
                return
            if self._ids.setdefault(new.peer, new.id) == new.id:
                self._contacts[new.id] = new
            else:
                bucket.remove(new.id)

    def nearest(self, target: int, count: int, exclude: int | None = None) -> list[Contact]:
        """The `count` known contacts closest to `target` by XOR distance, closest first."""
        contacts = sorted(self._contacts.values(), key=lambda c: c.id ^ target)
        if exclude is not None and exclude in self._contacts:
            contacts = [c for c in contacts if c.id != exclude]
        return contacts[:count]

    def mark_lookup(self, target: int) -> None:
        """Note that a lookup went through the bucket covering `target` (it need not be refreshed)."""
        index = bucket_index(self.local_id, target)
        if index >= 0:
            self.buckets[index].last_lookup = time.monotonic()

    def stale_buckets(self, max_age: float) -> list[int]:
        """Indices of non-empty buckets without a lookup in the last `max_age` seconds."""
        now = time.monotonic()
        return [i for i, b in enumerate(self.buckets) if b.contacts and now - b.last_lookup > max_age]
