"""ExpertBackend: one hosted expert (module, optimizer, input schema) with batched forward and backward."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hiveengine.errors import ConfigurationError, ProtocolError
from hiveengine.moe.errors import NonFiniteRequestError
from hiveengine.moe.protocol import TensorSchema, check_batch
from hiveengine.moe.uids import check_uid

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "none")
MAX_KEPT_FORWARDS = 16  # keyed requests per expert whose forward activations wait for their backward call
KEPT_FORWARD_TTL = 120.0  # seconds a kept forward pass may wait for its backward call
DEFAULT_MAX_KEPT_BYTES = 256 << 20  # bytes of kept activations (inputs, outputs, autograd's saved tensors) per expert

Scheduler = torch.optim.lr_scheduler.LRScheduler
SchedulerFactory = Callable[[torch.optim.Optimizer], Scheduler]


def optimizer_factory(name: str, lr: float) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None:
    """Builds the named optimizer for an expert's parameters (None for "none"). Adam is the fused single-kernel
    implementation (the same math as torch's default, several times faster on CPU) where torch offers it."""
    if name not in OPTIMIZERS:
        raise ConfigurationError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if name == "none":
        return None
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=lr)

    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype in this torch version
            return torch.optim.Adam(params, lr=lr)

    return adam


def as_tensor_list(outputs) -> list[torch.Tensor]:
    """A module's output as a list of tensors (experts return one tensor or a tuple of them)."""
    items = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError("an expert must return a tensor or a tuple of tensors")
    return items


@dataclass(eq=False)
class KeptForward:
    """A batched forward pass recorded with autograd, kept for the backward calls of the requests in it."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    keys: tuple[Hashable | None, ...]  # per request of the batch, in order (None: no backward will name it)
    sizes: tuple[int, ...]  # rows per request
    generation: int  # the parameters' version it was computed with
    created: float
    nbytes: int  # memory it holds: its inputs, outputs and what autograd saved for the backward pass (no parameters)

    def rows(self, key: Hashable) -> slice:
        """The rows of the request named `key` in the batch."""
        i = self.keys.index(key)
        start = sum(self.sizes[:i])
        return slice(start, start + self.sizes[i])


class ExpertBackend:
    """Runs an expert's batches on its device, then steps the optimizer every `accumulate_batches` backward batches
    (hivemind's semantics with 1; 0 only accumulates into `.grad`, for a caller that steps by itself).

    Each optimizer update first clips the gradients' total norm to `clip_grad_norm` (if given), then steps the
    optimizer, then the learning-rate `scheduler` (a torch LRScheduler of this optimizer, or a factory that builds
    one from it) once. Requests holding NaN or Inf are refused (`screen`, before they join a batch), and an update
    whose gradients are not finite all the same (finite inputs can overflow) is skipped and counted in
    `skipped_updates`: one bad batch never poisons the weights.

    A forward batch with requests that carry keys (clients' forward ids) is recorded with autograd and kept under
    each key (at most MAX_KEPT_FORWARDS keys, for KEPT_FORWARD_TTL seconds, and at most `max_kept_bytes` of
    activations: the owner holding the most loses its oldest first, and a batch larger than that is not kept). A
    backward batch that holds every keyed request of a kept forward batch runs backward through it once, with zero
    gradients for its unkeyed rows, and skips recomputing it, unless the parameters changed in between. Otherwise
    backward recomputes the forward pass, as hivemind does: so many clients' forward requests share one batched
    forward and, usually, one batched backward.
    """

    def __init__(
        self,
        uid: str,
        module: nn.Module,
        input_schema: Sequence[TensorSchema],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str | None = None,
        accumulate_batches: int = 1,
        scheduler: Scheduler | SchedulerFactory | None = None,
        clip_grad_norm: float | None = None,
        max_kept_bytes: int = DEFAULT_MAX_KEPT_BYTES,
    ):
        check_uid(uid)
        if max_kept_bytes < 0:
            raise ConfigurationError(f"max_kept_bytes must be >= 0 (0: keep no activations), got {max_kept_bytes}")
        if accumulate_batches < 0:
            raise ConfigurationError(f"accumulate_batches must be >= 0, got {accumulate_batches}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ConfigurationError(f"clip_grad_norm must be positive (or None: no clipping), got {clip_grad_norm}")
        self.scheduler = _build_scheduler(scheduler, optimizer, uid)
        self.clip_grad_norm = clip_grad_norm
        self.uid = uid
        self.device = torch.device(device) if device is not None else next(module.parameters()).device
        self.module = module.to(self.device)
        self.input_schema = tuple(input_schema)
        self.optimizer = optimizer
        self.accumulate_batches = accumulate_batches
        self.lock = threading.Lock()  # held while computing and while (de)serializing state
        self.backward_batches = 0
        self.updates = 0
        self.recomputed = 0  # backward batches that had to recompute their forward pass
        self.skipped_updates = 0  # updates dropped because the gradients were not finite
        self.max_kept_bytes = max_kept_bytes
        self._generation = 0  # bumped whenever the parameters change
        self._kept: OrderedDict[Hashable, KeptForward] = OrderedDict()

    def check_forward(self, tensors: Sequence[torch.Tensor]) -> int:
        """Validate a forward request's tensors; return its batch size."""
        return check_batch(tensors, self.input_schema, f"forward of {self.uid}")

    def check_backward(self, tensors: Sequence[torch.Tensor]) -> int:
        """Validate a backward request (inputs, then output gradients); return its batch size."""
        n = len(self.input_schema)
        if len(tensors) <= n:
            raise ProtocolError(f"backward of {self.uid}: expected {n} inputs and their output gradients")
        rows = check_batch(tensors[:n], self.input_schema, f"backward of {self.uid}")
        if any(g.shape[:1] != (rows,) or not g.is_floating_point() for g in tensors[n:]):
            raise ProtocolError(f"backward of {self.uid}: output gradients must be floating point with {rows} rows")
        return rows

    def screen(self, direction: str, requests: Sequence[Sequence[torch.Tensor]]) -> list[Exception | None]:
        """Per request of a forming batch (on the compute thread, so the transport loop never waits for the
        device): NonFiniteRequestError if a floating-point tensor holds NaN or Inf, else None."""
        return [_nonfinite_error(tensors, f"{direction} of {self.uid}") for tensors in requests]

    @property
    def kept_bytes(self) -> int:
        """Bytes of forward activations kept for backward calls now."""
        return sum(kept.nbytes for kept in {id(k): k for k in self._kept.values()}.values())

    @property
    def kept_requests(self) -> int:
        """Requests whose forward activations are kept for their backward call now."""
        return len(self._kept)

    def _inputs(self, tensors: Sequence[torch.Tensor], grad: bool) -> list[torch.Tensor]:
        moved = [t.to(self.device, non_blocking=True) for t in tensors]
        return [t.detach().requires_grad_(t.is_floating_point()) for t in moved] if grad else moved

    def forward(
        self, inputs: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = (), sizes: Sequence[int] = ()
    ) -> list[torch.Tensor]:
        """Outputs for a batch of requests (`keys` and row counts `sizes`, one per request); a batch with keyed
        requests is recorded with autograd and kept for their backward calls."""
        sizes = tuple(sizes) or (inputs[0].shape[0],)
        keys = tuple(keys) or (None,) * len(sizes)
        keyed = any(k is not None for k in keys)
        with self.lock, torch.set_grad_enabled(keyed):
            xs = self._inputs(inputs, grad=keyed)
            if not keyed:
                return [t.detach().contiguous() for t in as_tensor_list(self.module(*xs))]
            storages: dict[int, int] = {}
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(_count_storage, storages), _unpacked):
                outputs = as_tensor_list(self.module(*xs))
            for t in (*xs, *outputs):
                _count_storage(storages, t)
            for t in (*self.module.parameters(), *self.module.buffers()):
                storages.pop(t.untyped_storage().data_ptr(), None)  # held anyway, not for this request
            kept = KeptForward(xs, outputs, keys, sizes, self._generation, time.monotonic(), sum(storages.values()))
            if kept.nbytes <= self.max_kept_bytes:
                for key in keys:
                    if key is not None:
                        self._keep(key, kept)
            return [t.detach().contiguous() for t in outputs]

    def _keep(self, key: Hashable, kept: KeptForward) -> None:
        """Keep `kept` under `key`; drop expired passes, then, while a bound is exceeded, the oldest pass of the
        owner that holds the most bytes (so one client's flood evicts its own passes, not the others')."""
        now = time.monotonic()
        self._kept.pop(key, None)
        self._kept[key] = kept
        while self._kept and now - next(iter(self._kept.values())).created > KEPT_FORWARD_TTL:
            self._kept.popitem(last=False)
        while len(self._kept) > MAX_KEPT_FORWARDS or self.kept_bytes > self.max_kept_bytes:
            del self._kept[self._eviction_victim()]

    def _eviction_victim(self) -> Hashable:
        """The oldest key of the owner holding the most kept bytes (keys that are (owner, id) pairs, as the
        Server's (client, forward id) are, group by owner; any other key is its own owner)."""
        held: dict[Hashable, dict[int, int]] = {}
        for key, kept in self._kept.items():
            held.setdefault(_owner(key), {})[id(kept)] = kept.nbytes
        heaviest = max(held, key=lambda owner: sum(held[owner].values()))
        return next(key for key in self._kept if _owner(key) == heaviest)

    def _reusable(self, kept: KeptForward, members: dict[Hashable, int], sizes: Sequence[int], inputs) -> bool:
        """Whether a backward batch may run through `kept`: it holds every keyed request of it (`members`: key ->
        task index), with the same rows and sample shapes, and the parameters did not change since."""
        if kept.generation != self._generation or set(members) != {k for k in kept.keys if k is not None}:
            return False
        shapes = [x.shape[1:] for x in kept.inputs]
        return all(sizes[i] == kept.sizes[kept.keys.index(key)] for key, i in members.items()) and shapes == [
            t.shape[1:] for t in inputs
        ]

    def backward(
        self, tensors: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = (), sizes: Sequence[int] = ()
    ) -> list[torch.Tensor]:
        """Input gradients for (inputs..., output gradients...) of a batch of requests (`keys` and row counts
        `sizes`, one per request); kept forward batches are reused, the rest recomputed together; then one
        optimizer step (every `accumulate_batches` batches) for the whole batch."""
        n = len(self.input_schema)
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        sizes = list(sizes) or [tensors[0].shape[0]]
        keys = list(keys) or [None] * len(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def rows_of(t: torch.Tensor, tasks: list[int]) -> torch.Tensor:
            if tasks == list(range(len(sizes))):
                return t
            return torch.cat([t[starts[i] : starts[i] + sizes[i]] for i in tasks])

        # The backward runs on this thread, not on autograd's per-device worker: a client in this process may be
        # blocked on that worker, inside its own backward, waiting for this very answer (a deadlock otherwise).
        with self.lock, torch.enable_grad(), torch.autograd.set_multithreading_enabled(False):
            groups: dict[int, tuple[KeptForward, dict[Hashable, int]]] = {}
            for i, key in enumerate(keys):
                kept = self._kept.pop(key, None) if key is not None else None
                if kept is not None:
                    groups.setdefault(id(kept), (kept, {}))[1][key] = i
            reused = [(k, m) for k, m in groups.values() if self._reusable(k, m, sizes, tensors[:n])]
            covered = {i for _, members in reused for i in members.values()}
            fresh = [i for i in range(len(sizes)) if i not in covered]
            pairs = [(kept.outputs, _padded_grads(kept, members, tensors[n:], rows_of)) for kept, members in reused]
            fresh_inputs: list[torch.Tensor] = []
            if fresh:
                self.recomputed += 1
                fresh_inputs = self._inputs([rows_of(t, fresh) for t in tensors[:n]], grad=True)
                pairs.append((as_tensor_list(self.module(*fresh_inputs)), [rows_of(g, fresh) for g in tensors[n:]]))
            outputs, grads = [], []
            for outs, gs in pairs:
                if len(gs) != len(outs) or any(g.shape != o.shape for g, o in zip(gs, outs, strict=False)):
                    raise ProtocolError(
                        f"backward of {self.uid}: gradients of shapes {[tuple(g.shape) for g in gs]} do not match "
                        f"the outputs' {[tuple(o.shape) for o in outs]}"
                    )
                outputs += outs
                grads += [g.to(o.dtype) for g, o in zip(gs, outs, strict=True)]
            torch.autograd.backward(outputs, grads)
            self._after_backward()
            fresh_grads = [_grad(x).split([sizes[i] for i in fresh]) for x in fresh_inputs]
            per_task = {pos: [g[j] for g in fresh_grads] for j, pos in enumerate(fresh)}
            for kept, members in reused:
                per_task.update({i: [_grad(x)[kept.rows(key)] for x in kept.inputs] for key, i in members.items()})
            if len(sizes) == 1:
                return per_task[0]
            return [torch.cat([per_task[i][j] for i in range(len(sizes))]) for j in range(n)]

    def _after_backward(self) -> None:
        self.backward_batches += 1
        due = self.accumulate_batches and self.backward_batches % self.accumulate_batches == 0
        if self.optimizer is not None and due:
            if not self._finite_gradients():
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                logger.warning("%s: skipped an update whose gradients hold NaN or Inf", self.uid)
                return
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            self.updates += 1
            self._generation += 1

    def _finite_gradients(self) -> bool:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def learning_rates(self) -> list[float]:
        """The optimizer's current learning rate per parameter group (empty without an optimizer)."""
        if self.optimizer is None:
            return []
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Module, optimizer and scheduler state, for checkpoints."""
        with self.lock:
            state = {"module": self.module.state_dict(), "updates": self.updates}
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        with self.lock:
            self.module.load_state_dict(state["module"])
            if self.optimizer is not None and "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            self.updates = int(state.get("updates", 0))
            self._generation += 1


def _build_scheduler(
    scheduler: Scheduler | SchedulerFactory | None, optimizer: torch.optim.Optimizer | None, uid: str
) -> Scheduler | None:
    """The expert's LR scheduler: `scheduler` itself, or what the factory builds for `optimizer`; checked to drive
    that optimizer and to need no metric."""
    if scheduler is None:
        return None
    if optimizer is None:
        raise ConfigurationError(f"expert {uid!r:.80}: a learning-rate scheduler needs an optimizer")
    if not isinstance(scheduler, Scheduler):
        if not callable(scheduler):
            raise ConfigurationError(
                f"expert {uid!r:.80}: scheduler must be a torch LRScheduler or a callable that builds one from the "
                f"optimizer, got {type(scheduler).__name__}"
            )
        scheduler = scheduler(optimizer)
        if not isinstance(scheduler, Scheduler):
            raise ConfigurationError(
                f"expert {uid!r:.80}: the scheduler factory returned {type(scheduler).__name__}, not a torch "
                "LRScheduler"
            )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigurationError(
            f"expert {uid!r:.80}: ReduceLROnPlateau steps on a metric, which an expert server does not have; use a "
            "schedule of the step count (e.g. LambdaLR, OneCycleLR)"
        )
    if scheduler.optimizer is not optimizer:
        raise ConfigurationError(f"expert {uid!r:.80}: the scheduler drives another optimizer than this expert's")
    return scheduler


def _padded_grads(
    kept: KeptForward,
    members: dict[Hashable, int],
    grads: Sequence[torch.Tensor],
    rows_of: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> list[torch.Tensor]:
    """Gradients for each output of a kept forward batch, in its row order: each keyed request's rows from the
    backward batch (task `members[key]`), zeros for the rows of its unkeyed requests (no backward comes for them)."""
    padded = []
    for g in grads:
        parts = [
            rows_of(g, [members[key]]) if key is not None else g.new_zeros(size, *g.shape[1:])
            for key, size in zip(kept.keys, kept.sizes, strict=True)
        ]
        padded.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return padded


def _owner(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and len(key) == 2 else key


def _nonfinite_error(tensors: Sequence[torch.Tensor], what: str) -> NonFiniteRequestError | None:
    """The error refusing a request whose floating-point tensors hold NaN or Inf, or None."""
    for i, t in enumerate(tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return NonFiniteRequestError(
                f"{what}: tensor {i} holds NaN or Inf; the request was refused and nothing was applied (find the "
                "overflow upstream: lower the learning rate, clip gradients, or use a wider dtype)"
            )
    return None


def _count_storage(storages: dict[int, int], t: torch.Tensor) -> torch.Tensor:
    """Record the bytes of `t`'s memory once per storage (autograd's pack hook; views share their base's)."""
    storage = t.untyped_storage()
    storages[storage.data_ptr()] = storage.nbytes()
    return t


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    return t


def _grad(x: torch.Tensor) -> torch.Tensor:
    return x.grad if x.grad is not None else torch.zeros_like(x)
