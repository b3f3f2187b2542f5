"""Records and the local store: expirations, dictionary values with subkeys, newer-wins, a bounded cache.

Two rules protect what honest peers store from anyone who can write a key:
- a record may live at most MAX_RECORD_TTL from now (an expiration of `inf`, 1e300 or the year 3000 would
  otherwise win every newer-wins contest, forever), and
- a plain value never replaces a live dictionary: a dictionary holds many peers' entries (registrations,
  progress, expert declarations), and one plain value used to wipe them all. It lives until its subkeys
  expire; a subkey record still replaces an older plain value.
Stored sizes are counted with RECORD_OVERHEAD_BYTES per record, what a record costs in memory beyond its
payload, so the byte budget bounds real memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

SIGNATURE_FIELD_MAX = 256  # bytes a record's signature field may hold on the wire
FLOAT_TYPES = (int, float)
MAX_RECORD_TTL = 24 * 3600.0  # seconds from now a stored record may live at most
RECORD_OVERHEAD_BYTES = 512  # memory a stored record costs beyond its bytes (objects, dict slots; measured ~500)


def get_dht_time() -> float:
    """The DHT's clock: wall-clock seconds since the epoch (expiration times are absolute)."""
    return time.time()


class ValueWithExpiration(NamedTuple):
    """A value read from the DHT and the time it expires; for a dictionary key, `value` maps each live
    subkey to its own ValueWithExpiration and `expiration_time` is the latest of theirs."""

    value: Any
    expiration_time: float


@dataclass(slots=True, frozen=True)
class Record:
    """One stored item as it travels: serialized key, subkey (None for a plain value) and value, the
    absolute expiration time, and an optional signature (see validation.py)."""

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration_time: float
    signature: bytes | None = None

    @property
    def nbytes(self) -> int:
        """What storing the record costs: its bytes plus RECORD_OVERHEAD_BYTES."""
        payload = len(self.key) + len(self.subkey or b"") + len(self.value) + len(self.signature or b"")
        return payload + RECORD_OVERHEAD_BYTES

    def to_wire(self) -> list:
        """The record as a msgpack-ready list: [key, subkey, value, expiration_time, signature]."""
        return [self.key, self.subkey, self.value, self.expiration_time, self.signature]

    def to_wire_without_key(self) -> list:
        """The record without its key (replies that answer for one key): [subkey, value, expiration, signature]."""
        return [self.subkey, self.value, self.expiration_time, self.signature]

    @classmethod
    def from_wire(cls, item) -> Record | None:
        """Parse a record sent by another node; None if it is malformed."""
        if not isinstance(item, list) or len(item) != 5 or not isinstance(item[0], bytes):
            return None
        return cls.from_wire_with_key(item[0], item[1:])

    @classmethod
    def from_wire_with_key(cls, key: bytes, item) -> Record | None:
        """Parse `to_wire_without_key()`'s list for `key`; None if it is malformed (the bytes are untrusted)."""
        if not isinstance(item, list) or len(item) != 4:
            return None
        subkey, value, expiration, signature = item
        if not (subkey is None or isinstance(subkey, bytes)) or not isinstance(value, bytes):
            return None
        if not isinstance(expiration, FLOAT_TYPES) or isinstance(expiration, bool) or expiration != expiration:
            return None
        if signature is not None and not (isinstance(signature, bytes) and len(signature) <= SIGNATURE_FIELD_MAX):
            return None
        return cls(key, subkey, value, float(expiration), signature)

    def same_content(self, other: Record) -> bool:
        """Whether `other` holds the same value with the same expiration time."""
        return self.value == other.value and self.expiration_time == other.expiration_time


class Entry:
    """What one key holds: a plain record, or a dictionary of subkey records (never both)."""

    __slots__ = ("key", "plain", "refreshed_at", "subkeys")

    def __init__(self, key: bytes):
        self.key = key
        self.plain: Record | None = None
        self.subkeys: dict[bytes, Record] = {}
        self.refreshed_at = time.monotonic()

    def expiration_time(self) -> float:
        if self.plain is not None:
            return self.plain.expiration_time
        return max((r.expiration_time for r in self.subkeys.values()), default=float("-inf"))

    def records(self) -> list[Record]:
        return [self.plain] if self.plain is not None else list(self.subkeys.values())

    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records())

    def merge(self, record: Record) -> bool:
        """Apply newer-wins: a record replaces what it competes with only if it expires later. A plain value
        competes with the whole dictionary (its latest subkey), a subkey with the plain value or its own
        earlier version. Re-storing an identical record counts as accepted (replication is idempotent)."""
        if record.subkey is None:
            if self.plain is not None and self.plain.same_content(record):
                return True
            if self.subkeys or record.expiration_time <= self.expiration_time():
                return False  # never wipe a live dictionary with a plain value
            self.plain, self.subkeys = record, {}
            return True
        if self.plain is not None:
            if record.expiration_time <= self.plain.expiration_time:
                return False
            self.plain = None
        current = self.subkeys.get(record.subkey)
        if current is not None:
            if current.same_content(record):
                return True
            if record.expiration_time <= current.expiration_time:
                return False
        self.subkeys[record.subkey] = record
        return True

    def drop_expired(self, now: float) -> None:
        if self.plain is not None and self.plain.expiration_time <= now:
            self.plain = None
        expired = [s for s, r in self.subkeys.items() if r.expiration_time <= now]
        for subkey in expired:
            del self.subkeys[subkey]

    def empty(self) -> bool:
        return self.plain is None and not self.subkeys


class Storage:
    """Records by key id, bounded in bytes. A store refuses new data when full; a cache (`evict=True`)
    forgets its least recently used keys instead."""

    def __init__(self, max_bytes: int, evict: bool = False, max_ttl: float = MAX_RECORD_TTL):
        self.max_bytes = max_bytes
        self.evict = evict
        self.max_ttl = max_ttl
        self.nbytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, key_id: int, record: Record, now: float | None = None) -> bool:
        """Keep `record` under `key_id` if it is live and newer than what is there; True if kept (or already held)."""
        now = get_dht_time() if now is None else now
        if not now < record.expiration_time <= now + self.max_ttl:
            return False  # expired, or claims to live longer than any record may
        entry = self._live_entry(key_id, now)
        if entry is None:
            entry = Entry(record.key)
        elif entry.key != record.key:
            return False  # a SHA-256 collision or a lie about the key: keep what we have
        before = entry.nbytes()
        if self.nbytes + record.nbytes > self.max_bytes and not self._make_room(record.nbytes, key_id):
            return False
        if not entry.merge(record):
            return False
        self.nbytes += entry.nbytes() - before
        entry.refreshed_at = time.monotonic()
        self._entries[key_id] = entry
        self._entries.move_to_end(key_id)
        return True

    def get(self, key_id: int, now: float | None = None) -> Entry | None:
        """The live records under `key_id`, or None."""
        entry = self._live_entry(key_id, get_dht_time() if now is None else now)
        if entry is not None and self.evict:
            self._entries.move_to_end(key_id)
        return entry

    def _live_entry(self, key_id: int, now: float) -> Entry | None:
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        before = entry.nbytes()
        entry.drop_expired(now)
        self.nbytes -= before - entry.nbytes()
        if entry.empty():
            del self._entries[key_id]
            return None
        return entry

    def _make_room(self, needed: int, keep: int) -> bool:
        if not self.evict:
            return False
        while self.nbytes + needed > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            if oldest == keep:
                self._entries.move_to_end(keep)
                if len(self._entries) == 1:
                    break
                continue
            self.nbytes -= self._entries.pop(oldest).nbytes()
        return self.nbytes + needed <= self.max_bytes

    def drop_expired(self, now: float | None = None) -> int:
        """Forget every expired record; returns how many keys are left."""
        now = get_dht_time() if now is None else now
        for key_id in list(self._entries):
            self._live_entry(key_id, now)
        return len(self._entries)

    def items(self) -> list[tuple[int, Entry]]:
        return list(self._entries.items())
