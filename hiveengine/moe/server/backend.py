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

    def forward(self, inputs: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = ()) -> list[torch.Tensor]:
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

    def _kept_for(self, keys: Sequence[Hashable | None], inputs: Sequence[torch.Tensor]) -> KeptForward | None:
        kept = self._kept.pop(keys[0], None) if len(keys) == 1 and keys[0] is not None else None
        if kept is None or kept.generation != self._generation:
            return None
        if [x.shape for x in kept.inputs] != [x.shape for x in inputs]:
            return None
        return kept

    def backward(self, tensors: Sequence[torch.Tensor], keys: Sequence[Hashable | None] = ()) -> list[torch.Tensor]:
        """Input gradients for (inputs..., output gradients...); accumulates parameter gradients and steps."""
        n = len(self.input_schema)
        with self.lock, torch.enable_grad():
            kept = self._kept_for(keys, tensors[:n])
            if kept is not None:
                inputs, outputs = kept.inputs, kept.outputs
            else:
                self.recomputed += 1
                inputs = self._inputs(tensors[:n], grad=True)
                outputs = as_tensor_list(self.module(*inputs))
            grads = [g.to(self.device, non_blocking=True) for g in tensors[n:]]
            if len(grads) != len(outputs) or any(g.shape != o.shape for g, o in zip(grads, outputs, strict=False)):
                raise ProtocolError(
                    f"backward of {self.uid}: gradients of shapes {[tuple(g.shape) for g in grads]} do not match "
                    f"the outputs' {[tuple(o.shape) for o in outputs]}"
                )
            torch.autograd.backward(outputs, [g.to(o.dtype) for g, o in zip(grads, outputs, strict=True)])
            self.backward_batches += 1
            if (
                self.optimizer is not None
                and self.accumulate_batches
                and (self.backward_batches % self.accumulate_batches == 0)
            ):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                self._generation += 1
            return [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]

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
