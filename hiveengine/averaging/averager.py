"""DecentralizedAverager: averages a fixed set of tensors with whichever peers step() at the same time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from hiveengine.averaging.allreduce import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_LATE_GRACE,
    DEFAULT_MAX_LINK_ALLOWANCE,
    DEFAULT_SENDER_TIMEOUT,
    MAX_WEIGHT_RATIO,
    AllReduceResult,
    AllReduceService,
    RoundOptions,
    run_allreduce,
)
from hiveengine.averaging.audits import DEFAULT_AUDIT_RATE, DEFAULT_AUDIT_TOLERANCE, Audit
from hiveengine.averaging.matchmaking import GroupInfo, GroupMember, Matchmaker, MatchmakingConfig, Mode, NoReducerError
from hiveengine.averaging.state import (
    DECLARE_STATE_PERIOD,
    STATE_TTL_PERIODS,
    StateServer,
    advertise,
    corroborated,
    download,
    find_sources,
    retract,
    state_digest,
)
from hiveengine.codec import Aggregation, get_codec
from hiveengine.codec.robust import DEFAULT_CLIP_ITERATIONS, DEFAULT_TAU_FACTOR
from hiveengine.dht import DHT
from hiveengine.dht.schemas import reserved_name_problem
from hiveengine.errors import (
    ConfigurationError,
    HiveEngineError,
    ProtocolError,
    TransportError,
    refuse_unknown_options,
)
from hiveengine.transport import Peer, membership

logger = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT = 60.0
RETRACT_TIMEOUT = 5.0  # how long shutdown() tries to withdraw the state advertisement
MATCHMAKING_RETRY_SECONDS = 0.05  # pause between a failed gathering and the next one

# hivemind.averaging.DecentralizedAverager's arguments that hiveengine spells differently, and what to use.
HIVEMIND_SPELLINGS = {
    "averaged_tensors": "tensors= (the first argument)",
    "compression": "codec='none' (or 'fp16', 'bf16', 'int8', 'int4')",
    "state_compression": "load_state_from_peers(codec=...)",
    "min_matchmaking_time": "matchmaking_time=",
    "averaging_expiration": "matchmaking_time=",
    "initial_group_bits": "nothing: groups come from a grid over the gathering's peers",
    "allreduce_timeout": "step(timeout=...)",
    "request_timeout": "nothing: every call has its own deadline",
    "next_chunk_timeout": "sender_timeout=",
    "reducer_timeout": "sender_timeout=",
    "allow_state_sharing": "share_state= (and the allow_state_sharing property at run time)",
    "min_vector_size": "nothing: every reducer gets a part sized by its bandwidth",
    "tensor_infos": "nothing",
    "daemon": "nothing: averagers run on the process's transport thread",
    "start": "nothing: an averager is ready when constructed",
    "shutdown_timeout": "nothing: shutdown() is bounded by its own deadlines",
}


class DecentralizedAverager:
    """Keeps `tensors` in one flat buffer and averages it with peers found through `dht` under `prefix`.

    Read or modify the tensors only inside `with averager.get_tensors() as tensors:` — step() rewrites
    them in place. Client-mode peers send and receive but reduce no part; auxiliary peers reduce but
    contribute no data. The default codec is lossless ("none"); pass codec="int8" etc. to trade precision
    for bandwidth. With `share_state=False` the tensors are never served to peers that load state (e.g.
    gradient buffers, whose values mean nothing to a newcomer); `allow_state_sharing` toggles it at run time.
    Shared state is advertised with its hash, `state_digest(flat, metadata)` (by default of everything; pass
    one that hashes only what must agree between peers), and newcomers load only a hash a quorum attests.

    Reducers defend the round against hostile members: `aggregation="centered_clip"` (the default, for open
    swarms) bounds what any copy can move the result by (clip radius `clip_tau`, or `clip_tau_factor` median
    distances when None; at most `clip_iterations` steps), "mean" averages exactly (trusted swarms); weights
    are capped at `max_weight_ratio` times the group's median, and at `weight_limit(gathered)` of the sender's
    gathered metadata where that is lower (the Optimizer: its signed progress); a NaN/Inf copy excludes only its
    sender; a member whose data is `late_grace` seconds (or as long as the first half took) behind the others' is
    left out of the round, as is a silent reducer's part; both waits add what the links take to move a part (up to
    `max_link_allowance` seconds: long links, such as a satellite's, need several round trips). With
    `verify_reducers=True` every reply is checked against what its reducer claims to have combined
    (hiveengine.averaging.verification); a reducer caught cheating costs its part for that round and lands in
    `banned`, left out of our later rounds. It is off by default because it sits on the round's critical path
    (bench/byzantine.py's 8 peers sharing 2 cores, with CenteredClip: about +10% per training step of
    bench/train.py's language model, +17% to +38% per round of a 2.6k-value model); turn it on in open swarms.
    Where each peer's contribution follows from public data, `audit(sender)`, called while a round runs, returns a
    function that recomputes the flat contribution a sender should send this round (run later, in a worker thread,
    while training goes on: it must take what it reads with it): each sender is then audited with probability
    `audit_rate` (the reducers split the draws, so a peer recomputes about that many contributions per round at
    any group size; with `verify_reducers`, the senders of a part audit its reducer's own copy through its
    claims), and the member that catches one whose copy is more than `audit_tolerance` off bans it
    (hiveengine.averaging.audits).
    A sharing peer renews its state advertisement every `declare_state_period` seconds (it lives four periods), at
    its address then, so it stays findable between rounds however far apart they are.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        dht: DHT,
        prefix: str,
        target_group_size: int | None = 16,
        min_group_size: int = 2,
        codec: str = "none",
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
        aggregation: str = "centered_clip",
        clip_tau: float | None = None,
        clip_tau_factor: float = DEFAULT_TAU_FACTOR,
        clip_iterations: int = DEFAULT_CLIP_ITERATIONS,
        late_grace: float = DEFAULT_LATE_GRACE,
        max_link_allowance: float = DEFAULT_MAX_LINK_ALLOWANCE,
        max_weight_ratio: float = MAX_WEIGHT_RATIO,
        weight_limit: Callable[[Any], float | None] | None = None,
        state_digest: Callable[[torch.Tensor, dict], bytes] = state_digest,
        verify_reducers: bool = False,
        audit: Audit | None = None,
        audit_rate: float = DEFAULT_AUDIT_RATE,
        audit_tolerance: float = DEFAULT_AUDIT_TOLERANCE,
        declare_state_period: float = DECLARE_STATE_PERIOD,
        **unknown,
    ):
        refuse_unknown_options("DecentralizedAverager", unknown, HIVEMIND_SPELLINGS)
        client_mode = client_mode or membership.client_only()  # a client-only member: nobody may dial it
        if client_mode and auxiliary:
            raise ConfigurationError("a peer cannot be both a client (reduces nothing) and auxiliary (sends nothing)")
        if not tensors:
            raise ConfigurationError("give the averager at least one tensor")
        if bandwidth is not None and not (bandwidth >= 0 and math.isfinite(bandwidth)):
            raise ConfigurationError(f"bandwidth must be a finite number ≥ 0, got {bandwidth}")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point or len(devices) != 1:
            raise ConfigurationError(
                f"averaged tensors must share one floating dtype and device, got {sorted(map(str, dtypes))} "
                f"on {sorted(map(str, devices))}"
            )
        if (problem := reserved_name_problem(prefix, "the averaging prefix")) is not None:
            raise ConfigurationError(problem)
        self.dht, self.prefix, self.state_digest = dht, prefix, state_digest
        self.codec = get_codec(codec)
        if not (late_grace > 0 and math.isfinite(late_grace)):
            raise ConfigurationError(f"late_grace must be a positive number of seconds, got {late_grace}")
        if not (max_link_allowance >= 0 and math.isfinite(max_link_allowance)):
            raise ConfigurationError(f"max_link_allowance must be a number of seconds ≥ 0, got {max_link_allowance}")
        if not (max_weight_ratio >= 1 and math.isfinite(max_weight_ratio)):
            raise ConfigurationError(f"max_weight_ratio must be a number ≥ 1, got {max_weight_ratio}")
        if not (declare_state_period > 0 and math.isfinite(declare_state_period)):
            raise ConfigurationError(f"declare_state_period must be positive seconds, not {declare_state_period}")
        self.declare_state_period = declare_state_period
        self.options = RoundOptions(
            chunk_elements=chunk_elements,
            sender_timeout=sender_timeout,
            late_grace=late_grace,
            max_link_allowance=max_link_allowance,
            aggregation=Aggregation(aggregation, clip_tau, clip_tau_factor, clip_iterations),
            max_weight_ratio=max_weight_ratio,
            weight_limit=weight_limit,
            verify=verify_reducers,
            audit=audit,
            audit_rate=audit_rate,
            audit_tolerance=audit_tolerance,
        )
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
        self.service = AllReduceService.of(self.peer)
        self.matchmaker = Matchmaker(
            dht,
            prefix,
            self.me,
            config,
            self.peer,
            banned=self.service.banned.keys,
            accusations=self.service.accusations,
        )
        self.tensors_lock = threading.Lock()
        self._closed = False
        self.local_epoch = 0  # rounds this peer's tensors have been through (the newest state wins)
        self.state_metadata: dict = {}  # sent along with the tensors to peers that load state from us
        self.state_server: StateServer | None = None  # made when sharing is first allowed
        self._sharing = False
        self._declared: tuple[int, bytes] | None = None  # the (epoch, digest) we advertise while sharing
        self._declaring: concurrent.futures.Future | None = None  # renews the advertisement every period
        if share_state and not client_mode:
            self.allow_state_sharing = True

    @property
    def banned(self) -> dict:
        """Peers this peer caught cheating, as reducers or in an audit (peer id -> why): it neither sends to them nor
        averages their copies; matchmaking may leave them out of groups."""
        return self.service.banned

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        """The averaged tensors (views into the flat buffer), locked against a concurrent step()."""
        with self.tensors_lock:
            yield self._views

    @property
    def allow_state_sharing(self) -> bool:
        """Whether peers may download our tensors (load_state_from_peers); settable at run time."""
        return self._sharing

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        if value and self.me.mode == Mode.CLIENT:
            raise ConfigurationError("a client-mode averager cannot share state: nobody can connect to it")
        if value and self.state_server is None:
            self.state_server = StateServer(self.peer, self)
        self._sharing = bool(value)
        self.peer.runtime.run(self._advertise() if value else self._retract(), DEFAULT_STEP_TIMEOUT)
        if value and self._declaring is None:
            self._declaring = self.peer.runtime.submit(self._declare_periodically())
        elif not value and self._declaring is not None:
            self._declaring.cancel()
            self._declaring = None

    async def astep(
        self,
        weight: float = 1.0,
        timeout: float = DEFAULT_STEP_TIMEOUT,
        expected_peers: int | None = None,
        *,
        gather: Any = None,
        scheduled_time: float | None = None,
        key: str = "rounds",
        matchmaking_timeout: float | None = None,
    ) -> AllReduceResult | None:
        """Find a group and average with it; keep looking until `timeout`; None if no group formed in time.

        The result's `failed_parts` lists parts whose reducer failed (this peer kept its local values there)
        and `gathered` maps each member's peer id to the `gather` metadata it passed. `expected_peers`: how
        many peers (us included) step now, if known: the gathering closes once they registered.
        `scheduled_time`: DHT time at which a gathering we open closes. `key`: only peers stepping under
        the same key meet (the Optimizer uses its epoch). `matchmaking_timeout`: stop looking for a group
        after this long (default: `timeout`); the all-reduce may use the rest of `timeout`.
        """
        if self._closed:
            raise ConfigurationError("this averager is shut down")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ConfigurationError(f"weight must be a finite number ≥ 0, got {weight}")
        deadline = time.monotonic() + timeout
        looking_until = min(deadline, time.monotonic() + (matchmaking_timeout or timeout))
        while True:
            try:
                group = await self.matchmaker.find_group(
                    key, self.local_epoch, looking_until, expected_peers, gather, scheduled_time
                )
            except NoReducerError as e:
                logger.warning("cannot average: %s", e)
                return None
            if group is not None:
                return await self.average_in(group, weight, max(0.1, deadline - time.monotonic()))
            if time.monotonic() + MATCHMAKING_RETRY_SECONDS >= looking_until:
                logger.warning("no averaging group formed under %r within %.1f s", key, timeout)
                return None
            await asyncio.sleep(MATCHMAKING_RETRY_SECONDS)

    async def average_in(self, group: GroupInfo, weight: float, timeout: float) -> AllReduceResult:
        """Run one all-reduce round with an already formed `group` (every member must call this too)."""
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
                options=dataclasses.replace(self.options, timeout=timeout),
            )
        finally:
            self.tensors_lock.release()
        self.local_epoch = max(self.local_epoch, group.round) + 1  # the round happened (failed parts kept ours)
        await self._advertise()
        logger.info("averaged with %d peers (%d parts failed)", len(group.members), len(result.failed_parts))
        return result

    def step(
        self,
        weight: float = 1.0,
        timeout: float = DEFAULT_STEP_TIMEOUT,
        expected_peers: int | None = None,
        *,
        gather: Any = None,
        scheduled_time: float | None = None,
        key: str = "rounds",
        matchmaking_timeout: float | None = None,
    ) -> AllReduceResult | None:
        """Blocking twin of `astep`."""
        coro = self.astep(
            weight,
            timeout,
            expected_peers,
            gather=gather,
            scheduled_time=scheduled_time,
            key=key,
            matchmaking_timeout=matchmaking_timeout,
        )
        return self.peer.runtime.run(coro, timeout + DEFAULT_SENDER_TIMEOUT)

    def zero_failed_parts(self, result: AllReduceResult) -> None:
        """Zero the parts of our tensors whose reducer failed in `result` (every survivor of the round lost
        the same parts, so zeroing them keeps the survivors' tensors identical)."""
        with self.tensors_lock:
            for part in result.failed_parts:
                self.flat[slice(*result.spans[part])].zero_()

    def reset_error_feedback(self) -> None:
        """Forget the codec's accumulated rounding error (after our tensors were replaced wholesale)."""
        if self.residual is not None:
            with self.tensors_lock:
                self.residual.zero_()

    async def _lock_tensors(self) -> None:
        """Take the tensors' (thread) lock without blocking the event loop; if we are cancelled while
        waiting, the lock is released as soon as the waiting thread gets it. A free lock is taken at once
        (a hop through the executor costs ~0.1-2 ms, a good part of a small round)."""
        if self.tensors_lock.acquire(blocking=False):
            return
        acquired = asyncio.get_running_loop().run_in_executor(None, self.tensors_lock.acquire)
        try:
            await asyncio.shield(acquired)
        except asyncio.CancelledError:
            acquired.add_done_callback(lambda _: self.tensors_lock.release())
            raise

    @property
    def _state_ttl(self) -> float:
        return STATE_TTL_PERIODS * self.declare_state_period

    async def _advertise(self) -> None:
        if self._sharing:
            epoch = self.local_epoch
            digest = await asyncio.to_thread(self._digest)  # hashing a large state would stall the loop
            self._declared = epoch, digest
            await self._declare(epoch, digest)

    async def _declare(self, epoch: int, digest: bytes) -> None:
        """Advertise the state of `epoch` at our address now (a peer behind a NAT moves when its relay does)."""
        address = str(self.peer.address)
        await advertise(self.dht, self.peer.identity, self.prefix, address, epoch, digest, self._state_ttl)

    async def _declare_periodically(self) -> None:
        """While sharing, renew our last advertisement every declare_state_period: it would lapse between rounds
        further apart than its lifetime (DiLoCo's outer rounds can be minutes apart), and a relayed address goes
        stale when the relay changes."""
        while True:
            await asyncio.sleep(self.declare_state_period)
            if self._sharing and self._declared is not None:
                try:
                    await self._declare(*self._declared)
                except (HiveEngineError, TimeoutError) as e:
                    period = self.declare_state_period
                    logger.info("could not renew the state advertisement (next try in %.0f s): %s", period, e)

    def _digest(self) -> bytes:
        with self.tensors_lock:
            return self.state_digest(self.flat, self.state_metadata)

    async def _retract(self) -> None:
        await retract(self.dht, self.peer.identity, self.prefix, self._state_ttl)

    def publish_state(self, epoch: int, metadata: dict | None = None, timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        """Declare our tensors to be the state of `epoch` (with `metadata`) and advertise them to newcomers."""
        self.local_epoch = epoch
        if metadata is not None:
            self.state_metadata = metadata
        self.peer.runtime.run(self._advertise(), timeout)

    async def aload_state_from_peers(
        self, timeout: float = DEFAULT_STEP_TIMEOUT, codec: str = "none", max_epoch: int | None = None
    ) -> dict | None:
        """Replace our tensors with the state a quorum of peers attests (state.py), downloaded from any of them
        and checked against its hash; return its metadata (None: no attested state could be had). `max_epoch`:
        ignore advertisements of later epochs (the Optimizer passes the epoch its progress corroborates). With
        codec="none" the copy is exact and verified; a lossy codec makes the download smaller, but cannot be
        checked against the hash (its donor is still one of the attesting peers)."""
        deadline = time.monotonic() + timeout
        verify = get_codec(codec).name == "none"
        scratch = torch.empty_like(self.flat)  # a state is verified before it replaces ours
        for sources in corroborated(await find_sources(self.dht, self.prefix, self.me.peer_id), max_epoch=max_epoch):
            for source in sources:
                try:
                    state = await download(self.peer, source.address, scratch, codec, deadline)
                except (TransportError, ProtocolError, TimeoutError) as e:
                    logger.warning("could not load state (epoch %d) from %s: %s", source.epoch, source.address, e)
                    continue
                if verify and await asyncio.to_thread(self.state_digest, scratch, state["metadata"]) != source.digest:
                    logger.warning(
                        "%s sent a state whose hash is not the one %d peers attest for epoch %d; trying another",
                        source.peer_id,
                        len(sources),
                        source.epoch,
                    )
                    continue
                await self._lock_tensors()
                try:
                    self.flat.copy_(scratch)
                finally:
                    self.tensors_lock.release()
                if self.residual is not None:
                    self.residual.zero_()
                self.local_epoch, self.state_metadata = source.epoch, state["metadata"]
                await self._advertise()
                logger.info("loaded state of epoch %d from %s", self.local_epoch, source.address)
                return self.state_metadata
        return None

    def load_state_from_peers(
        self, timeout: float = DEFAULT_STEP_TIMEOUT, codec: str = "none", max_epoch: int | None = None
    ) -> dict | None:
        """Blocking twin of `aload_state_from_peers`."""
        return self.peer.runtime.run(self.aload_state_from_peers(timeout, codec, max_epoch), timeout + 5)

    def shutdown(self) -> None:
        """Stop averaging and withdraw our state advertisement; idempotent. The DHT stays up (it is the caller's)."""
        if not self._closed:
            self._closed = True
            if not self.peer.runtime.loop.is_closed():
                self.peer.runtime.call_soon(self.matchmaker.close)
            if self._declaring is not None:
                self._declaring.cancel()
            if self._sharing:
                try:
                    self.peer.runtime.run(self._retract(), RETRACT_TIMEOUT)
                except (HiveEngineError, TimeoutError) as e:
                    logger.info("could not withdraw the state advertisement: %s", e)
            if self._owns_peer:
                self.peer.shutdown()
