"""hiveengine.Optimizer: a drop-in wrapper that trains one model collaboratively with a swarm of peers.

Each `step()` counts this peer's samples; a background heartbeat publishes them in the DHT and reads the
swarm's. The swarm steps every `target_batch_size` samples: each contributing peer accumulates its share
(the target split over the live contributors) and then blocks in `step()` until the others have theirs, so
the swarm overshoots the target by at most one local batch per peer, however fast the loop. If every peer
waits and the target is still not reached (a peer left), the rest is split again. Then the peers of the epoch
average (sync: gradients; DiLoCo: pseudo-gradients, see updates.py), take the same update, and advance.

Every registration carries a fingerprint of the state that must agree (sync: parameters and optimizer
state; DiLoCo: the outer state). When a group's fingerprints differ — peers started from different
initializations, or one missed a round — the same group averages its whole training state right after the
update, so peers end identical whatever their start. `average_state_every=k` also does it every k epochs.
A peer whose epoch is behind the swarm's newest loads parameters, optimizer state and epoch: the state whose
hash a quorum of peers attests, no later than the epoch the progress records corroborate, verified after the
download (averaging/state.py; in DiLoCo the outer state, see optim/state.py). Peers that die are simply
missing from later rounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hiveengine.averaging import DecentralizedAverager, GroupInfo, Mode
from hiveengine.dht import get_dht_time
from hiveengine.dht.schemas import reserved_name_problem
from hiveengine.errors import ConfigurationError, HiveEngineError, refuse_unknown_options
from hiveengine.optim.attendance import PROGRESS_FIELD, Attendance
from hiveengine.optim.progress import EPOCH_LEAD, PeerProgress, ProgressTracker, SwarmProgress
from hiveengine.optim.state import AgreedDigest, TrainingState
from hiveengine.optim.updates import DiLoCoUpdate, SyncUpdate
from hiveengine.transport import Peer

logger = logging.getLogger(__name__)

MODES = ("sync", "diloco")
DILOCO_OUTER_LR = 0.7  # defaults of the DiLoCo paper (Douillard et al., 2023)
DILOCO_OUTER_MOMENTUM = 0.9
DEFAULT_INNER_STEPS = 500
DEFAULT_MATCHMAKING_TIME = 3.0
DEFAULT_PROGRESS_INTERVAL = 1.0  # seconds between heartbeats (progress published, swarm read)
DEFAULT_AVERAGING_TIMEOUT = 60.0
DEFAULT_STATE_TIMEOUT = 120.0
DEFAULT_GRAD_CODEC = "int8"  # gradients tolerate blockwise 8-bit quantization (with error feedback)
DHT_TIMEOUT = 30.0
ROUND_ATTEMPTS = 3  # gatherings a peer tries for one epoch before it steps with its local values
CATCH_UP_RETRY = 5.0  # after a failed state download, train on at our own epoch this long before retrying
PEER_WAIT_POLL = 0.2  # seconds between swarm reads in wait_for_peers()
BOUNDARY_POLL = 0.01  # seconds between swarm reads while waiting at the epoch boundary
STALE_HEARTBEATS = 4  # a peer silent for this many heartbeats (and STALE_MIN_SECONDS) counts as gone
STALE_MIN_SECONDS = 3.0
# A group member's gradient weight (its samples) may exceed what its signed progress allows by this factor: reports
# lag the last steps, and the rate they are extrapolated with is itself an estimate.
WEIGHT_SLACK = 1.5

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

# hivemind.Optimizer's arguments that hiveengine spells differently or does not have, and what to use instead.
HIVEMIND_SPELLINGS = {
    "grad_compression": "codec='int8' (or 'none', 'fp16', 'bf16', 'int4')",
    "state_averaging_compression": "nothing: state averaging is always exact (codec 'none')",
    "load_state_compression": "state_codec='none' (or a lossy codec name)",
    "averager_opts": "the Optimizer's own arguments (target_group_size, min_group_size, matchmaking_time, ...)",
    "tracker_opts": "progress_interval=",
    "delay_optimizer_step": "nothing: hiveengine steps in the caller's thread",
    "delay_grad_averaging": "nothing: hiveengine averages in the caller's thread",
    "delay_state_averaging": "nothing: state is averaged only when peers disagree, or every average_state_every",
    "offload_optimizer": "nothing: parameters and optimizer state share one flat buffer on their device",
    "reuse_grad_buffers": "nothing: gradients are accumulated into the averager's buffers",
    "average_opt_statistics": "nothing: state averaging always includes the optimizer's state",
    "extra_tensors": "nothing (not supported yet)",
    "allreduce_timeout": "averaging_timeout=",
    "shutdown_timeout": "nothing: shutdown() is bounded by its own deadlines",
}


class Optimizer:
    """Wraps a torch optimizer: `loss.backward(); opt.step(); opt.zero_grad()` trains with the swarm.

    `optimizer` is a torch optimizer or a factory taking `params`. Peers with the same `run_id` train the
    same model. `batch_size_per_step` is the number of samples one `step()` stands for (or pass
    `step(batch_size=...)`). In diloco mode, an epoch ends when the swarm has done `inner_steps` steps per
    peer on average, unless `target_batch_size` is given. `scheduler` (an LR scheduler, or a factory taking
    the optimizer) steps once per epoch. Client-mode peers train but accept no connections; auxiliary peers
    contribute no samples but help average. `aggregation`: how reducers combine the group's copies,
    "centered_clip" (the default: a hostile peer moves the result by a bounded amount) or "mean" (exact, for
    trusted swarms).
    """

    def __init__(
        self,
        *,
        dht,
        run_id: str,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        params: Iterable[torch.nn.Parameter] | None = None,
        batch_size_per_step: int | None = None,
        target_batch_size: int | None = None,
        mode: str = "sync",
        codec: str = DEFAULT_GRAD_CODEC,
        inner_steps: int = DEFAULT_INNER_STEPS,
        outer_lr: float = DILOCO_OUTER_LR,
        outer_momentum: float = DILOCO_OUTER_MOMENTUM,
        use_local_updates: bool = False,
        scheduler: torch.optim.lr_scheduler.LRScheduler | Callable | None = None,
        average_state_every: int = 0,
        target_group_size: int | None = 16,
        min_group_size: int = 2,
        matchmaking_time: float = DEFAULT_MATCHMAKING_TIME,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        averaging_timeout: float = DEFAULT_AVERAGING_TIMEOUT,
        load_state_timeout: float = DEFAULT_STATE_TIMEOUT,
        state_codec: str = "none",
        client_mode: bool = False,
        auxiliary: bool = False,
        expected_swarm_size: int | None = None,
        aggregation: str = "centered_clip",
        load_state: bool = True,
        verbose: bool = False,
        **unknown,
    ):
        refuse_unknown_options("Optimizer", unknown, HIVEMIND_SPELLINGS)
        if use_local_updates:
            if mode != "sync" and mode != "diloco":
                raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
            mode, outer_lr, outer_momentum = "diloco", 1.0, 0.0
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if (problem := reserved_name_problem(run_id, "run_id")) is not None:
            raise ConfigurationError(problem)
        if mode == "sync" and not (target_batch_size and target_batch_size > 0):
            raise ConfigurationError("sync mode needs target_batch_size > 0: the swarm steps when it is reached")
        if mode == "diloco" and inner_steps < 1:
            raise ConfigurationError(f"inner_steps must be ≥ 1, got {inner_steps}")
        if batch_size_per_step is not None and batch_size_per_step < 1:
            raise ConfigurationError(f"batch_size_per_step must be ≥ 1, got {batch_size_per_step}")
        if average_state_every < 0:
            raise ConfigurationError(f"average_state_every must be ≥ 0, got {average_state_every}")
        if client_mode and auxiliary:
            raise ConfigurationError("a peer cannot be both client_mode (reduces nothing) and auxiliary (sends none)")
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            if params is None:
                raise ConfigurationError("give params= when optimizer is a factory")
            optimizer = optimizer(list(params))
        if verbose:
            _show_progress_logs()
        self.dht, self.run_id, self.mode, self.inner = dht, run_id, mode, optimizer
        self.batch_size_per_step, self.target_batch_size = batch_size_per_step, target_batch_size
        self.inner_steps, self.average_state_every = inner_steps, average_state_every
        self.progress_interval, self.averaging_timeout = progress_interval, averaging_timeout
        self.matchmaking_time = matchmaking_time
        self.load_state_timeout, self.state_codec = load_state_timeout, state_codec
        self.client_mode, self.auxiliary = client_mode, auxiliary
        self.rule = SyncUpdate(optimizer) if mode == "sync" else DiLoCoUpdate(optimizer, outer_lr, outer_momentum)
        self.scheduler = scheduler(optimizer) if callable(scheduler) and not hasattr(scheduler, "step") else scheduler

        self.epoch = 0  # optimizer steps (sync) or outer steps (diloco) the swarm has taken
        self.samples = 0  # samples this peer accumulated in the current epoch
        self.loss: float | None = None
        self.bytes_averaged = 0  # codec payload bytes this peer sent and received in averaging rounds
        self.rounds = {"averaged": 0, "alone": 0, "caught_up": 0, "state_averaged": 0}
        self.in_agreement = True  # whether our state matched our group's at the last round (or was averaged)

        self.state = TrainingState(optimizer, self.rule.initial_extra())
        self.params = self.state.params
        self.peer = Peer()  # both averagers' (one address for grads and state; the DHT's peer is for the DHT)
        averaging = dict(
            target_group_size=target_group_size,
            min_group_size=min_group_size,
            matchmaking_time=matchmaking_time,
            expected_swarm_size=expected_swarm_size,
            client_mode=client_mode,
            auxiliary=auxiliary,
            peer=self.peer,
            aggregation=aggregation,
        )
        if codec != "none":
            logger.info("averaging gradients with the lossy %r codec (codec='none' averages them exactly)", codec)
        buffers = [torch.zeros_like(p) for p in self.params]
        self.grad_averager = DecentralizedAverager(
            buffers,
            dht,
            f"{run_id}.grads",
            codec=codec,
            share_state=False,
            weight_limit=self._weight_limit,
            **averaging,
        )
        self.state_averager = DecentralizedAverager(
            self.state.tensors,
            dht,
            f"{run_id}.state",
            codec="none",
            share_state=False,  # shared below, once the rule's tensors are bound and can be hashed
            **averaging,
        )
        with self.state_averager.get_tensors() as views:
            self.rule.bind(self.state.bind(views))
            self._agreed = self.rule.agreed_tensors(views)
        if mode == "diloco":
            self.state_averager.state_digest = AgreedDigest(self.state_averager.flat, self._agreed)
        if not (client_mode or auxiliary):  # an auxiliary peer's state is never updated
            self.state_averager.allow_state_sharing = True
        self.tracker = ProgressTracker(dht, run_id, client_mode, auxiliary)
        self._me = dht.peer_id.raw.hex()  # how progress records name this peer
        self.attendance = Attendance(self._me, target_group_size)
        self.swarm = SwarmProgress(0, 0, [])
        self._quota_extra = 0  # samples added to our share when the swarm re-split an unreached target
        self._waiting = False
        self._next_catch_up = -math.inf
        self._closed = False
        self._check()
        if load_state and self.swarm.epoch > self.epoch:
            self._catch_up()
        self.state_averager.publish_state(self.epoch, self._metadata(), DHT_TIMEOUT)
        self._heartbeat = self.peer.runtime.submit(self._beat())

    # ---- the training-loop API

    def step(self, batch_size: int | None = None, loss: float | torch.Tensor | None = None) -> None:
        """Count one local batch (DiLoCo: take an inner step); at our share of the target, wait for the swarm's
        step and take it. Auxiliary peers pass no batch: step() waits for the swarm's next round and joins it."""
        if self.auxiliary:
            self._wait_at_boundary()
            return
        batch_size = batch_size or self.batch_size_per_step
        if not batch_size or batch_size < 1:
            raise ConfigurationError("pass step(batch_size=...) or set batch_size_per_step")
        if loss is not None:
            self.loss = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        self.tracker.count(batch_size)
        with self.grad_averager.get_tensors() as accumulated, self.state_averager.get_tensors():
            self.rule.on_batch(accumulated, batch_size)
        self.samples += batch_size
        if self._out_of_step() and time.monotonic() >= self._next_catch_up:
            self._catch_up()
        elif self.samples >= self._share(self.swarm):
            self._wait_at_boundary()

    def wait_for_peers(self, count: int, timeout: float) -> int:
        """Block until at least `count` peers (us included) report progress, or `timeout` passes; return
        how many were seen. Lets workers started together begin training together."""
        deadline = time.monotonic() + timeout
        while (seen := self._check().size) < count and time.monotonic() < deadline:
            time.sleep(PEER_WAIT_POLL)
        return seen

    def is_synchronized_with_peers(self) -> bool:
        """Whether this peer is at the swarm's newest epoch and its state agreed with its last group's."""
        return self._check().epoch <= self.epoch and self.in_agreement

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """Replace our parameters, optimizer state and epoch with those of the peer with the newest state
        (hivemind's quickstart calls this on joining); False if no peer could send it."""
        return self._catch_up(timeout, bounded=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients, as torch.optim.Optimizer.zero_grad does."""
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (e.g. to change the learning rate)."""
        return self.inner.param_groups

    @property
    def local_epoch(self) -> int:
        """hivemind's name for `epoch`."""
        return self.epoch

    # ---- epochs

    def _target(self, swarm: SwarmProgress) -> int:
        if self.target_batch_size:
            return self.target_batch_size
        return self.inner_steps * (self.batch_size_per_step or 1) * _contributors(swarm)

    def _share(self, swarm: SwarmProgress) -> int:
        """The samples after which we stop and wait: our equal part of the target, plus any re-split rest."""
        return math.ceil(self._target(swarm) / _contributors(swarm)) + self._quota_extra

    def _wait_at_boundary(self) -> None:
        """Wait until the swarm has the target at our epoch, then average and step; return early if the
        others are done too and the target is still short (then the rest is split again)."""
        self._waiting = True
        give_up = time.monotonic() + self.averaging_timeout
        reported = False
        try:
            while True:
                swarm = self._check(report=not reported)  # say once that we wait; then only read
                reported = True
                if self._out_of_step():
                    if time.monotonic() >= self._next_catch_up and self._catch_up():
                        return
                    swarm = _at_epoch(swarm, self.epoch)
                here = [p for p in swarm.peers if p.epoch == self.epoch and not self._stale(p)]
                total = sum(p.samples for p in here if not p.auxiliary)
                target = self._target(swarm)
                if total >= target:
                    self._end_epoch(here)
                    return
                if self.auxiliary and time.monotonic() > give_up:
                    return  # no round came: the caller steps again
                running = self._others_running(swarm)
                if not self.auxiliary and (not running or time.monotonic() > give_up):
                    if running:
                        logger.warning(
                            "epoch %d: %d of %d samples after %.0f s waiting; some peer reports progress but adds "
                            "none: training on",
                            self.epoch,
                            total,
                            target,
                            self.averaging_timeout,
                        )
                    contributors = max(1, sum(1 for p in here if not p.auxiliary))
                    self._quota_extra += math.ceil((target - total) / contributors)
                    logger.debug("epoch %d: %d of %d samples; split the rest again", self.epoch, total, target)
                    return
                time.sleep(BOUNDARY_POLL)
        finally:
            self._waiting = False

    def _others_running(self, swarm: SwarmProgress) -> bool:
        """Whether another live contributor may still add samples to our epoch (it is accumulating at our
        epoch, or finishing an earlier one)."""
        return any(
            p.peer != self._me
            and not p.auxiliary
            and not self._stale(p)
            and (p.epoch < self.epoch or (p.epoch == self.epoch and not p.waiting))
            for p in swarm.peers
        )

    def _weight_limit(self, gathered: Any) -> float | None:
        """The most a group member's gradient weight can be: WEIGHT_SLACK times the samples its signed progress
        record at this epoch (as we count it) allows by now. A member that names a record we have not seen (not yet
        read, or none at all: the name is its own word) gets what the busiest record we know at this epoch allows;
        it had no limit but the group's median cap, so naming nothing escaped the bound. None: we know no record."""
        name = gathered.get(PROGRESS_FIELD) if isinstance(gathered, dict) else None
        current = [p for p in self.swarm.peers if p.epoch == self.epoch]
        named = [p for p in current if p.peer == name] or current
        return WEIGHT_SLACK * max(self.tracker.samples_by_now(p) for p in named) if named else None

    def _stale(self, progress: PeerProgress) -> bool:
        silent = max(STALE_HEARTBEATS * self.progress_interval, STALE_MIN_SECONDS)
        return progress.peer != self._me and get_dht_time() - progress.time > silent

    def _check(self, report: bool = True) -> SwarmProgress:
        """A fresh read of the swarm's progress, after publishing ours (unless `report` is False); if the DHT
        cannot be read in time, the last read (training goes on; the next check tries again)."""
        try:
            self.swarm = self._run(self._report_and_fetch() if report else self.tracker.fetch())
        except (HiveEngineError, TimeoutError) as e:
            logger.warning("could not read the swarm's progress (%s): going on with the last read", e)
        return self.swarm

    async def _report_and_fetch(self) -> SwarmProgress:
        await self.tracker.report(self.epoch, self.samples, self.loss, self._target(self.swarm), self._waiting)
        self.swarm = await self.tracker.fetch()
        return self.swarm

    async def _beat(self) -> None:
        """Publish our progress and read the swarm's every progress_interval, beside the training loop."""
        while not self._closed:
            try:
                await self._report_and_fetch()
            except (HiveEngineError, TimeoutError) as e:
                logger.debug("progress heartbeat failed: %s", e)
            await asyncio.sleep(self.progress_interval)

    def _end_epoch(self, here: list[PeerProgress]) -> None:
        """Average with the peers of this epoch, apply the update, and move to the next epoch."""
        with self.grad_averager.get_tensors() as buffers, self.state_averager.get_tensors():
            self.rule.contribution(buffers, self.samples)
            fingerprint = _fingerprint(self._agreed)
        counted = self.attendance.expected(here, self.epoch)
        result = None
        for _ in range(ROUND_ATTEMPTS if len(here) > 1 else 0):
            result = self.grad_averager.step(
                float(0 if self.auxiliary else self.samples),
                self.averaging_timeout,
                expected_peers=len(counted) or None,
                gather={"fp": None if self.auxiliary else fingerprint, PROGRESS_FIELD: self._me},
                key=str(self.epoch),
                matchmaking_timeout=self.matchmaking_time + 1.0,
            )
            if result is not None:
                break
            swarm = self._check()
            if swarm.epoch > self.epoch and self._catch_up():
                return  # they averaged without us: copy the result rather than diverge
            here = [p for p in swarm.peers if p.epoch == self.epoch and not self._stale(p)]
            counted = self.attendance.expected(here, self.epoch)
            if len(counted) < 2:
                break
        if result is not None:
            alive = [p.peer for p in self.swarm.peers]
            self.attendance.settle(counted, result.group.gathered.values(), self.epoch, alive)
        self._apply(result)
        disagree = result is not None and states_disagree(result.group.gathered.values())
        periodic = self.average_state_every and (self.epoch + 1) % self.average_state_every == 0
        if result is not None and (disagree or periodic) and not self.auxiliary:
            self._average_state(result.group, disagree)
        elif result is not None:
            self.in_agreement = True
        if self.scheduler is not None:
            self.scheduler.step()
        self._advance(self.epoch + 1)

    def _apply(self, result) -> None:
        if result is None:
            self.rounds["alone"] += 1
            logger.info("epoch %d: no group to average with, stepping with local %s", self.epoch, self.mode)
        else:
            self.rounds["averaged"] += 1
            group = len(result.group.members)
            self.bytes_averaged += 2 * self.grad_averager.codec.payload_nbytes(
                self.grad_averager.flat.numel() * (group - 1) // group
            )
            if result.failed_parts:
                # Every survivor lost the same parts: skipping their update keeps the peers identical.
                logger.warning("epoch %d: parts %s failed; not updating them", self.epoch, result.failed_parts)
                self.grad_averager.zero_failed_parts(result)
            logger.info("epoch %d: averaged with %d peers (%d samples here)", self.epoch, group, self.samples)
        with self.grad_averager.get_tensors() as averaged, self.state_averager.get_tensors():
            self.rule.apply(averaged)
            for buffer in averaged:
                buffer.zero_()

    def _average_state(self, group: GroupInfo, disagree: bool) -> None:
        """Average the whole training state with the trainers of the group we just averaged with (no new
        matchmaking; auxiliary members hold no state)."""
        trainers = tuple(m for m in group.members if m.mode != Mode.AUX)
        if len(trainers) < 2:
            return
        state_group = GroupInfo(hashlib.sha256(group.group_id + b"state").digest()[:16], trainers, group.round)
        if disagree:
            logger.info("epoch %d: our group's states differ; averaging them", self.epoch)
        try:
            result = self._run(
                self.state_averager.average_in(state_group, 1.0, self.averaging_timeout), self.averaging_timeout + 5
            )
        except (HiveEngineError, TimeoutError) as e:
            logger.warning("epoch %d: state averaging failed: %s", self.epoch, e)
            self.in_agreement = not disagree
            return
        self.in_agreement = not result.failed_parts
        self.rounds["state_averaged"] += 1

    def _advance(self, epoch: int) -> None:
        self.epoch, self.samples, self._quota_extra, self._waiting = epoch, 0, 0, False
        self.state_averager.publish_state(self.epoch, self._metadata(), DHT_TIMEOUT)
        self._check()

    def _out_of_step(self) -> bool:
        """Whether we must load the swarm's state: it is at a newer epoch, or ours runs more than EPOCH_LEAD ahead
        of the epoch the other live peers corroborate (we stepped alone, e.g. while our uplink was down: once back,
        the swarm's state wins over what we trained alone)."""
        if self.swarm.epoch > self.epoch:
            return True
        if self.epoch <= self.swarm.epoch + EPOCH_LEAD:  # the usual case, on every step: no need to look further
            return False
        return any(p.peer != self._me and not self._stale(p) for p in self.swarm.peers)

    def _catch_up(self, timeout: float | None = None, bounded: bool = True) -> bool:
        """Load parameters, optimizer state and epoch: the state a quorum attests; when `bounded` (we are out of
        step with the swarm), at most EPOCH_LEAD past the epoch our progress reads corroborate."""
        if bounded:
            self._check(report=False)  # the swarm may have moved on since our last read: bound the donor by now
            if not self._out_of_step():
                return False  # in step after all: nothing to load
        swarm_epoch = self.swarm.epoch
        timeout = self.load_state_timeout if timeout is None else timeout
        max_epoch = swarm_epoch + EPOCH_LEAD if bounded else None
        if bounded and self.epoch > swarm_epoch:
            logger.warning(
                "epoch %d is ahead of what the swarm corroborates (%d): we stepped alone; loading the swarm's state",
                self.epoch,
                swarm_epoch,
            )
        metadata = self.state_averager.load_state_from_peers(timeout, codec=self.state_codec, max_epoch=max_epoch)
        if metadata is None:
            self._next_catch_up = time.monotonic() + CATCH_UP_RETRY
            logger.warning(
                "out of step with the swarm (epoch %d, the swarm's %d) but no peer could send its state; "
                "retrying in %.0f s",
                self.epoch,
                swarm_epoch,
                CATCH_UP_RETRY,
            )
            return False
        optimizer_metadata = metadata.get("optimizer")
        self.state.apply_metadata(optimizer_metadata if isinstance(optimizer_metadata, dict) else {})
        if self.mode == "diloco":  # only the outer state was verified: start the inner phase from it
            with self.state_averager.get_tensors():
                self.state.restart_inner(self.rule.anchor)
        with self.grad_averager.get_tensors() as buffers:
            for buffer in buffers:
                buffer.zero_()
        self.grad_averager.reset_error_feedback()
        self.rounds["caught_up"] += 1
        epoch = self.state_averager.local_epoch
        logger.info("caught up from epoch %d to %d", self.epoch, epoch)
        self._step_scheduler_to(epoch)
        self.in_agreement = True
        self._advance(epoch)
        return True

    def _step_scheduler_to(self, epoch: int) -> None:
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns when a scheduler steps before the optimizer did
            for _ in range(max(0, epoch - self.epoch)):
                self.scheduler.step()

    def _metadata(self) -> dict:
        return {"optimizer": self.state.metadata(), "mode": self.mode}

    # ---- checkpoints and teardown

    def state_dict(self) -> dict:
        """Everything needed to resume: the flat training state (parameters, optimizer and outer state)."""
        with self.state_averager.get_tensors():
            flat = self.state_averager.flat.clone()
        return {"epoch": self.epoch, "flat": flat, "metadata": self._metadata(), "run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output of a peer training the same model with the same optimizer."""
        flat = state["flat"]
        if flat.shape != self.state_averager.flat.shape or flat.dtype != self.state_averager.flat.dtype:
            raise ConfigurationError(
                f"checkpoint holds {tuple(flat.shape)} {flat.dtype}, this optimizer's state is "
                f"{tuple(self.state_averager.flat.shape)} {self.state_averager.flat.dtype}: not the same model"
            )
        with self.state_averager.get_tensors():
            self.state_averager.flat.copy_(flat)
        self.state.apply_metadata(state["metadata"].get("optimizer", {}))
        self._advance(int(state["epoch"]))

    def save(self, path: str) -> None:
        """Write a checkpoint of everything needed to resume (parameters, optimizer state, epoch) to `path`."""
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Resume from a checkpoint written by `save()` (it must be of the same model and optimizer)."""
        self.load_state_dict(torch.load(path, map_location=self.state_averager.flat.device))

    def shutdown(self) -> None:
        """Leave the swarm's progress, stop averaging and serving state (idempotent); the DHT stays up."""
        if not self._closed:
            self._closed = True
            self._heartbeat.cancel()
            try:
                self._run(self.tracker.retract(), CATCH_UP_RETRY)
            except (HiveEngineError, TimeoutError) as e:
                logger.info("could not withdraw our progress record: %s", e)
            self.grad_averager.shutdown()
            self.state_averager.shutdown()
            self.peer.shutdown()

    def _run(self, coro, timeout: float = DHT_TIMEOUT):
        return self.dht.peer.runtime.run(coro, timeout)


def _contributors(swarm: SwarmProgress) -> int:
    """Live peers that contribute samples; at least 1, ourselves."""
    return max(1, sum(1 for p in swarm.peers if not p.auxiliary))


def _at_epoch(swarm: SwarmProgress, epoch: int) -> SwarmProgress:
    peers = [p for p in swarm.peers if p.epoch == epoch]
    return SwarmProgress(epoch, sum(p.samples for p in peers), peers)


def states_disagree(gathered: Iterable) -> bool:
    """Whether the fingerprints a group's members registered differ. A member's metadata is whatever it
    registered (maybe junk from a hostile peer): only well-formed fingerprints count."""
    fingerprints = {str(v["fp"]) for v in gathered if isinstance(v, dict) and isinstance(v.get("fp"), list)}
    return len(fingerprints) > 1


def _fingerprint(tensors: list[torch.Tensor]) -> list[int]:
    """A cheap, exact, order-independent checksum of the bits of `tensors` (integer sums of their 16-bit
    halves): equal on every peer whose tensors are bit-identical, whatever the device or thread count."""
    halves = []
    for t in tensors:
        bits = t.detach().reshape(-1).view(torch.int16)
        halves.append(torch.stack([bits[0::2].sum(dtype=torch.int64), bits[1::2].sum(dtype=torch.int64)]))
    return torch.stack(halves).sum(0).tolist()  # one read back from the device, not two per tensor


def _show_progress_logs() -> None:
    """verbose=True: print the Optimizer's epoch reports (INFO) even if the program set up no logging."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
