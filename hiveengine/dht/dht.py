"""DHT: the public object. A Kademlia node on the process's transport loop, with blocking and awaitable methods."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from hiveengine.dht import protocol
from hiveengine.dht.ids import solve
from hiveengine.dht.node import DHTConfig, DHTNode
from hiveengine.dht.schemas import SchemaValidator
from hiveengine.dht.serialization import pack as _pack
from hiveengine.dht.serialization import unpack as _unpack
from hiveengine.dht.storage import Entry, Record, ValueWithExpiration, get_dht_time
from hiveengine.dht.validation import CompositeValidator, OwnerSignatureValidator, RecordValidator, owner_marker
from hiveengine.errors import ValueTooLargeError
from hiveengine.transport import Identity, Peer, PeerAddress, TransportLimits, membership

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds a blocking store or get may take when the caller gives no timeout
START_TIMEOUT = 60.0
DHT_LIMITS = TransportLimits(max_frame_bytes=protocol.MAX_BLOB_BYTES, max_inbound_bytes=4 * protocol.MAX_BLOB_BYTES)


def to_user_value(entry: Entry) -> ValueWithExpiration:
    """A found entry as callers see it: the value, or {subkey: ValueWithExpiration} for a dictionary."""
    if entry.plain is not None:
        return ValueWithExpiration(_unpack(entry.plain.value), entry.plain.expiration_time)
    subkeys = {
        _unpack(r.subkey, hashable=True): ValueWithExpiration(_unpack(r.value), r.expiration_time)
        for r in entry.subkeys.values()
    }
    return ValueWithExpiration(subkeys, entry.expiration_time())


class DHT:
    """A DHT node. `DHT(initial_peers=[address, ...])` joins a swarm; with none it starts a new one.

    Blocking methods (`store`, `get`) take `timeout=`; `astore` / `aget` are their awaitable twins, for code
    on the transport loop. Several DHTs can live in one process: they share its transport loop thread.
    In `client_mode` the node dials others but is never added to their routing tables or asked to store.
    """

    def __init__(
        self,
        initial_peers: Iterable[PeerAddress | str] = (),
        start: bool = True,
        *,
        identity: Identity | None = None,
        client_mode: bool = False,
        port: int | None = None,
        announce_host: str | None = None,
        record_validators: Sequence[RecordValidator] = (),
        config: DHTConfig | None = None,
    ):
        self.initial_peers = [str(PeerAddress.parse(p)) for p in initial_peers]
        self.config = config or DHTConfig()
        self.identity = identity or Identity.generate()
        forced = not client_mode and membership.client_only()
        if forced:
            logger.info("this process's membership certificate is client-only: its DHT node runs in client mode")
        self.client_mode = client_mode or forced
        self._port, self._announce_host = port, announce_host
        self._validator = CompositeValidator(
            [SchemaValidator(), OwnerSignatureValidator(self.identity), *record_validators]
        )
        self.peer: Peer | None = None
        self.node: DHTNode | None = None
        self._shut_down = False
        if start:
            self.start()

    # ---- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node and join the swarm (blocking); a no-op if already started."""
        if self.node is not None:
            return
        # the id's proof of work runs here, in the caller's thread, not on the loop other nodes share
        nonce = None if self.client_mode else solve(self.identity.peer_id.raw, self.config.id_difficulty)
        self.peer = Peer(self.identity, port=self._port, announce_host=self._announce_host, limits=DHT_LIMITS)
        self.peer.runtime.run(self._start(nonce), timeout)

    async def _start(self, nonce: int | None) -> None:
        node = DHTNode(self.peer, self._validator, self.config, self.client_mode, id_nonce=nonce)
        try:
            await node.start(self.initial_peers)
        except BaseException:
            await node.aclose()
            await self.peer.aclose()
            raise
        self.node = node

    async def ashutdown(self) -> None:
        """Stop the node and close its peer; idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.node is not None:
            await self.node.aclose()
        if self.peer is not None:
            await self.peer.aclose()

    def shutdown(self) -> None:
        """Blocking twin of `ashutdown`; safe to call twice and after the process's runtime stopped."""
        if self._shut_down or self.peer is None or self.peer.runtime.closed:
            self._shut_down = True
            return
        self.peer.runtime.run(self.ashutdown(), timeout=30)

    def __enter__(self) -> DHT:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- who we are

    @property
    def address(self) -> PeerAddress:
        """The copy-pasteable address other nodes pass as `initial_peers`."""
        return self._started().peer.address

    @property
    def peer_id(self):
        """This node's PeerID (the hash of its public key)."""
        return self.identity.peer_id

    @property
    def owner_marker(self) -> str:
        """Put this text in a key or subkey to make it writable by this node's identity only."""
        return owner_marker(self.identity.public_key)

    @property
    def num_peers(self) -> int:
        """Nodes in the routing table."""
        return self._started().node.num_peers

    @property
    def num_keys(self) -> int:
        """Keys this node stores for the swarm."""
        return self._started().node.num_keys

    def _started(self) -> DHT:
        if self.node is None:
            raise RuntimeError("the DHT is not started; call start() first")
        return self

    def _run(self, make_coro, timeout: float | None):
        runtime = self._started().peer.runtime  # before making the coroutine, so none is left un-awaited
        return runtime.run(make_coro(), DEFAULT_TIMEOUT if timeout is None else timeout)

    # ---- store and get

    def make_record(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> Record:
        """Serialize, size-check and sign a record the way `store` sends it."""
        record = Record(
            _pack(key, "key"),
            None if subkey is None else _pack(subkey, "subkey"),
            _pack(value, "value"),
            float(expiration_time),
        )
        problem = protocol.record_size_error(record)
        if problem is not None:
            raise ValueTooLargeError(f"cannot store under {key!r:.60}: {problem}; store a smaller value")
        return self._validator.sign(record)

    async def astore(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store `value` under `key` (and `subkey`) until `expiration_time` (seconds since the epoch, see
        get_dht_time) on the k nodes closest to the key. True if at least one accepted it. A value already there
        with a later expiration time wins; expired or invalid (e.g. unsigned owned) records are refused."""
        record = self.make_record(key, value, expiration_time, subkey)
        if record.expiration_time <= get_dht_time():
            return False
        if not self._validator.validate(record):
            logger.warning("not storing %r: the record does not pass validation (is it owned by another key?)", key)
            return False
        (accepted,) = await self._started().node.store([record])
        return accepted

    def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None, *, timeout: float | None = None
    ) -> bool:
        """Blocking twin of `astore`; raises RPCTimeoutError after `timeout` seconds."""
        return self._run(lambda: self.astore(key, value, expiration_time, subkey), timeout)

    async def aget(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value under `key` with its expiration time, or None if there is none (or it expired). For a key
        that holds subkeys, a dict {subkey: ValueWithExpiration} of the live ones. With `latest`, ask all of the
        k closest nodes and return the newest; otherwise return the first value found (possibly cached)."""
        entry = await self._started().node.get(_pack(key, "key"), latest)
        return None if entry is None else to_user_value(entry)

    def get(self, key: Any, latest: bool = False, *, timeout: float | None = None) -> ValueWithExpiration | None:
        """Blocking twin of `aget`; raises RPCTimeoutError after `timeout` seconds."""
        return self._run(lambda: self.aget(key, latest), timeout)
