"""RemoteMixtureOfExperts: a gating network scores a grid of experts, a beam search over the DHT picks the k best
alive ones per sample, and each chosen expert gets one call with all of its samples (not one call per sample).
Experts that fail or time out are dropped and the gating weights of the rest renormalized, in forward and backward.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.moe.client.beam_search import ExpertInfo, MoEBeamSearcher
from hiveengine.moe.client.calls import (
    DEFAULT_BACKWARD_TIMEOUT,
    DEFAULT_FORWARD_TIMEOUT,
    SYNC_SLACK,
    acall_backward,
    acall_forward,
    client_peer,
    new_forward_id,
    wire_tensors,
)
from hiveengine.moe.errors import NotEnoughExpertsError
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.transport import Peer

logger = logging.getLogger(__name__)


@dataclass
class Dispatch:
    """One forward pass's routing: which rows (and slots) each expert got, and who answered in each direction."""

    experts: dict[str, ExpertInfo]
    rows: dict[str, list[int]]
    slots: dict[str, list[int]]
    batch: int
    k: int
    fid: int | None = None  # names the forward calls, so the servers keep their activations for the backward
    responded: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    backward_responded: set[str] = field(default_factory=set)
    backward_failed: dict[str, str] = field(default_factory=dict)

    def mask(self, uids: set[str]) -> torch.Tensor:
        """(batch, k) bool: which slots belong to an expert in `uids`."""
        mask = torch.zeros(self.batch, self.k, dtype=torch.bool)
        for uid in uids:
            mask[self.rows[uid], self.slots[uid]] = True
        return mask


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class RemoteMixtureOfExperts(nn.Module):
    """A mixture of remote experts named `uid_prefix` + grid coordinates (e.g. `ffn.3.1` in a (4, 4) grid).

    Input (batch, ..., in_features); output (batch, ..., out_features), the gating-weighted sum of the answers of
    up to `k_best` experts per sample. Fewer than `k_min` answers for a sample raises NotEnoughExpertsError, unless
    `allow_zero_outputs`, in which case that sample's output (and input gradient) is zero.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int] = (4, 4),
        uid_prefix: str = "ffn.",
        k_best: int = 4,
        k_min: int = 1,
        forward_timeout: float = DEFAULT_FORWARD_TIMEOUT,
        backward_timeout: float = DEFAULT_BACKWARD_TIMEOUT,
        allow_zero_outputs: bool = False,
        *,
        dht: DHT,
        out_features: int | None = None,
        lookup_timeout: float = DHT_TIMEOUT,
        peer: Peer | None = None,
    ):
        super().__init__()
        if not 0 <= k_min <= k_best:
            raise ConfigurationError(f"need 0 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if forward_timeout <= 0 or backward_timeout <= 0:
            raise ConfigurationError("forward_timeout and backward_timeout must be positive")
        self.in_features, self.out_features = in_features, out_features or in_features
        self.grid_size = tuple(grid_size)
        self.k_best, self.k_min = k_best, k_min
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.allow_zero_outputs = allow_zero_outputs
        self.beam_search = MoEBeamSearcher(dht, uid_prefix, self.grid_size, lookup_timeout)
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self._peer = peer
        self.last_dispatch: Dispatch | None = None

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            self._peer = client_peer()
        return self._peer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_scores, coords, dispatch = self.route(x)
        logits = sum(s.gather(1, coords[..., level]) for level, s in enumerate(grid_scores))
        return _RemoteMixture.apply(logits, x, self, dispatch)

    def route(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, Dispatch]:
        """Gating scores per grid dimension, the chosen experts' coordinates (batch, k_best, dims) and the dispatch
        plan, from a beam search over the experts alive in the DHT."""
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ConfigurationError(f"expected input of shape (batch, ..., {self.in_features}), got {tuple(x.shape)}")
        gating_input = x if x.dim() == 2 else x.mean(dim=tuple(range(1, x.dim() - 1)))
        grid_scores = list(self.proj(gating_input).split(self.grid_size, dim=-1))
        timeout = self.beam_search.lookup_timeout + SYNC_SLACK
        chosen = self.peer.runtime.run(self.beam_search.afind_best_experts(grid_scores, self.k_best), timeout)
        dispatch = self._plan(chosen, x.shape[0])
        dispatch.fid = new_forward_id() if torch.is_grad_enabled() else None
        coords = torch.zeros(x.shape[0], self.k_best, len(self.grid_size), dtype=torch.long)
        for uid, info in dispatch.experts.items():
            coords[dispatch.rows[uid], dispatch.slots[uid]] = torch.tensor(info.coords)
        self.last_dispatch = dispatch
        return grid_scores, coords.to(x.device), dispatch

    def _plan(self, chosen: list[list[ExpertInfo]], batch: int) -> Dispatch:
        dispatch = Dispatch({}, {}, {}, batch, self.k_best)
        for row, experts in enumerate(chosen):
            for slot, info in enumerate(experts):
                dispatch.experts.setdefault(info.uid, info)
                dispatch.rows.setdefault(info.uid, []).append(row)
                dispatch.slots.setdefault(info.uid, []).append(slot)
        return dispatch

    # ---- remote calls (on the transport loop)

    async def _gather(self, calls: dict[str, asyncio.Future], what: str) -> tuple[dict, dict]:
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        ok, failed = {}, {}
        for uid, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                failed[uid] = _describe(result)
                logger.debug("%s of %s dropped: %s", what, uid, failed[uid])
            else:
                ok[uid] = result
        return ok, failed

    def run_forward(self, x: torch.Tensor, dispatch: Dispatch) -> dict[str, torch.Tensor]:
        """Each chosen expert's outputs for its rows; the failed ones are recorded in `dispatch`."""
        index = {uid: torch.tensor(rows, device=x.device) for uid, rows in dispatch.rows.items()}
        inputs = {uid: wire_tensors([x.index_select(0, idx)]) for uid, idx in index.items()}

        async def call_all():
            calls = {
                uid: acall_forward(self.peer, uid, info.address, inputs[uid], self.forward_timeout, dispatch.fid)
                for uid, info in dispatch.experts.items()
            }
            return await self._gather(calls, "forward")

        ok, dispatch.failed = self.peer.runtime.run(call_all(), self.forward_timeout + SYNC_SLACK)
        dispatch.responded = set(ok)
        return {uid: outputs[0] for uid, outputs in ok.items() if len(outputs) == 1}

    def run_backward(self, x: torch.Tensor, grads: dict[str, torch.Tensor], dispatch: Dispatch) -> dict:
        """Each answering expert's input gradients for its rows; the failed ones are recorded in `dispatch`."""
        index = {uid: torch.tensor(dispatch.rows[uid], device=x.device) for uid in grads}
        inputs = {uid: wire_tensors([x.index_select(0, idx)]) for uid, idx in index.items()}
        grads = {uid: wire_tensors([g]) for uid, g in grads.items()}

        async def call_all():
            calls = {
                uid: acall_backward(
                    self.peer,
                    uid,
                    dispatch.experts[uid].address,
                    inputs[uid],
                    grads[uid],
                    self.backward_timeout,
                    dispatch.fid,
                )
                for uid in grads
            }
            return await self._gather(calls, "backward")

        ok, dispatch.backward_failed = self.peer.runtime.run(call_all(), self.backward_timeout + SYNC_SLACK)
        dispatch.backward_responded = set(ok)
        return {uid: g[0] for uid, g in ok.items()}

    def check_answers(self, dispatch: Dispatch, answered: set[str], what: str) -> torch.Tensor:
        """(batch,) bool: the samples with at least k_min answers; raises when one lacks them and zeros are not
        allowed."""
        counts = dispatch.mask(answered).sum(dim=1)
        enough = counts >= max(self.k_min, 1)
        if not bool(enough.all()) and not self.allow_zero_outputs:
            row = int((~enough).nonzero()[0, 0])
            failures = dispatch.failed if what == "forward" else dispatch.backward_failed
            raise NotEnoughExpertsError(
                f"{what}: sample {row} got {int(counts[row])} expert answers, fewer than k_min={self.k_min} "
                f"({len(dispatch.experts)} experts chosen, failures: {dict(list(failures.items())[:3])}); "
                "start more experts, raise the timeouts, or pass allow_zero_outputs=True"
            )
        return enough


class _RemoteMixture(torch.autograd.Function):
    """out = sum_j w_j y_j with w = softmax of the logits of the experts that answered. The gradient of each
    expert's input path is divided by the weight of those that answered in backward too (renormalization)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor, moe: RemoteMixtureOfExperts, dispatch: Dispatch):
        outputs = moe.run_forward(x, dispatch)
        out_shape = (*x.shape[1:-1], moe.out_features)
        y = x.new_zeros(x.shape[0], dispatch.k, *out_shape)
        for uid, out in outputs.items():
            if tuple(out.shape[1:]) != out_shape:
                dispatch.failed[uid] = f"output of shape {tuple(out.shape)}, expected (rows, {out_shape})"
                dispatch.responded.discard(uid)
                continue
            rows = torch.tensor(dispatch.rows[uid], device=x.device)
            slots = torch.tensor(dispatch.slots[uid], device=x.device)
            y[rows, slots] = out.to(y.dtype)
        enough = moe.check_answers(dispatch, dispatch.responded, "forward").to(x.device)
        mask = dispatch.mask(dispatch.responded).to(x.device) & enough[:, None]
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        weights = torch.where(mask, weights, torch.zeros_like(weights)).to(y.dtype)
        ctx.moe, ctx.dispatch = moe, dispatch
        ctx.save_for_backward(x, y, weights)
        return _combine(weights, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, y, weights = ctx.saved_tensors
        moe, dispatch = ctx.moe, ctx.dispatch
        grad_out = grad_out.to(y.dtype)
        dots = (y * grad_out.unsqueeze(1)).flatten(2).sum(-1)  # (batch, k): <g, y_j>
        grad_logits = weights * (dots - (weights * dots).sum(dim=1, keepdim=True))
        grad_x = _input_gradient(x, y, weights, grad_out, moe, dispatch)  # even if x needs none: experts learn
        return grad_logits, grad_x if ctx.needs_input_grad[1] else None, None, None


def _combine(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * y[:, j] for y of shape (batch, k, ...)."""
    return (weights.view(*weights.shape, *([1] * (y.dim() - 2))) * y).sum(dim=1)


def _input_gradient(x, y, weights, grad_out, moe: RemoteMixtureOfExperts, dispatch: Dispatch) -> torch.Tensor:
    """Send each answering expert the gradient of its outputs; sum the input gradients it returns, renormalized by
    the gating weight of the experts that answered in backward."""
    grad_y = weights.view(*weights.shape, *([1] * (y.dim() - 2))) * grad_out.unsqueeze(1)
    grads = {}
    for uid in dispatch.responded:
        rows = torch.tensor(dispatch.rows[uid], device=x.device)
        slots = torch.tensor(dispatch.slots[uid], device=x.device)
        grads[uid] = grad_y[rows, slots]
    answers = moe.run_backward(x, grads, dispatch)
    grad_x = torch.zeros_like(x)
    answered = set()
    for uid, g in answers.items():
        if g.shape != (len(dispatch.rows[uid]), *x.shape[1:]):
            dispatch.backward_failed[uid] = f"input gradient of shape {tuple(g.shape)}"
            continue
        grad_x.index_add_(0, torch.tensor(dispatch.rows[uid], device=x.device), g.to(x.dtype))
        answered.add(uid)
    dispatch.backward_responded = answered
    enough = moe.check_answers(dispatch, answered, "backward").to(x.device)
    kept = (weights * dispatch.mask(answered).to(x.device)).sum(dim=1)
    scale = torch.where(enough & (kept > 0), 1.0 / kept.clamp_min(torch.finfo(kept.dtype).tiny), 0.0)
    return grad_x * scale.view(-1, *([1] * (x.dim() - 1)))
