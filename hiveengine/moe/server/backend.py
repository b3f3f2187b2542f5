"""ExpertBackend: one hosted expert (module, optimizer, input schema) with batched forward and backward."""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hiveengine.errors import ConfigurationError, ProtocolError
from hiveengine.moe.protocol import TensorSchema, check_batch
from hiveengine.moe.uids import split_uid

OPTIMIZERS = ("adam", "sgd", "none")
MAX_KEPT_FORWARDS = 4  # forward passes per expert whose activations wait for their backward call
KEPT_FORWARD_TTL = 120.0  # seconds a kept forward pass may wait for its backward call


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


@dataclass
class KeptForward:
    """A forward pass recorded with autograd, kept for the backward call that names it."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    generation: int  # the parameters' version it was computed with
    created: float


class ExpertBackend:
    """Runs an expert's batches on its device, then steps the optimizer every `accumulate_batches` backward batches
    (hivemind's semantics with 1; 0 only accumulates into `.grad`, for a caller that steps by itself).

    A forward batch of one request that carries a key is recorded with autograd and kept (at most
    MAX_KEPT_FORWARDS, for KEPT_FORWARD_TTL seconds): the backward call with the same key then skips recomputing
    it, unless the parameters changed in between. Otherwise backward recomputes the forward pass, as hivemind does.
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
    ):
        split_uid(uid)
        if accumulate_batches < 0:
            raise ConfigurationError(f"accumulate_batches must be >= 0, got {accumulate_batches}")
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

    def _inputs(self, tensors: Sequence[torch.Tensor], grad: bool) -> list[torch.Tensor]:
        moved = [t.to(self.device, non_blocking=True) for t in tensors]
        return [t.detach().requires_grad_(t.is_floating_point()) for t in moved] if grad else moved

    def forward(
        self, inputs: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = (), sizes: Sequence[int] = ()
    ) -> list[torch.Tensor]:
        """Outputs for a batch of inputs; a batch of one keyed request is kept for its backward call."""
        key = keys[0] if len(keys) == 1 else None
        with self.lock, torch.set_grad_enabled(key is not None):
            xs = self._inputs(inputs, grad=key is not None)
            outputs = as_tensor_list(self.module(*xs))
            if key is not None:
                self._keep(key, KeptForward(xs, outputs, self._generation, time.monotonic()))
            return [t.detach().contiguous() for t in outputs]

    def _keep(self, key: Hashable, kept: KeptForward) -> None:
        now = time.monotonic()
        self._kept.pop(key, None)
        self._kept[key] = kept
        while self._kept and (
            len(self._kept) > MAX_KEPT_FORWARDS or now - next(iter(self._kept.values())).created > KEPT_FORWARD_TTL
        ):
            self._kept.popitem(last=False)

    def _kept_for(self, key: Hashable | None, inputs: Sequence[torch.Tensor]) -> KeptForward | None:
        kept = self._kept.pop(key, None) if key is not None else None
        if kept is None or kept.generation != self._generation:
            return None
        if [x.shape for x in kept.inputs] != [x.shape for x in inputs]:
            return None
        return kept

    def backward(
        self, tensors: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = (), sizes: Sequence[int] = ()
    ) -> list[torch.Tensor]:
        """Input gradients for (inputs..., output gradients...) of a batch of requests (`keys` and row counts
        `sizes`, one per request); kept forward passes are reused, the rest recomputed together; then one
        optimizer step (every `accumulate_batches` batches) for the whole batch."""
        n = len(self.input_schema)
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        sizes = list(sizes) or [tensors[0].shape[0]]
        keys = list(keys) or [None] * len(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def rows_of(t: torch.Tensor, tasks: list[int]) -> torch.Tensor:
            if len(tasks) == len(sizes):
                return t
            return torch.cat([t[starts[i] : starts[i] + sizes[i]] for i in tasks])

        with self.lock, torch.enable_grad():
            kept = {i: self._kept_for(keys[i], [rows_of(t, [i]) for t in tensors[:n]]) for i in range(len(sizes))}
            fresh = [i for i, k in kept.items() if k is None]
            pairs = [(k.outputs, [rows_of(g, [i]) for g in tensors[n:]]) for i, k in kept.items() if k is not None]
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
            per_task = {i: [_grad(x) for x in k.inputs] for i, k in kept.items() if k is not None}
            per_task.update({i: [g[pos] for g in fresh_grads] for pos, i in enumerate(fresh)})
            if len(sizes) == 1:
                return per_task[0]
            return [torch.cat([per_task[i][j] for i in range(len(sizes))]) for j in range(n)]

    def _after_backward(self) -> None:
        self.backward_batches += 1
        due = self.accumulate_batches and self.backward_batches % self.accumulate_batches == 0
        if self.optimizer is not None and due:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            self._generation += 1

    def state_dict(self) -> dict:
        """Module and optimizer state, for checkpoints."""
        with self.lock:
            state = {"module": self.module.state_dict(), "updates": self.updates}
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        with self.lock:
            self.module.load_state_dict(state["module"])
            if self.optimizer is not None and "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            self.updates = int(state.get("updates", 0))
            self._generation += 1


def _grad(x: torch.Tensor) -> torch.Tensor:
    return x.grad if x.grad is not None else torch.zeros_like(x)
