"""DecentralizedAverager: averages a fixed set of tensors with whichever peers step() at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from hiveengine.averaging.allreduce import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_SENDER_TIMEOUT,
    AllReduceResult,
    AllReduceService,
    run_allreduce,
)
from hiveengine.averaging.group import GroupMember, Mode
from hiveengine.averaging.matchmaking import Matchmaker, MatchmakingConfig
from hiveengine.averaging.state import StateServer, advertise, download, find_sources, retract
from hiveengine.codec import get_codec
from hiveengine.errors import ConfigurationError, HiveEngineError, ProtocolError, TransportError
from hiveengine.transport import Peer

logger = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT = 60.0
RETRACT_TIMEOUT = 5.0  # how long shutdown() tries to withdraw the state advertisement
SERVICE_ATTRIBUTE = "_hiveengine_allreduce_service"


def _service_for(peer) -> AllReduceService:
    """The peer's one all-reduce service (several averagers on one peer share it)."""
    service = getattr(peer, SERVICE_ATTRIBUTE, None)
    if service is None:
        service = AllReduceService(peer)
        setattr(peer, SERVICE_ATTRIBUTE, service)
    return service


class DecentralizedAverager:
    """Keeps `tensors` in one flat buffer and averages it with peers found through `dht` under `prefix`.

    Read or modify the tensors only inside `with averager.get_tensors() as tensors:` — step() rewrites
    them in place. Client-mode peers send and receive but reduce no part; auxiliary peers reduce but
    contribute no data. With `share_state=False` the tensors are never served to peers that load state
    (e.g. gradient buffers, whose values mean nothing to a newcomer).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        dht,
        prefix: str,
        target_group_size: int = 16,
        min_group_size: int = 2,
        codec: str = "int8",
        bandwidth: float | None = None,
        client_mode: bool = False,
        auxiliary: bool = False,
        *,
        matchmaking_time: float = 3.0,
        expected_swarm_size: int | None = None,
        sender_timeout: float = DEFAULT_SENDER_TIMEOUT,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        peer: Peer | None = None,
        share_state: bool = True,
    ):
        if client_mode and auxiliary:
            raise ConfigurationError("a peer cannot be both a client (reduces nothing) and auxiliary (sends nothing)")
        if not tensors:
            raise ConfigurationError("give the averager at least one tensor")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point or len(devices) != 1:
            raise ConfigurationError(
                f"averaged tensors must share one floating dtype and device, got {sorted(map(str, dtypes))} "
                f"on {sorted(map(str, devices))}"
            )
        self.dht, self.prefix = dht, prefix
        self.codec = get_codec(codec)
        self.sender_timeout, self.chunk_elements = sender_timeout, chunk_elements
        self.flat = torch.cat([t.detach().reshape(-1) for t in tensors]).contiguous()
        self._views = [
            v.view_as(t) for v, t in zip(self.flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]
        self.residual = torch.zeros_like(self.flat) if self.codec.supports_error_feedback else None
        mode = Mode.CLIENT if client_mode else Mode.AUX if auxiliary else Mode.NODE
        # Its own peer (same process runtime): the DHT's peer is limited to DHT-sized messages.
        self.peer = peer or Peer()
        self._owns_peer = peer is None
        self.me = GroupMember(self.peer.peer_id, str(self.peer.address), 1.0 if bandwidth is None else bandwidth, mode)
        config = MatchmakingConfig(target_group_size, min_group_size, matchmaking_time, expected_swarm_size)
        self.matchmaker = Matchmaker(dht, prefix, self.me, config)
        self.service = _service_for(self.peer)
        self.tensors_lock = threading.Lock()
        self._closed = False
        self.local_epoch = 0  # rounds this peer's tensors have been through (the newest state wins)
        self.state_metadata: dict = {}  # sent along with the tensors to peers that load state from us
        self.state_server = StateServer(self.peer, self) if share_state and not client_mode else None
        self.peer.runtime.run(self._advertise(), DEFAULT_STEP_TIMEOUT)

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        """The averaged tensors (views into the flat buffer), locked against a concurrent step()."""
        with self.tensors_lock:
            yield self._views

    async def astep(
        self, weight: float = 1.0, timeout: float = DEFAULT_STEP_TIMEOUT, expected_peers: int | None = None
    ) -> AllReduceResult | None:
        """Find a group and average with it; None if no group formed before the deadline. The result's
        `failed_parts` lists parts whose reducer failed (this peer kept its local values there).
        `expected_peers`: how many peers (us included) will step now, if known; once they all registered,
        the group forms without waiting out matchmaking_time."""
        if self._closed:
            raise ConfigurationError("this averager is shut down")
        deadline = time.monotonic() + timeout
        group = await self.matchmaker.find_group(self.local_epoch, deadline, expected_peers)
        if group is None:
            return None
        weight = 0.0 if self.me.mode == Mode.AUX else weight
        await self._lock_tensors()
        try:
            result = await run_allreduce(
                self.service,
                group,
                self.flat,
                self.codec,
                weight=weight,
                residual=self.residual,
                timeout=max(0.1, deadline - time.monotonic()),
                chunk_elements=self.chunk_elements,
                sender_timeout=self.sender_timeout,
            )
        finally:
            self.tensors_lock.release()
        self.local_epoch += 1  # the round happened (parts that failed kept local values)
        await self._advertise()
        logger.info("averaged with %d peers (%d parts failed)", len(group.members), len(result.failed_parts))
        return result

    def step(
        self, weight: float = 1.0, timeout: float = DEFAULT_STEP_TIMEOUT, expected_peers: int | None = None
    ) -> AllReduceResult | None:
        """Blocking twin of `astep`."""
        return self.peer.runtime.run(self.astep(weight, timeout, expected_peers), timeout + DEFAULT_SENDER_TIMEOUT)

    async def _lock_tensors(self) -> None:
        """Take the tensors' (thread) lock without blocking the event loop; if we are cancelled while
        waiting, the lock is released as soon as the waiting thread gets it."""
        acquired = asyncio.get_running_loop().run_in_executor(None, self.tensors_lock.acquire)
        try:
            await asyncio.shield(acquired)
        except asyncio.CancelledError:
            acquired.add_done_callback(lambda _: self.tensors_lock.release())
            raise

    async def _advertise(self) -> None:
        if self.state_server is not None:
            await advertise(self.dht, self.prefix, self.me.address, self.me.peer_id.raw, self.local_epoch)

    def publish_state(self, epoch: int, metadata: dict | None = None, timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        """Declare our tensors to be the state of `epoch` (with `metadata`) and advertise them to newcomers."""
        self.local_epoch = epoch
        if metadata is not None:
            self.state_metadata = metadata
        self.peer.runtime.run(self._advertise(), timeout)

    async def aload_state_from_peers(self, timeout: float = DEFAULT_STEP_TIMEOUT, codec: str = "none") -> dict | None:
        """Replace our tensors with the newest state a peer advertises; return its metadata (None: no peer
        could serve it). With codec="none" the copy is exact; a lossy codec makes the download smaller."""
        deadline = time.monotonic() + timeout
        for epoch, address in await find_sources(self.dht, self.prefix, self.me.peer_id.raw):
            await self._lock_tensors()
            try:
                state = await download(self.peer, address, self.flat, codec, deadline)
            except (TransportError, ProtocolError, TimeoutError) as e:
                logger.warning("could not load state (epoch %d) from %s: %s", epoch, address, e)
                continue
            finally:
                self.tensors_lock.release()
            if self.residual is not None:
                self.residual.zero_()
            self.local_epoch, self.state_metadata = state["epoch"], state["metadata"]
            await self._advertise()
            logger.info("loaded state of epoch %d from %s", self.local_epoch, address)
            return self.state_metadata
        return None

    def load_state_from_peers(self, timeout: float = DEFAULT_STEP_TIMEOUT, codec: str = "none") -> dict | None:
        """Blocking twin of `aload_state_from_peers`."""
        return self.peer.runtime.run(self.aload_state_from_peers(timeout, codec), timeout + 5)

    def shutdown(self) -> None:
        """Stop averaging and withdraw our state advertisement; idempotent. The DHT stays up (it is the caller's)."""
        if not self._closed:
            self._closed = True
            if self.state_server is not None:
                try:
                    self.peer.runtime.run(retract(self.dht, self.prefix, self.me.peer_id.raw), RETRACT_TIMEOUT)
                except (HiveEngineError, TimeoutError) as e:
                    logger.info("could not withdraw the state advertisement: %s", e)
            if self._owns_peer:
                self.peer.shutdown()
