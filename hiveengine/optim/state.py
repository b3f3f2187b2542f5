"""The training state one peer hands another: parameters, optimizer state and extra tensors in one flat buffer.

Parameters and the optimizer's state tensors are rebound as views into the flat buffer of a state averager,
so serving, downloading and checkpointing the whole state is one contiguous copy. State that cannot live
there (non-tensors, tensors of another dtype or device such as Adam's step counter on a GPU peer) travels
as msgpack metadata.

What a newcomer loads is checked against a hash that a quorum of peers attests (averaging/state.py); the hash
covers what must agree between peers (`AgreedDigest`): all of it in sync mode, only the outer state and the
hyperparameters in DiLoCo, where parameters and inner optimizer state drift apart between syncs. A DiLoCo peer
that loaded state therefore restarts its inner phase from verified bytes only (`restart_inner`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

import msgpack
import torch

from hiveengine.averaging.state import DIGEST_DOMAIN

logger = logging.getLogger(__name__)

STEP_KEY = "step"  # the step counter torch optimizers keep per parameter


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in a fixed order (the same on every peer of a run)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state torch optimizers build lazily on their first step, without changing any parameter.

    Runs one step with zero gradients and a zero learning rate, then resets the step counters, so the
    state's tensors exist (and can be shared) before training starts.
    """
    params = [p for p in optimizer_params(optimizer) if not optimizer.state.get(p)]
    if not params:
        return
    saved_grads = [p.grad for p in params]
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    finally:
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
        for group, lr in zip(optimizer.param_groups, saved_lrs, strict=True):
            group["lr"] = lr
    for p in params:
        counter = optimizer.state[p].get(STEP_KEY)
        if isinstance(counter, torch.Tensor):
            counter.zero_()
        elif counter is not None:
            optimizer.state[p][STEP_KEY] = 0


class TrainingState:
    """Which tensors make up a peer's training state, and how to rebind them to a flat buffer's views."""

    def __init__(self, optimizer: torch.optim.Optimizer, extra: Sequence[Sequence[torch.Tensor]] = ()):
        initialize_optimizer_state(optimizer)
        self.optimizer = optimizer
        self.params = optimizer_params(optimizer)
        if not self.params:
            raise ValueError("the optimizer has no parameters")
        kind = (self.params[0].dtype, self.params[0].device)
        entries = list(self._state_entries())
        self.shared = [(i, key) for i, key, value in entries if _is_tensor_of(value, kind)]
        self.scalar_keys = [(i, key) for i, key, value in entries if not _is_tensor_of(value, kind)]
        self.extra_sizes = [len(group) for group in extra]
        self.tensors = (
            [p.detach() for p in self.params]
            + [self.optimizer.state[self.params[i]][key] for i, key in self.shared]
            + [t for group in extra for t in group]
        )

    def _state_entries(self) -> Iterator[tuple[int, str, object]]:
        for i, p in enumerate(self.params):
            for key in sorted(self.optimizer.state.get(p, {})):
                yield i, key, self.optimizer.state[p][key]

    def bind(self, views: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Make parameters and optimizer state views of the flat buffer; return the extra groups' views."""
        n, k = len(self.params), len(self.shared)
        for p, view in zip(self.params, views[:n], strict=True):
            p.data = view
        for (i, key), view in zip(self.shared, views[n : n + k], strict=True):
            self.optimizer.state[self.params[i]][key] = view
        groups, start = [], n + k
        for size in self.extra_sizes:
            groups.append(list(views[start : start + size]))
            start += size
        return groups

    def restart_inner(self, anchor: Sequence[torch.Tensor]) -> None:
        """Set the parameters to `anchor` and zero the optimizer's tensor state (a fresh inner phase, DiLoCo)."""
        for p, a in zip(self.params, anchor, strict=True):
            p.data.copy_(a)
        for i, key in self.shared:
            self.optimizer.state[self.params[i]][key].zero_()

    def metadata(self) -> dict:
        """What the flat buffer cannot hold: scalar state and the numeric hyperparameters of each group."""
        scalars = []
        for i, key in self.scalar_keys:
            value = self.optimizer.state[self.params[i]][key]
            scalars.append([i, key, value.tolist() if isinstance(value, torch.Tensor) else value])
        hyper = [
            {k: v for k, v in group.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            for group in self.optimizer.param_groups
        ]
        return {"scalars": scalars, "hyper": hyper}

    def apply_metadata(self, metadata: dict) -> None:
        """Restore what `metadata()` produced on another peer (entries that do not fit ours are skipped)."""
        known = set(self.scalar_keys)
        for entry in metadata.get("scalars", []):
            try:
                i, key, value = entry
                if (i, key) not in known:
                    continue
                state = self.optimizer.state[self.params[i]]
                current = state[key]
                if isinstance(current, torch.Tensor):
                    current.copy_(torch.as_tensor(value, dtype=current.dtype))
                else:
                    state[key] = type(current)(value)
            except (TypeError, ValueError, RuntimeError) as e:
                logger.warning("skipped optimizer state entry %r: %s", entry, e)
        for group, hyper in zip(self.optimizer.param_groups, metadata.get("hyper", []), strict=False):
            for k, v in hyper.items() if isinstance(hyper, dict) else ():
                if k in group and isinstance(group[k], int | float) and isinstance(v, int | float):
                    group[k] = type(group[k])(v)


class AgreedDigest:
    """The hash of the part of a state that must agree between peers: `views` (views of a flat buffer `flat`, by
    their element offsets, so the same parts of a downloaded copy hash alike) and the metadata's
    hyperparameters and mode; SHA-256 with averaging.state's DIGEST_DOMAIN."""

    def __init__(self, flat: torch.Tensor, views: Sequence[torch.Tensor]):
        base, size = flat.data_ptr(), flat.element_size()
        self.spans = [((v.data_ptr() - base) // size, (v.data_ptr() - base) // size + v.numel()) for v in views]
        if any(start < 0 or end > flat.numel() for start, end in self.spans):
            raise ValueError("the agreed tensors must be views of the flat buffer")

    def __call__(self, flat: torch.Tensor, metadata: dict) -> bytes:
        optimizer = metadata.get("optimizer")
        hyper = optimizer.get("hyper") if isinstance(optimizer, dict) else None
        digest = hashlib.sha256(DIGEST_DOMAIN)
        digest.update(msgpack.packb([hyper, metadata.get("mode")], use_bin_type=True))
        host = flat.detach().cpu()
        for start, end in self.spans:
            digest.update(host[start:end].contiguous().view(torch.uint8).numpy())
        return digest.digest()


def _is_tensor_of(value: object, kind: tuple[torch.dtype, torch.device]) -> bool:
    return isinstance(value, torch.Tensor) and (value.dtype, value.device) == kind
