"""DHTNode: one Kademlia node on a transport Peer; serves the DHT's RPCs, runs lookups, replicates and refreshes.

Every method runs on the transport's event loop; many nodes can share it (one process, one loop thread).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from hiveengine.dht import protocol
from hiveengine.dht.ids import DEFAULT_DIFFICULTY, MAX_DIFFICULTY, proven_id, solve
from hiveengine.dht.pacing import MIN_RECORD_CHARGE, StorePacer
from hiveengine.dht.routing import Contact, RoutingTable, key_id, random_id_in_bucket
from hiveengine.dht.serialization import record_problem
from hiveengine.dht.storage import Entry, Record, Storage, get_dht_time
from hiveengine.dht.validation import RecordValidator
from hiveengine.errors import BootstrapError, ConfigurationError, PeerBusyError, ProtocolError, TransportError
from hiveengine.transport import Peer, PeerAddress, PeerID, Request

logger = logging.getLogger(__name__)
# Deadlines adapt to long links: what a link adds (Peer.link_time, from its measured round trip) comes on top of
# the configured ones, which cover the remote's own work (so on a LAN, where a round trip is ~0, only those apply).
MiB = 1 << 20


@dataclass(frozen=True)
class DHTConfig:
    """Tunables of a DHT node; the defaults suit a swarm on one laptop as well as one across the Internet."""

    k: int = 20  # bucket size and replication factor
    alpha: int = 3  # lookup RPCs in flight at once
    # Seconds one DHT RPC may take before its node counts as failed. This, solo_wait and stall_after cover the
    # remote's work; what the link adds, from its measured round trip (Peer.link_time), comes on top.
    rpc_timeout: float = 3.0
    refresh_interval: float = 600.0  # a bucket without a lookup for this long is refreshed
    republish_interval: float = 300.0  # held records are re-replicated to the k closest nodes this often
    republish_margin: float = 1.0  # records expiring sooner than this are not worth republishing
    maintenance_period: float = 5.0  # how often expiry, refresh and republish are checked (with jitter)
    max_stored_bytes: int = 256 * MiB  # records this node holds for others
    # Of those, what one sending peer may hold (Record.nbytes, overhead included); a full store also gives way to
    # lighter senders (storage.Storage), so one identity can neither fill the node nor starve the others.
    max_stored_bytes_per_peer: int = 16 * MiB
    # Store pacing (pacing.py): the bytes of stores this node takes per second from one sender (up to a burst of
    # store_burst_bytes at once) and from all senders together; a faster sender's stores wait, before they are
    # decoded, and one that would wait over max_store_wait seconds is refused. A flood thus costs a bounded share of
    # the node's CPU. Honest writes are far below these rates: each of k replicas gets ~k/N of a swarm's writes
    # (about 20 KB/s for 1000 peers writing 1 KB/s each), and republishing a full store is 256 MiB per
    # republish_interval.
    store_bytes_per_second: float = 2 * MiB
    store_burst_bytes: int = 4 * MiB
    total_store_bytes_per_second: float = 8 * MiB
    total_store_burst_bytes: int = 32 * MiB
    max_store_wait: float = 1.0  # at most half of rpc_timeout counts
    cache_bytes: int = 16 * MiB  # recently fetched values
    republish_concurrency: int = 8
    # A full bucket's least recently seen contact is pinged (so a newcomer may replace it if it is dead) only when
    # it was not heard from for this long: one that answered recently is alive, and pinging it is wasted work.
    probe_after: float = 30.0
    # A get first asks only the closest known node (it usually holds the value; alpha requests would waste the
    # other alpha - 1), and widens to alpha once that one has no value, fails, or is silent for this many seconds.
    solo_wait: float = 0.05
    # Leading zero bits of a node id's proof of work (ids.py): ~0.1 s per node start at 16, and choosing ids near
    # a key costs 2**id_difficulty times more tries. Every node of a swarm must use the same value.
    id_difficulty: int = DEFAULT_DIFFICULTY
    # A get walks this many disjoint paths (S/Kademlia): no node is asked by two paths, so one path free of
    # adversaries finds the value while a minority of the key's closest nodes lie, hide it or stall.
    disjoint_paths: int = 3
    # A lookup request still unanswered after this many seconds no longer holds its path's slot: a node that
    # stalls its replies costs a lookup this long, not rpc_timeout (a late reply is still taken).
    stall_after: float = 0.5
    # A node that lost every contact (each failed an RPC: an outage of its own uplink, say) joins again through
    # its initial peers, at most this often, from maintenance and from any lookup that finds its table empty.
    rejoin_interval: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.id_difficulty <= MAX_DIFFICULTY:
            raise ConfigurationError(
                f"DHTConfig.id_difficulty must be in [0, {MAX_DIFFICULTY}], got {self.id_difficulty}"
            )
        if self.disjoint_paths < 1 or self.stall_after <= 0:
            raise ConfigurationError("DHTConfig.disjoint_paths must be >= 1 and stall_after > 0 (seconds)")
        pacing = ("store_bytes_per_second", "store_burst_bytes", "total_store_bytes_per_second")
        for name in (*pacing, "total_store_burst_bytes", "max_store_wait"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"DHTConfig.{name} must be a positive number, got {value!r}")


class Offer(NamedTuple):
    """Records a store's lookup offers to the nodes it asks, encoded once for all of them."""

    records: list[Record]
    blob: tuple[dict, list[torch.Tensor]]


@dataclass
class ReadBack:
    """What a store's lookup read back (DHTNode.store with `read`): every valid record found, merged into `entry`,
    and for each (subkey, expiration time) how many of the `takers` held it. A taker is a node that stored our
    records in the request that read it (this node too, when it stores first), so a record every taker held was
    written everywhere before ours, and its writer may not have seen ours; one that some taker lacked will see
    ours when its write gets there."""

    entry: Entry
    takers: int = 0
    holders: collections.Counter = field(default_factory=collections.Counter)
    taker_ids: set[int] = field(default_factory=set)  # the peer ids of the takers, as big-endian integers

    def took(self, taker: int, records: Iterable[Record]) -> None:
        """A taker's records (after they were merged into `entry`: those that did not merge are not counted)."""
        self.takers += 1
        self.taker_ids.add(taker)
        for record in records:
            held = self.entry.plain if record.subkey is None else self.entry.subkeys.get(record.subkey)
            if held is not None and held.same_content(record):
                self.holders[record.subkey, record.expiration_time] += 1

    def everywhere(self, record: Record) -> bool:
        """Whether every taker held `record` before ours came."""
        return self.holders[record.subkey, record.expiration_time] >= self.takers


class DHTNode:
    """A Kademlia node: routing table, local storage and cache, RPC handlers, iterative lookups."""

    def __init__(
        self,
        peer: Peer,
        validator: RecordValidator,
        config: DHTConfig,
        client_mode: bool = False,
        id_nonce: int | None = None,
    ):
        """`id_nonce` proves this node's id (ids.solve for the peer's key at config.id_difficulty; solved here,
        blocking, when not given). A client-mode node is never in routing tables and proves nothing."""
        self.peer = peer
        self.validator = validator
        self.config = config
        self.client_mode = client_mode
        self.peer_int = int.from_bytes(peer.peer_id.raw, "big")
        self.nonce, self.id = None, self.peer_int  # a client's id only orders its own lookups
        if not client_mode:
            self.nonce = solve(peer.peer_id.raw, config.id_difficulty) if id_nonce is None else id_nonce
            self.id = proven_id(peer.peer_id.raw, self.nonce, config.id_difficulty)
            if self.id is None:
                raise ValueError(f"id_nonce {id_nonce} does not prove a node id at difficulty {config.id_difficulty}")
        self.table = RoutingTable(self.id, config.k)
        self.storage = Storage(config.max_stored_bytes, max_bytes_per_sender=config.max_stored_bytes_per_peer)
        self.cache = Storage(config.cache_bytes, evict=True)
        self.pacer = StorePacer(
            config.store_bytes_per_second,
            config.store_burst_bytes,
            config.total_store_bytes_per_second,
            config.total_store_burst_bytes,
            min(config.max_store_wait, config.rpc_timeout / 2),  # answered before the caller gives up on this node
        )
        self.my_address = None if client_mode else str(peer.address)
        sender = {"s": None} if client_mode else {"s": self.my_address, "n": self.nonce}
        self._sender = protocol.versioned(sender)  # in every request
        self._pinging: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._watchers: dict[bytes, list[Callable[[Record], None]]] = {}
        self._watched = 0  # records handed to watchers so far
        self._last_failure = "no reply"  # why the latest failed RPC failed (a refused handshake names the swarm)
        self._initial: list[PeerAddress] = []  # the initial peers, to rejoin through (see _rejoin)
        self._last_rejoin = -math.inf
        self._closed = False
        if not client_mode:
            peer.register(protocol.PING, self._on_ping)
            peer.register(protocol.STORE, self._on_store)
            peer.register(protocol.FIND, self._on_find)

    # ---- lifecycle

    async def start(self, initial_peers: Iterable[PeerAddress | str]) -> None:
        """Join the swarm through `initial_peers`: ping them, look up our own id, start maintenance."""
        addresses = [PeerAddress.parse(text) for text in initial_peers]
        addresses = [a for a in addresses if a.peer_id != self.peer.peer_id]
        self._initial = addresses
        if addresses:
            answered = await asyncio.gather(*[self._hello(a) for a in addresses])
            if not any(answered):
                raise BootstrapError(
                    f"none of the {len(addresses)} initial peers answered in time "
                    f"(last: {self._last_failure}); check the addresses, that those DHT nodes are running, and "
                    "for a private swarm this process's membership (HIVEENGINE_SWARM)"
                )
            await self.find_nodes(self.id)
        self._spawn(self._maintain())

    async def _rejoin(self) -> None:
        """With an empty routing table, join again through the initial peers (at most once per rejoin_interval):
        a node whose every contact failed would otherwise stay alone for good."""
        now = time.monotonic()
        if len(self.table) or not self._initial or now - self._last_rejoin < self.config.rejoin_interval:
            return
        self._last_rejoin = now
        answered = sum(await asyncio.gather(*[self._hello(a) for a in self._initial]))
        if answered:
            logger.info("rejoined the DHT through %d initial peer(s) after losing every contact", answered)
            await self.find_nodes(self.id)
        else:
            logger.debug("no initial peer answered a rejoin (%s)", self._last_failure)

    async def aclose(self) -> None:
        """Stop maintenance and background work (the Peer is closed by its owner); idempotent."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- contacts

    def _seen(self, contact: Contact) -> None:
        """A node answered or called us: refresh it in the table; probe the bucket's oldest if it is full and
        was not heard from for `probe_after` seconds."""
        stale = self.table.touch(contact)
        if stale is None or time.monotonic() - stale.last_seen < self.config.probe_after:
            return
        if stale.id not in self._pinging and not self._closed:
            self._pinging.add(stale.id)
            self._spawn(self._probe(stale))

    async def _probe(self, contact: Contact) -> None:
        try:
            await self._ping(contact)  # a dead one is removed, and a waiting replacement takes its place
        finally:
            self._pinging.discard(contact.id)

    def _failed(self, contact: Contact, error: Exception) -> None:
        logger.debug("%s failed: %s: %s", contact.address, type(error).__name__, error)
        self._last_failure = f"{type(error).__name__}: {error}"
        self.table.remove(contact.id)

    async def _rpc(self, contact: Contact, method: str, header: dict, tensors=()) -> tuple[dict, list] | None:
        """Call a node; on success refresh it, on any failure (a reply of another protocol version included) drop
        it from the table and return None. A busy node (PeerBusyError: pacing our stores, or out of room) stays."""
        try:
            timeout = self.config.rpc_timeout + self.peer.link_time(contact.address.peer_id)
            reply = await self.peer.call(contact.address, method, header, tensors, timeout=timeout)
        except PeerBusyError as e:  # alive, but pacing our stores (pacing.py) or out of room: keep it
            logger.debug("%s is busy: %s", contact.address, e)
            return None
        except (TransportError, TimeoutError) as e:
            self._failed(contact, e)
            return None
        problem = protocol.reply_version_problem(contact.address, reply[0])
        if problem is not None:
            self._failed(contact, ProtocolError(problem))
            return None
        self._seen(contact)
        return reply

    async def _ping(self, contact: Contact) -> bool:
        return await self._rpc(contact, protocol.PING, self._sender) is not None

    async def _hello(self, address: PeerAddress) -> bool:
        """Ping an initial peer, whose node id we learn from the nonce it answers with; True if it speaks our
        protocol version and proved its id. The link is opened first, under the dial's own deadlines (a UCX attempt,
        then the TCP wire, which stretches over long links), so that the ping's deadline knows its round trip."""
        try:
            await self.peer.connect(address)
            timeout = self.config.rpc_timeout + self.peer.link_time(address.peer_id)
            reply, _ = await self.peer.call(address, protocol.PING, self._sender, timeout=timeout)
        except (TransportError, TimeoutError) as e:
            self._last_failure = f"{type(e).__name__}: {e}"
            return False
        problem = protocol.reply_version_problem(address, reply)
        if problem is not None:
            self._last_failure = problem
            return False
        contact = protocol.proven_contact(address, reply.get("n"), self.config.id_difficulty)
        if contact is None:
            self._last_failure = (
                f"{address} did not prove a node id at DHTConfig.id_difficulty = {self.config.id_difficulty} "
                "(every node of a swarm must use the same id_difficulty)"
            )
            return False
        self._seen(contact)
        return True

    # ---- lookups

    async def _find(self, contact: Contact, target: int, key: bytes | None, offer: Offer | None):
        fields, tensors = offer.blob if offer is not None else (None, [])
        header = protocol.find_request(self._sender, target, key is not None, fields)
        reply = await self._rpc(contact, protocol.FIND, header, tensors)
        if reply is None:
            return None
        try:
            offered = len(offer.records) if offer is not None else 0
            return protocol.parse_find_reply(reply[0], reply[1], key, self.config.k, offered)
        except ProtocolError as e:
            self._failed(contact, e)
            return None

    async def _lookup(
        self,
        target: int,
        key: bytes | None = None,
        found: Entry | None = None,
        stop_early: bool = False,
        offer: Offer | None = None,
        readback: ReadBack | None = None,
        wide: bool = False,
        paths: int = 1,
    ) -> tuple[list[Contact], dict[int, list[bool]]]:
        """Iterative Kademlia lookup of `target` with `alpha` RPCs in flight (`wide`: k, so a swarm whose nodes
        we all know is asked in one round trip, not k / alpha), over `paths` disjoint paths (S/Kademlia): the
        closest known nodes are dealt round-robin to the paths, each path follows only the contacts its own
        replies name, and a node belongs to the first path that learns of it, so no node is asked twice and a
        liar steers only its own path. Each path runs until the k closest nodes it knows have answered or
        failed. Returns the k closest nodes that answered, and what each node that took the `offer`ed records
        said about each. With `key`, every valid record found is merged into `found`; `stop_early` ends the
        lookup at the first one (and starts with one request in flight, see DHTConfig.solo_wait). Dead nodes
        cost one rpc_timeout each and are skipped, a stalled reply frees its slot after stall_after (each plus what
        the link adds, see Peer.link_time); the lookup never hangs."""
        if not len(self.table):
            await self._rejoin()
        k, difficulty = self.config.k, self.config.id_difficulty
        alpha = k if wide else self.config.alpha
        per_path = -(-alpha // paths)
        solo = stop_early
        self.table.mark_lookup(target)
        start = self.table.nearest(target, k)
        pools: list[dict[int, Contact]] = [{} for _ in range(paths)]  # each path's live candidates
        for i, contact in enumerate(start):
            pools[i % paths][contact.id] = contact
        seen = {c.text for c in start}
        peers = {c.peer for c in start} | {self.peer.peer_id.raw}  # one node id per key (routing.RoutingTable)
        asked: set[int] = set()
        answered: list[Contact] = []
        stored: dict[int, list[bool]] = {}
        pending: dict[asyncio.Task, tuple[Contact, int, float]] = {}  # -> contact, path, when its slot frees
        solo_wait = self.config.solo_wait
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = loop.time()
                busy = [0] * paths
                for _, path, frees in pending.values():
                    busy[path] += frees > now
                for path, pool in enumerate(pools[:1] if solo else pools):
                    width = 1 if solo else per_path
                    for contact in sorted(pool.values(), key=lambda c: c.id ^ target)[:k]:
                        if busy[path] >= width:
                            break
                        if contact.id not in asked:
                            asked.add(contact.id)
                            busy[path] += 1
                            task = asyncio.ensure_future(self._find(contact, target, key, offer))
                            link = self.peer.link_time(contact.address.peer_id)
                            pending[task] = contact, path, now + self.config.stall_after + link
                            solo_wait = self.config.solo_wait + link
                if not pending:
                    break
                frees = [f for _, _, f in pending.values() if f > now]
                wait = solo_wait if solo else (min(frees) - now if frees else None)
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                solo = False
                for task in done:
                    (contact, path, _), result = pending.pop(task), task.result()
                    if result is None:
                        del pools[path][contact.id]
                        continue
                    answered.append(contact)
                    items, records, accepted = result
                    if accepted is not None:
                        stored[contact.id] = accepted
                    for item in items:
                        if item[0] in seen:  # replies overlap a lot: parse and check each address once per lookup
                            continue
                        seen.add(item[0])
                        new = protocol.contact_from_wire(item, difficulty)
                        if new is not None and new.peer not in peers:
                            peers.add(new.peer)
                            pools[path][new.id] = new
                    for record in records or ():
                        self._merge_found(found, record)
                    if readback is not None and accepted is not None and all(accepted):
                        readback.took(int.from_bytes(contact.peer, "big"), records or ())
                if stop_early and found is not None and not found.empty():
                    break
        finally:
            for task in pending:
                task.cancel()
        answered.sort(key=lambda c: c.id ^ target)
        return answered[:k], stored

    async def find_nodes(self, target: int) -> list[Contact]:
        """The k closest live nodes to `target` that the swarm knows of."""
        closest, _ = await self._lookup(target)
        return closest

    # ---- store and get

    def _acceptable(self, record: Record) -> bool:
        return protocol.record_size_error(record) is None and self.validator.validate(record)

    def _merge_found(self, found: Entry, record: Record) -> None:
        """Merge a record a lookup found if it is valid and its value (and subkey) can be read back. Replicas send
        the same record: one already held is not decoded again. Decoding is the reader's cost, bounded by what it
        asked for; storing nodes keep values as opaque bytes."""
        held = found.plain if record.subkey is None else found.subkeys.get(record.subkey)
        if held is not None and held.same_content(record):
            return
        if self._acceptable(record) and self._readable(record):
            found.merge(record)  # as nodes merge: the same whichever reply came first

    def _readable(self, record: Record) -> bool:
        problem = record_problem(record)
        if problem is not None:
            logger.debug("dropping a record that cannot be read back: %s", problem)
        return problem is None

    def _closer_than_all(self, target: int, contacts: Sequence[Contact]) -> bool:
        """Whether this node belongs among the k closest to `target`, given the k closest others found."""
        if self.client_mode:
            return False
        return len(contacts) < self.config.k or (self.id ^ target) < (contacts[-1].id ^ target)

    async def store(
        self, records: Sequence[Record], store_locally: bool = True, read: ReadBack | None = None, wide: bool = False
    ) -> list[bool]:
        """Replicate records of one key to the k closest nodes; for each record, whether any node accepted it.
        The lookup offers the records to the nodes it asks, so only the closest nodes that did not take them
        then (because they did not count themselves among the k closest) get a separate store call.

        With `read`, the same lookup also reads the key: every valid record the asked nodes hold once they took
        ours is merged into `read.entry` (a store and a get in one lookup; see ReadBack for what else it tells).
        This node then stores first, before any request goes out, so two nodes that store-and-read at once
        always see each other's record: whichever of them reaches a node that holds both second reads both
        there (this node's copy counts, as a replica or as a harmless extra). `wide`: ask up to k nodes at once
        (latency-bound writes such as matchmaking registrations)."""
        records = list(records)
        target = key_id(records[0].key)
        blob = protocol.records_blob(records)
        early = None
        if read is not None and store_locally and not self.client_mode:
            early = [self._store_local(r) for r in records]
            held = self.storage.get(target)
            found = [r for r in held.records() if self._readable(r)] if held is not None else []
            for record in found:
                read.entry.merge(record)
            if all(early):
                read.took(self.peer_int, found)
        key, found = (None, None) if read is None else (records[0].key, read.entry)
        closest, stored = await self._lookup(target, key, found, offer=Offer(records, blob), readback=read, wide=wide)
        accepted = [False] * len(records)
        if self._closer_than_all(target, closest):  # then this node is one of the k replicas
            closest = closest[: self.config.k - 1]
            if early is not None:
                accepted = early
            elif store_locally:
                accepted = [self._store_local(r) for r in records]
        for contact in closest:  # copies taken by farther nodes are harmless extras, not successes
            if contact.id in stored:
                accepted = [a or b for a, b in zip(accepted, stored[contact.id], strict=True)]
        header, tensors = {**self._sender, **blob[0]}, blob[1]

        async def send(contact: Contact) -> list[bool]:
            reply = await self._rpc(contact, protocol.STORE, header, tensors)
            try:
                return protocol.parse_store_reply(reply[0], len(records)) if reply else [False] * len(records)
            except ProtocolError as e:
                self._failed(contact, e)
                return [False] * len(records)

        for results in await asyncio.gather(*[send(c) for c in closest if c.id not in stored]):
            accepted = [a or b for a, b in zip(accepted, results, strict=True)]
        return accepted

    async def get(self, key: bytes, latest: bool = False) -> Entry | None:
        """The live records of a key: from local storage or cache at once unless `latest`, otherwise the
        newest found by a lookup (which stops at the first value found unless `latest`)."""
        target = key_id(key)
        found = Entry(key)
        for source in (self.storage, self.cache):
            held = source.get(target)
            if held is not None:
                for record in held.records():  # the storage holds what others stored: read back only what decodes
                    if source is self.cache or self._readable(record):
                        found.merge(record)
                if not latest and not found.empty():
                    return found
        await self._lookup(target, key, found, stop_early=not latest, paths=self.config.disjoint_paths)
        now = get_dht_time()
        found.drop_expired(now)
        if found.empty():
            return None
        for record in found.records():
            self.cache.store(target, record, now)
        return found

    def _store_local(self, record: Record | None, sender: bytes | None = None) -> bool:
        """Store a record here, charged to `sender` (the authenticated peer that sent it; None: this node)."""
        if record is None or not self._acceptable(record):
            return False
        stored = self.storage.store(key_id(record.key), record, sender=sender)
        if stored and record.key in self._watchers:
            self._watched += 1
            for callback in tuple(self._watchers[record.key]):
                try:
                    callback(record)
                except Exception:
                    logger.exception("a watcher of a DHT key failed")
        return stored

    def watch(self, key: bytes, callback: Callable[[Record], None]) -> Callable[[], None]:
        """Call `callback(record)` for every record of the serialized `key` this node stores from now on, for
        others or for itself (valid, live and not older than what it held; its value is not decoded), until the
        returned function is called. A callback runs inside the store, on the loop: it must be quick."""
        watchers = self._watchers.setdefault(key, [])
        watchers.append(callback)

        def unwatch() -> None:
            if callback in watchers:
                watchers.remove(callback)
            if not watchers and self._watchers.get(key) is watchers:
                del self._watchers[key]

        return unwatch

    # ---- RPC handlers

    def _note_sender(self, request: Request) -> Contact | None:
        """The requester, refreshed in the table if it sent its address and a nonce proving its node id."""
        contact = protocol.sender_contact(request, self.config.id_difficulty)
        if contact is not None:
            self._seen(contact)
        return contact

    async def _on_ping(self, request: Request) -> dict:
        protocol.check_version(request)
        self._note_sender(request)
        return protocol.versioned({"n": self.nonce})

    async def _paced_records(self, request: Request) -> list[Record | None]:
        """The records `request` offers, decoded once the sender's store rate allows it (pacing.py): their bytes are
        charged before decoding, and each record at least MIN_RECORD_CHARGE before it is checked. PeerBusyError if
        that would not be soon enough."""
        nbytes = protocol.offered_bytes(request)
        await self._pace(request.sender, nbytes)
        records = protocol.parse_store(request)
        await self._pace(request.sender, len(records) * MIN_RECORD_CHARGE - nbytes)
        return records

    async def _pace(self, sender: PeerID, nbytes: int) -> None:
        if nbytes > 0:
            wait = self.pacer.admit(sender, nbytes)
            if wait > 0:
                await asyncio.sleep(wait)  # the sender's (or everyone's) store rate is spent: pace this store to it

    async def _on_store(self, request: Request) -> dict:
        protocol.check_version(request)
        records = await self._paced_records(request)
        self._note_sender(request)
        return protocol.versioned({"ok": [self._store_local(r, request.sender.raw) for r in records]})

    async def _on_find(self, request: Request):
        protocol.check_version(request)
        target, want_values = protocol.find_target(request)
        requester = self._note_sender(request)
        nearest = self.table.nearest(target, self.config.k, exclude=None if requester is None else requester.id)
        stored = None
        watched = self._watched
        # Offered records are paced and decoded only where they will be kept: a lookup offers them to every node it
        # asks. A paced-out offer still gets its find answered, without "ok" (the storer then sends a STORE).
        if protocol.offers_records(request) and self._closer_than_all(target, nearest):
            try:
                offered = await self._paced_records(request)
            except PeerBusyError as e:
                logger.debug("not storing the records %s offered: %s", request.sender, e)
            else:
                stored = [self._store_local(r, request.sender.raw) for r in offered]
        records = None
        if want_values:
            entry = self.storage.get(target) or self.cache.get(target)
            records = entry.records() if entry is not None else None
        reply = protocol.find_reply(nearest, records, stored)
        if self._watched != watched:  # let whoever a watcher woke run before this reply goes out
            await asyncio.sleep(0)
        return reply

    # ---- maintenance

    async def _maintain(self) -> None:
        """Forever: drop expired records, refresh stale buckets, republish records due for it."""
        while True:
            await asyncio.sleep(self.config.maintenance_period * random.uniform(0.5, 1.5))
            try:
                await self._rejoin()
                self.storage.drop_expired()
                self.cache.drop_expired()
                for index in self.table.stale_buckets(self.config.refresh_interval):
                    await self.find_nodes(random_id_in_bucket(self.id, index))
                await self._republish_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("DHT maintenance failed; retrying next period")

    async def _republish_due(self) -> None:
        """Re-replicate keys nobody re-stored here for a republish interval: each node that holds a key does so
        unless another holder did it first (their store resets our timer), so copies lost to churn come back
        on the current k closest nodes while the record lives."""
        due = self.storage.due(time.monotonic() - self.config.republish_interval)
        if not due:
            return
        limit = asyncio.Semaphore(self.config.republish_concurrency)

        async def republish(entry: Entry) -> None:
            async with limit:
                self.storage.refreshed(key_id(entry.key))
                horizon = get_dht_time() + self.config.republish_margin
                records = [r for r in entry.records() if r.expiration_time > horizon]
                if records:
                    await self.store(records, store_locally=False)

        await asyncio.gather(*[republish(e) for e in due])

    # ---- statistics

    @property
    def num_peers(self) -> int:
        return len(self.table)

    @property
    def num_keys(self) -> int:
        return len(self.storage)
