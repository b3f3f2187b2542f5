"""The two update rules behind hiveengine.Optimizer: what a local batch does, and what the averaged round does.

- SyncUpdate (hivemind's semantics): gradients are accumulated locally, weighted by samples; the swarm
  averages them and every peer takes the same optimizer step with the same averaged gradient.
- DiLoCoUpdate (Douillard et al., 2023): every batch takes a local (inner) step; at the epoch boundary the
  swarm averages the pseudo-gradient (parameters at the last sync minus parameters now) and applies an outer
  Nesterov step to the parameters at the last sync. outer_lr=1, outer_momentum=0 is plain parameter averaging
  (hivemind's use_local_updates).
"""

from __future__ import annotations

import torch

from hiveengine.optim.state import optimizer_params


class SyncUpdate:
    """Accumulate sample-weighted gradients; step once per epoch with the swarm's average."""

    name = "sync"
    extra_state = 0  # tensor groups this rule keeps in the shared training state

    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner
        self.params = optimizer_params(inner)

    def bind(self, extra: list[list[torch.Tensor]]) -> None:
        """Receive views of this rule's extra state (none for sync)."""

    def initial_extra(self) -> list[list[torch.Tensor]]:
        return []

    def on_batch(self, accumulated: list[torch.Tensor], batch_size: int) -> None:
        for acc, p in zip(accumulated, self.params, strict=True):
            if p.grad is not None:
                acc.add_(p.grad, alpha=batch_size)

    def contribution(self, buffers: list[torch.Tensor], samples: int) -> None:
        """Turn the accumulated sums into this peer's mean gradient, ready to average."""
        for buffer in buffers:
            buffer.div_(max(1, samples))

    def apply(self, averaged: list[torch.Tensor]) -> None:
        for p, grad in zip(self.params, averaged, strict=True):
            p.grad = grad.clone()
        self.inner.step()

    def agreed_tensors(self, state_views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The part of the training state that must be identical on every peer (all of it, in sync mode)."""
        return state_views


class DiLoCoUpdate:
    """Inner steps every batch; an outer Nesterov step on the averaged pseudo-gradient every epoch."""

    name = "diloco"
    extra_state = 2  # the parameters at the last sync (anchor) and the outer momentum

    def __init__(self, inner: torch.optim.Optimizer, outer_lr: float, outer_momentum: float):
        self.inner, self.outer_lr, self.outer_momentum = inner, outer_lr, outer_momentum
        self.params = optimizer_params(inner)
        self.anchor: list[torch.Tensor] = []
        self.momentum: list[torch.Tensor] = []

    def initial_extra(self) -> list[list[torch.Tensor]]:
        return [[p.detach().clone() for p in self.params], [torch.zeros_like(p) for p in self.params]]

    def bind(self, extra: list[list[torch.Tensor]]) -> None:
        self.anchor, self.momentum = extra

    def on_batch(self, accumulated: list[torch.Tensor], batch_size: int) -> None:
        self.inner.step()

    def contribution(self, buffers: list[torch.Tensor], samples: int) -> None:
        for delta, anchor, p in zip(buffers, self.anchor, self.params, strict=True):
            torch.sub(anchor, p.detach(), out=delta)

    def apply(self, averaged: list[torch.Tensor]) -> None:
        mu, lr = self.outer_momentum, self.outer_lr
        for anchor, momentum, grad, p in zip(self.anchor, self.momentum, averaged, self.params, strict=True):
            momentum.mul_(mu).add_(grad)
            anchor.sub_(grad.add(momentum, alpha=mu), alpha=lr)
            p.detach().copy_(anchor)

    def agreed_tensors(self, state_views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Only the outer state must agree: parameters and inner optimizer state drift apart between syncs."""
        return self.anchor + self.momentum
