"""hiveengine.Optimizer: a drop-in wrapper that trains one model collaboratively with a swarm of peers.

Each `step()` counts this peer's samples and publishes them in the DHT. When the samples the swarm has
accumulated in the current epoch reach `target_batch_size`, the peers average and advance one epoch together:

- `mode="sync"`: gradients are accumulated locally (weighted by samples) and averaged across the swarm;
  then every peer takes the same optimizer step with the same averaged gradient (hivemind's semantics).
- `mode="diloco"`: every call takes a local (inner) optimizer step; at the epoch boundary the peers average
  the pseudo-gradient (parameters at the last sync minus parameters now) and apply an outer Nesterov step.

A peer whose epoch is behind the swarm's newest loads parameters, optimizer state and epoch from a peer
that has them, so late joiners and stragglers catch up; peers that die are simply missing from later rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.errors import ConfigurationError, HiveEngineError
from hiveengine.optim.progress import ProgressTracker, SwarmProgress
from hiveengine.optim.state import TrainingState, optimizer_params

logger = logging.getLogger(__name__)

MODES = ("sync", "diloco")
DILOCO_OUTER_LR = 0.7  # defaults of the DiLoCo paper (Douillard et al., 2023)
DILOCO_OUTER_MOMENTUM = 0.9
DEFAULT_INNER_STEPS = 500
DEFAULT_MATCHMAKING_TIME = 3.0
DEFAULT_PROGRESS_INTERVAL = 1.0  # seconds between progress reports / swarm reads while accumulating
FAST_CHECK_FRACTION = 0.1  # once the swarm may have reached the target, read it this much more often
DEFAULT_AVERAGING_TIMEOUT = 60.0
DEFAULT_STATE_TIMEOUT = 120.0
DHT_TIMEOUT = 30.0
ROUND_ATTEMPTS = 3  # gatherings a peer tries for one epoch before it steps with its local values
CATCH_UP_RETRY = 5.0  # after a failed state download, train on at our own epoch this long before retrying
PEER_WAIT_POLL = 0.2  # seconds between swarm reads in wait_for_peers()

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Optimizer:
    """Wraps a torch optimizer: `loss.backward(); opt.step(); opt.zero_grad()` trains with the swarm.

    `optimizer` is a torch optimizer or a factory taking `params`. Peers with the same `run_id` train the
    same model. `batch_size_per_step` is the number of samples one `step()` stands for (or pass
    `step(batch_size=...)`). In diloco mode, an epoch ends when the swarm has done `inner_steps` steps per
    peer on average, unless `target_batch_size` is given.
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
        codec: str = "int8",
        inner_steps: int = DEFAULT_INNER_STEPS,
        outer_lr: float = DILOCO_OUTER_LR,
        outer_momentum: float = DILOCO_OUTER_MOMENTUM,
        target_group_size: int = 16,
        min_group_size: int = 2,
        matchmaking_time: float = DEFAULT_MATCHMAKING_TIME,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        averaging_timeout: float = DEFAULT_AVERAGING_TIMEOUT,
        load_state_timeout: float = DEFAULT_STATE_TIMEOUT,
        state_codec: str = "none",
        client_mode: bool = False,
        expected_swarm_size: int | None = None,
        load_state: bool = True,
    ):
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sync" and not (target_batch_size and target_batch_size > 0):
            raise ConfigurationError("sync mode needs target_batch_size > 0: the swarm steps when it is reached")
        if mode == "diloco" and inner_steps < 1:
            raise ConfigurationError(f"inner_steps must be ≥ 1, got {inner_steps}")
        if batch_size_per_step is not None and batch_size_per_step < 1:
            raise ConfigurationError(f"batch_size_per_step must be ≥ 1, got {batch_size_per_step}")
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            if params is None:
                raise ConfigurationError("give params= when optimizer is a factory")
            optimizer = optimizer(list(params))
        self.dht, self.run_id, self.mode, self.inner = dht, run_id, mode, optimizer
        self.batch_size_per_step, self.target_batch_size = batch_size_per_step, target_batch_size
        self.inner_steps, self.outer_lr, self.outer_momentum = inner_steps, outer_lr, outer_momentum
        self.progress_interval, self.averaging_timeout = progress_interval, averaging_timeout
        self.load_state_timeout, self.state_codec = load_state_timeout, state_codec

        self.epoch = 0  # optimizer steps (sync) or outer steps (diloco) the swarm has taken
        self.samples = 0  # samples this peer accumulated in the current epoch
        self.loss: float | None = None
        self.bytes_averaged = 0  # codec payload bytes this peer sent and received in averaging rounds
        self.rounds = {"averaged": 0, "alone": 0, "caught_up": 0}

        extra = []
        if mode == "diloco":  # outer state: parameters at the last sync, and the outer momentum
            params_now = optimizer_params(optimizer)
            extra = [[p.detach().clone() for p in params_now], [torch.zeros_like(p) for p in params_now]]
        self.state = TrainingState(optimizer, extra)
        self.params = self.state.params
        averaging = dict(
            target_group_size=target_group_size,
            min_group_size=min_group_size,
            matchmaking_time=matchmaking_time,
            expected_swarm_size=expected_swarm_size,
            client_mode=client_mode,
        )
        self.grad_averager = DecentralizedAverager(
            [torch.zeros_like(p) for p in self.params],
            dht,
            f"{run_id}.grads",
            codec=codec,
            share_state=False,
            **averaging,
        )
        self.state_averager = DecentralizedAverager(
            self.state.tensors, dht, f"{run_id}.state", codec="none", share_state=not client_mode, **averaging
        )
        with self.state_averager.get_tensors() as views:
            groups = self.state.bind(views)
        self.anchor, self.momentum = groups if mode == "diloco" else (None, None)
        self.tracker = ProgressTracker(dht, run_id, client_mode)
        self.swarm = SwarmProgress(0, 0, [])
        self._last_check = -math.inf
        self._samples_at_check = 0
        self._next_catch_up = -math.inf
        self._closed = False
        if load_state:
            swarm = self._check()
            if swarm.epoch > self.epoch:
                self._catch_up()
        self.state_averager.publish_state(self.epoch, self._metadata(), DHT_TIMEOUT)

    # ---- the training-loop API

    def step(self, batch_size: int | None = None, loss: float | torch.Tensor | None = None) -> None:
        """Count one local batch; in diloco mode take an inner step; advance the epoch with the swarm when due."""
        batch_size = batch_size or self.batch_size_per_step
        if not batch_size or batch_size < 1:
            raise ConfigurationError("pass step(batch_size=...) or set batch_size_per_step")
        if loss is not None:
            self.loss = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        self.tracker.count(batch_size)
        if self.mode == "sync":
            with self.grad_averager.get_tensors() as accumulated:
                for acc, p in zip(accumulated, self.params, strict=True):
                    if p.grad is not None:
                        acc.add_(p.grad, alpha=batch_size)
        else:
            with self.state_averager.get_tensors():
                self.inner.step()
        self.samples += batch_size
        if not self._check_due():
            return
        swarm = self._check()
        if self._share_done(swarm):
            swarm = self._wait_for_swarm(swarm)
        if swarm.epoch > self.epoch and time.monotonic() >= self._next_catch_up:
            self._catch_up()
        elif self._progress_at_my_epoch(swarm) >= self._target(swarm):
            self._end_epoch(alone=self._alone(swarm))

    def _share_done(self, swarm: SwarmProgress) -> bool:
        """Whether we accumulated our share of the target while the swarm as a whole has not reached it."""
        if swarm.epoch > self.epoch:
            return False
        return self._progress_at_my_epoch(swarm) < self._target(swarm) <= self.samples * _contributors(swarm)

    def _wait_for_swarm(self, swarm: SwarmProgress) -> SwarmProgress:
        """Give the others up to `progress_interval` to finish their share, so the swarm's step is not larger
        than target_batch_size (a peer that keeps accumulating meanwhile would overshoot it)."""
        deadline = time.monotonic() + self.progress_interval
        while self._share_done(swarm) and time.monotonic() < deadline:
            time.sleep(self.progress_interval * FAST_CHECK_FRACTION)
            swarm = self._check()
        return swarm

    def wait_for_peers(self, count: int, timeout: float) -> int:
        """Block until at least `count` peers (us included) report progress, or `timeout` passes; return
        how many were seen. Lets workers started together begin training together."""
        deadline = time.monotonic() + timeout
        while (seen := self._check().size) < count and time.monotonic() < deadline:
            time.sleep(PEER_WAIT_POLL)
        return seen

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    # ---- epochs

    def _target(self, swarm: SwarmProgress) -> int:
        if self.target_batch_size:
            return self.target_batch_size
        return self.inner_steps * (self.batch_size_per_step or 1) * _contributors(swarm, swarm.epoch)

    def _progress_at_my_epoch(self, swarm: SwarmProgress) -> int:
        return sum(p.samples for p in swarm.peers if p.epoch == self.epoch)

    def _alone(self, swarm: SwarmProgress) -> bool:
        me = self.dht.peer_id.raw.hex()
        return all(p.peer == me or p.epoch != self.epoch for p in swarm.peers)

    def _check_due(self) -> bool:
        """Whether to publish our progress and read the swarm's now (throttled: it costs two DHT operations)."""
        elapsed = time.monotonic() - self._last_check
        if elapsed >= self.progress_interval:
            return True
        # Every live peer counts: right after an epoch ends, the others may not have reported the new one yet.
        unreported = self.samples - self._samples_at_check
        estimate = self._progress_at_my_epoch(self.swarm) + unreported * _contributors(self.swarm)
        return estimate >= self._target(self.swarm) and elapsed >= self.progress_interval * FAST_CHECK_FRACTION

    def _check(self) -> SwarmProgress:
        self.swarm = self._run(self._report_and_fetch())
        self._last_check, self._samples_at_check = time.monotonic(), self.samples
        return self.swarm

    async def _report_and_fetch(self) -> SwarmProgress:
        await self.tracker.report(self.epoch, self.samples, self.loss, self._target(self.swarm))
        return await self.tracker.fetch()

    def _end_epoch(self, alone: bool) -> None:
        """Average with the swarm (unless we are alone), apply the step, and move to the next epoch."""
        if self.mode == "sync":
            with self.grad_averager.get_tensors() as accumulated:
                for acc in accumulated:
                    acc.div_(max(1, self.samples))
        else:
            with self.grad_averager.get_tensors() as deltas, self.state_averager.get_tensors():
                for delta, anchor, p in zip(deltas, self.anchor, self.params, strict=True):
                    torch.sub(anchor, p.detach(), out=delta)
        result = None
        for attempt in range(0 if alone else ROUND_ATTEMPTS):
            # Each attempt gathers under its own matchmaking key: the previous gathering's deadline has passed.
            self.grad_averager.local_epoch = self.epoch * ROUND_ATTEMPTS + attempt
            expected = sum(1 for p in self.swarm.peers if p.epoch == self.epoch) or None
            result = self.grad_averager.step(float(self.samples), self.averaging_timeout, expected_peers=expected)
            if result is not None:
                break
            swarm = self._check()
            if swarm.epoch > self.epoch:
                self._catch_up()  # they averaged without us: copy the result rather than diverge
                return
            if self._alone(swarm):
                break
        if result is None:
            self.rounds["alone"] += 1
            log = logger.debug if alone else logger.info
            log("epoch %d: no group to average with, stepping with local %s", self.epoch, self.mode)
        else:
            self.rounds["averaged"] += 1
            group = len(result.group.members)
            self.bytes_averaged += 2 * self.grad_averager.codec.payload_nbytes(
                self.grad_averager.flat.numel() * (group - 1) // group
            )
            if result.failed_parts:
                # Every survivor lost the same parts: skipping their update keeps the peers identical.
                logger.warning("epoch %d: parts %s failed; not updating them", self.epoch, result.failed_parts)
                with self.grad_averager.get_tensors():
                    for part in result.failed_parts:
                        self.grad_averager.flat[slice(*result.spans[part])].zero_()
        with self.grad_averager.get_tensors() as averaged, self.state_averager.get_tensors():
            if self.mode == "sync":
                for p, grad in zip(self.params, averaged, strict=True):
                    p.grad = grad.clone()
                self.inner.step()
            else:
                self._outer_step(averaged)
            for buffer in averaged:
                buffer.zero_()
        self._advance(self.epoch + 1)

    def _outer_step(self, pseudo_grads: list[torch.Tensor]) -> None:
        """Nesterov SGD on the parameters at the last sync, then continue from the result."""
        mu, lr = self.outer_momentum, self.outer_lr
        for anchor, momentum, grad, p in zip(self.anchor, self.momentum, pseudo_grads, self.params, strict=True):
            momentum.mul_(mu).add_(grad)
            anchor.sub_(grad.add(momentum, alpha=mu), alpha=lr)
            p.detach().copy_(anchor)

    def _advance(self, epoch: int) -> None:
        self.epoch, self.samples = epoch, 0
        self.state_averager.publish_state(self.epoch, self._metadata(), DHT_TIMEOUT)
        self._check()

    def _catch_up(self) -> None:
        """Load parameters, optimizer state and epoch from the peer with the newest state."""
        behind = self.swarm.epoch
        metadata = self.state_averager.load_state_from_peers(self.load_state_timeout, codec=self.state_codec)
        if metadata is None:
            self._next_catch_up = time.monotonic() + CATCH_UP_RETRY
            logger.warning(
                "behind the swarm (epoch %d < %d) but no peer could send its state; retrying in %.0f s",
                self.epoch,
                behind,
                CATCH_UP_RETRY,
            )
            return
        self.state.apply_metadata(metadata.get("optimizer", {}))
        with self.grad_averager.get_tensors() as buffers:
            for buffer in buffers:
                buffer.zero_()
        if self.grad_averager.residual is not None:
            self.grad_averager.residual.zero_()
        self.rounds["caught_up"] += 1
        logger.info("caught up from epoch %d to %d", self.epoch, self.state_averager.local_epoch)
        self._advance(self.state_averager.local_epoch)

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
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location=self.state_averager.flat.device))

    def shutdown(self) -> None:
        """Leave the swarm's progress, stop averaging and serving state (idempotent); the DHT stays up."""
        if not self._closed:
            self._closed = True
            try:
                self._run(self.tracker.retract(), CATCH_UP_RETRY)
            except (HiveEngineError, TimeoutError) as e:
                logger.info("could not withdraw our progress record: %s", e)
        self.grad_averager.shutdown()
        self.state_averager.shutdown()

    def _run(self, coro, timeout: float = DHT_TIMEOUT):
        return self.dht.peer.runtime.run(coro, timeout)


def _contributors(swarm: SwarmProgress, epoch: int | None = None) -> int:
    """Live peers that contribute samples (at `epoch`, if given); at least 1, ourselves."""
    return max(1, sum(1 for p in swarm.peers if not p.client_mode and (epoch is None or p.epoch == epoch)))
