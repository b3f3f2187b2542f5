"""Records and the local store: expirations, dictionary values with subkeys, newer-wins, a bounded cache.

Two rules protect what honest peers store from anyone who can write a key:
- a record may live at most MAX_RECORD_TTL from now (an expiration of `inf`, 1e300 or the year 3000 would
  otherwise win every newer-wins contest, forever), and
- a plain value never replaces a live dictionary: a dictionary holds many peers' entries (registrations,
  progress, expert declarations), and one plain value used to wipe them all. It lives until its subkeys
  expire, and a subkey record replaces a plain value whatever its expiration (otherwise anyone could squat a
  key that peers sign their entries under, for up to MAX_RECORD_TTL, with one plain value; and an unsigned
  plain value gains nothing from an expiration that anyone could top).
What a key holds depends on the records that reached it, never on their order: a dictionary beats a plain value
(readers merge replies the same way), and of two versions of one record the later expiration wins, or on a tie the
larger value and signature bytes, so replicas that got the same records in another order hold the same ones.
Stored sizes are counted with RECORD_OVERHEAD_BYTES per record, what a record costs in memory beyond its
payload, so the byte budget bounds real memory; each record is charged to the peer that sent it (Storage).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

SIGNATURE_FIELD_MAX = 256  # bytes a record's signature field may hold on the wire
FLOAT_TYPES = (int, float)
MAX_RECORD_TTL = 24 * 3600.0  # seconds from now a stored record may live at most
RECORD_OVERHEAD_BYTES = 512  # memory a stored record costs beyond its bytes (objects, dict slots; measured ~500)
HEAP_SLACK = 4  # a Storage heap is rebuilt when it holds this many times more items than it indexes


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


def _supersedes(record: Record, current: Record) -> bool:
    """Whether `record` replaces `current`, another version of the same record: it expires later, or at the same
    time with larger (value, signature) bytes, an order every replica agrees on."""
    if record.expiration_time != current.expiration_time:
        return record.expiration_time > current.expiration_time
    return (record.value, record.signature or b"") > (current.value, current.signature or b"")


class Entry:
    """What one key holds: a plain record, or a dictionary of subkey records (never both)."""

    __slots__ = ("key", "plain", "refreshed_at", "subkeys")

    def __init__(self, key: bytes):
        self.key = key
        self.plain: Record | None = None
        self.subkeys: dict[bytes, Record] = {}
        self.refreshed_at = time.monotonic()

    def expiration_time(self) -> float:
        """When the last of its records expires."""
        if self.plain is not None:
            return self.plain.expiration_time
        return max((r.expiration_time for r in self.subkeys.values()), default=float("-inf"))

    def first_expiration(self) -> float:
        """When the first of its records expires."""
        if self.plain is not None:
            return self.plain.expiration_time
        return min((r.expiration_time for r in self.subkeys.values()), default=float("inf"))

    def records(self) -> list[Record]:
        return [self.plain] if self.plain is not None else list(self.subkeys.values())

    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records())

    def merge(self, record: Record) -> bool:
        """Apply newer-wins between versions of one record (`_supersedes`); a plain value never replaces a live
        dictionary, and a subkey always replaces a plain value (records reach here validated). The result is
        the same in any order of arrival. Re-storing an identical record counts as accepted (replication is
        idempotent)."""
        if record.subkey is None:
            if self.subkeys:
                return False  # never wipe a live dictionary with a plain value
            current = self.plain
        else:
            self.plain = None
            current = self.subkeys.get(record.subkey)
        if current is not None:
            if current.same_content(record):
                return True
            if not _supersedes(record, current):
                return False
        if record.subkey is None:
            self.plain = record
        else:
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
    """Records by key id, bounded in bytes in all and per sender. A store refuses new data when full, unless the
    sender holds less than the heaviest sender (then that one's oldest records make room); a cache (`evict=True`)
    forgets its least recently used keys instead.

    Every stored record is charged, in `Record.nbytes`, to the peer that sent it (the authenticated transport
    sender; None: this node itself). A sender may hold at most `max_bytes_per_sender`, so one identity fills at
    most that, and a full store gives way to the lighter senders: the heaviest sender's oldest records go first
    (O(log senders) per eviction), so no one starves others without holding more than they do.

    Every operation costs O(log n) or less, so a flood of stores costs its records and no more: senders by
    usage and keys by first expiration sit in heaps whose stale items are skipped when met and dropped when the
    heap outgrows what it indexes (HEAP_SLACK), each sender's slots in an OrderedDict (oldest first, O(1) either
    end), and a store's keys in the order they were last stored (the republish order)."""

    def __init__(
        self,
        max_bytes: int,
        evict: bool = False,
        max_ttl: float = MAX_RECORD_TTL,
        max_bytes_per_sender: int | None = None,
    ):
        self.max_bytes = max_bytes
        self.evict = evict
        self.max_ttl = max_ttl
        self.max_bytes_per_sender = max_bytes if max_bytes_per_sender is None else max_bytes_per_sender
        self.nbytes = 0
        self.usage: dict[bytes | None, int] = {}  # bytes charged to each sender
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._charges: dict[int, dict[bytes | None, tuple[bytes | None, int]]] = {}  # key id -> subkey -> charge
        self._by_sender: dict[bytes | None, OrderedDict[tuple[int, bytes | None], None]] = {}  # oldest first
        self._heaviest: list[tuple[int, int, bytes | None]] = []  # (-usage, tie-break, sender), stale ones too
        self._pushed: dict[bytes | None, int] = {}  # each sender's usage as last pushed on that heap
        self._expiries: list[tuple[float, int]] = []  # (expiration, key id) per store, stale ones too
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, key_id: int, record: Record, now: float | None = None, sender: bytes | None = None) -> bool:
        """Keep `record` under `key_id` if it is live and newer than what is there, charged to `sender`; True if
        kept (or already held)."""
        now = get_dht_time() if now is None else now
        if not now < record.expiration_time <= now + self.max_ttl:
            return False  # expired, or claims to live longer than any record may
        entry = self._live_entry(key_id, now)
        if entry is None:
            entry = Entry(record.key)
        elif entry.key != record.key:
            return False  # a SHA-256 collision or a lie about the key: keep what we have
        if not self._make_room(record.nbytes, key_id, sender):
            return False
        if not entry.merge(record):
            return False
        self._entries[key_id] = entry
        self._recharge(key_id, entry, record, sender)
        self.refreshed(key_id)
        self._push(self._expiries, (record.expiration_time, key_id), self._reindex_expiries, len(self._entries))
        return True

    def refreshed(self, key_id: int) -> None:
        """Note that `key_id`'s records were stored or republished just now (if it still holds any)."""
        entry = self._entries.get(key_id)
        if entry is not None:
            entry.refreshed_at = time.monotonic()
            self._entries.move_to_end(key_id)

    def due(self, refreshed_before: float) -> list[Entry]:
        """The entries last stored or republished before `refreshed_before` (time.monotonic()), oldest first: a
        store keeps its keys in that order, so this reads just them."""
        found = []
        for entry in self._entries.values():
            if entry.refreshed_at >= refreshed_before:
                break
            found.append(entry)
        return found

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
        entry.drop_expired(now)
        self._recharge(key_id, entry)
        return self._entries.get(key_id)

    def _recharge(self, key_id: int, entry: Entry, stored: Record | None = None, sender: bytes | None = None) -> None:
        """Bring the charges of `key_id` in line with what `entry` holds after a change: release what is gone
        (and the slot `stored` took), charge `stored` to `sender`; forget the entry once it is empty."""
        charges = self._charges.setdefault(key_id, {})
        held = {r.subkey for r in entry.records()}
        for subkey in [s for s in charges if s not in held or (stored is not None and s == stored.subkey)]:
            owner, nbytes = charges.pop(subkey)
            self._charge(owner, -nbytes, key_id, subkey)
        if stored is not None:
            charges[stored.subkey] = (sender, stored.nbytes)
            self._charge(sender, stored.nbytes, key_id, stored.subkey)
        if not charges:
            del self._charges[key_id]
        if entry.empty():
            self._entries.pop(key_id, None)

    def _charge(self, sender: bytes | None, nbytes: int, key_id: int, subkey: bytes | None) -> None:
        self.nbytes += nbytes
        usage = self.usage[sender] = self.usage.get(sender, 0) + nbytes
        slots = self._by_sender.get(sender)
        if slots is None:
            slots = self._by_sender[sender] = OrderedDict()
        if nbytes > 0:
            slots[key_id, subkey] = None
        else:
            slots.pop((key_id, subkey), None)
        if usage <= 0:
            del self.usage[sender]
            del self._by_sender[sender]
            self._pushed.pop(sender, None)
        elif nbytes > 0:  # a decrease is pushed when its stale item comes up (_heaviest_sender)
            self._push_usage(sender, usage)

    def _push_usage(self, sender: bytes | None, usage: int) -> None:
        self._pushed[sender] = usage
        self._push(self._heaviest, (-usage, next(self._order), sender), self._reindex_heaviest, len(self.usage))

    @staticmethod
    def _push(heap: list, item: tuple, reindex: Callable[[], None], indexed: int) -> None:
        """Push `item`; rebuild the heap with `reindex` once stale items make it HEAP_SLACK times the `indexed`
        items it is for."""
        heapq.heappush(heap, item)
        if len(heap) > HEAP_SLACK * (indexed + 1):
            reindex()

    def _reindex_heaviest(self) -> None:
        self._heaviest = [(-usage, next(self._order), sender) for sender, usage in self.usage.items()]
        heapq.heapify(self._heaviest)
        self._pushed = dict(self.usage)

    def _reindex_expiries(self) -> None:
        self._expiries = [(entry.first_expiration(), key_id) for key_id, entry in self._entries.items()]
        heapq.heapify(self._expiries)

    def _heaviest_sender(self) -> bytes | None:
        """The sender charged the most (self.usage must not be empty)."""
        while True:
            negative_usage, _, sender = self._heaviest[0]
            usage = self.usage.get(sender)
            if usage == -negative_usage:
                return sender
            heapq.heappop(self._heaviest)  # stale: that sender's usage fell since
            if usage is not None and self._pushed[sender] != usage:
                self._push_usage(sender, usage)

    def _make_room(self, needed: int, keep: int, sender: bytes | None) -> bool:
        """Whether `needed` more bytes from `sender` fit, after evicting what the policy allows."""
        if not self.evict and self.usage.get(sender, 0) + needed > self.max_bytes_per_sender:
            return False
        while self.nbytes + needed > self.max_bytes:
            if self.evict:
                victim = next((k for k in self._entries if k != keep), None)
                if victim is None:
                    return False
                self._drop(victim, self._entries[victim].records())
                continue
            if not self.usage:
                return False
            heaviest = self._heaviest_sender()
            if heaviest == sender or self.usage[heaviest] <= self.usage.get(sender, 0) + needed:
                return False  # the store is full of peers that hold no more than this sender would
            key_id, subkey = next(iter(self._by_sender[heaviest]))
            entry = self._entries[key_id]
            self._drop(key_id, [r for r in entry.records() if r.subkey == subkey])
        return True

    def _drop(self, key_id: int, records: list[Record]) -> None:
        entry = self._entries[key_id]
        for record in records:
            if record.subkey is None:
                entry.plain = None
            else:
                del entry.subkeys[record.subkey]
        self._recharge(key_id, entry)

    def drop_expired(self, now: float | None = None) -> int:
        """Forget every expired record (reading only the keys that have one); returns how many keys are left."""
        now = get_dht_time() if now is None else now
        while self._expiries and self._expiries[0][0] <= now:
            _, key_id = heapq.heappop(self._expiries)
            entry = self._live_entry(key_id, now)
            if entry is not None:  # a later record replaced the one that expired, or others remain
                self._push(self._expiries, (entry.first_expiration(), key_id), self._reindex_expiries, len(self))
        return len(self._entries)
