"""RemoteMixtureOfExperts: a gating network scores a grid of experts, a beam search over the DHT picks the k best
alive ones per sample, and each chosen expert gets one call with all of its samples (not one call per sample).

Faults: a server whose call fails at the transport level (unreachable, connection lost, deadline passed) is left
out of routing at once, for FAILED_PEER_EXPIRY seconds (see client/failures.py). While the forward deadline allows,
the samples whose chosen experts failed are sent to their next-best live experts in the same forward pass (up to
MAX_FORWARD_ROUNDS rounds of calls in all). Experts that still fail are dropped and the gating weights of the rest
renormalized, in forward and backward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
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
    finite_reply,
    new_forward_id,
    wire_tensors,
)
from hiveengine.moe.client.failures import FAILED_PEERS, FailedPeers, is_peer_failure
from hiveengine.moe.errors import NonFiniteReplyError, NotEnoughExpertsError
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.transport import Peer

logger = logging.getLogger(__name__)

MAX_FORWARD_ROUNDS = 4  # rounds of expert calls in one forward pass: the first choices, then up to 3 retries
MIN_RETRY_SECONDS = 0.05  # a retry round starts only while at least this much of the forward deadline is left

Slot = tuple[int, int]  # (row, slot): one of a sample's k_best places


@dataclass
class Dispatch:
    """One forward pass's routing: every expert called (`experts`), which rows and slots each one holds, and who
    answered in each direction. An expert that answered holds the slots it answered for (its backward call covers
    exactly these); one that never answered holds the slots it was asked for. `retried` counts the slots sent to
    another expert after their expert failed; `outputs` holds each answering expert's outputs until the mixture
    combines them."""

    experts: dict[str, ExpertInfo]
    rows: dict[str, list[int]]
    slots: dict[str, list[int]]
    batch: int
    k: int
    fid: int | None = None  # names the forward calls, so the servers keep their activations for the backward
    responded: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    retried: int = 0
    outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    backward_responded: set[str] = field(default_factory=set)
    backward_failed: dict[str, str] = field(default_factory=dict)

    def mask(self, uids: set[str]) -> torch.Tensor:
        """(batch, k) bool: which slots belong to an expert in `uids`."""
        mask = torch.zeros(self.batch, self.k, dtype=torch.bool)
        for uid in uids:
            mask[self.rows[uid], self.slots[uid]] = True
        return mask

    def coords(self, dims: int) -> torch.Tensor:
        """(batch, k, dims) long: the grid coordinates of each slot's expert (the answering one where a slot had
        several; zeros for slots no expert was chosen for)."""
        coords = torch.zeros(self.batch, self.k, dims, dtype=torch.long)
        answered_last = sorted(self.experts, key=lambda uid: uid in self.responded)
        for uid in answered_last:
            if self.rows.get(uid):
                coords[self.rows[uid], self.slots[uid]] = torch.tensor(self.experts[uid].coords)
        return coords


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class RemoteMixtureOfExperts(nn.Module):
    """A mixture of remote experts named `uid_prefix` + grid coordinates (e.g. `ffn.3.1` in a (4, 4) grid).

    Input (batch, ..., in_features); output (batch, ..., out_features), the gating-weighted sum of the answers of
    up to `k_best` experts per sample. Fewer than `k_min` answers for a sample raises NotEnoughExpertsError, unless
    `allow_zero_outputs`, in which case that sample's output (and input gradient) is zero. `forward_timeout` bounds
    the whole forward pass's expert calls, retries included. Servers that failed are recorded in `failed_peers`
    (by default the FailedPeers shared by every mixture of this process) and left out of routing for a while.
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
        failed_peers: FailedPeers | None = None,
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
        self.failed_peers = failed_peers if failed_peers is not None else FAILED_PEERS
        self.last_dispatch: Dispatch | None = None

    @property
    def peer(self) -> Peer:
        """The transport peer that calls the experts (this process's shared client peer unless one was given)."""
        if self._peer is None:
            self._peer = client_peer()
        return self._peer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each row of `x` (batch, ..., in_features) to its best alive experts and return the
        gating-weighted sum of their answers (batch, ..., out_features)."""
        grid_scores, coords, dispatch = self.route(x)
        logits = sum(s.gather(1, coords[..., level]) for level, s in enumerate(grid_scores))
        return _RemoteMixture.apply(logits, x, self, dispatch)

    def route(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, Dispatch]:
        """Gating scores per grid dimension, the coordinates of each slot's expert (batch, k_best, dims) and the
        Dispatch with the experts' outputs: a beam search over the experts alive in the DHT (leaving out servers
        that failed recently) picks up to k_best per sample, each chosen expert is called once with all its rows,
        and samples whose experts fail go to their next-best live experts while the deadline allows."""
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ConfigurationError(f"expected input of shape (batch, ..., {self.in_features}), got {tuple(x.shape)}")
        gating_input = x if x.dim() == 2 else x.mean(dim=tuple(range(1, x.dim() - 1)))
        grid_scores = list(self.proj(gating_input).split(self.grid_size, dim=-1))
        search = self.beam_search.afind_best_experts(grid_scores, self.k_best, self.failed_peers.addresses())
        chosen = self.peer.runtime.run(search, self.beam_search.lookup_timeout + SYNC_SLACK)
        fid = new_forward_id() if torch.is_grad_enabled() else None
        with torch.no_grad():
            dispatch = self._dispatch(x.detach(), grid_scores, chosen, fid)
        self.last_dispatch = dispatch
        return grid_scores, dispatch.coords(len(self.grid_size)).to(x.device), dispatch

    # ---- forward calls, with retries on the next-best live experts

    def _dispatch(
        self, x: torch.Tensor, grid_scores: list[torch.Tensor], chosen: list[list[ExpertInfo]], fid: int | None
    ) -> Dispatch:
        dispatch = Dispatch({}, {}, {}, x.shape[0], self.k_best, fid)
        deadline = time.monotonic() + self.forward_timeout
        tried: list[set[str]] = [set() for _ in range(x.shape[0])]  # every expert each row was sent to
        assignments: dict[str, list[Slot]] = {}
        for row, experts in enumerate(chosen):
            for slot, info in enumerate(experts):
                dispatch.experts.setdefault(info.uid, info)
                assignments.setdefault(info.uid, []).append((row, slot))
                tried[row].add(info.uid)
        answered: dict[str, list[tuple[list[Slot], torch.Tensor]]] = {}
        asked: dict[str, list[Slot]] = {}
        for round_ in range(1, MAX_FORWARD_ROUNDS + 1):
            open_slots = self._call_round(x, assignments, dispatch, deadline, answered, asked)
            if not open_slots or round_ == MAX_FORWARD_ROUNDS or deadline - time.monotonic() < MIN_RETRY_SECONDS:
                break
            assignments = self._reassign(grid_scores, open_slots, tried, dispatch, deadline)
            if not assignments:
                break
            dispatch.retried += sum(len(slots) for slots in assignments.values())
        for uid, parts in answered.items():
            held = [slot for slots, _ in parts for slot in slots]
            dispatch.rows[uid], dispatch.slots[uid] = [r for r, _ in held], [s for _, s in held]
            dispatch.outputs[uid] = torch.cat([out for _, out in parts]) if len(parts) > 1 else parts[0][1]
            dispatch.responded.add(uid)
        for uid, held in asked.items():
            if uid not in answered:
                dispatch.rows[uid], dispatch.slots[uid] = [r for r, _ in held], [s for _, s in held]
        return dispatch

    def _call_round(
        self,
        x: torch.Tensor,
        assignments: dict[str, list[Slot]],
        dispatch: Dispatch,
        deadline: float,
        answered: dict[str, list[tuple[list[Slot], torch.Tensor]]],
        asked: dict[str, list[Slot]],
    ) -> list[Slot]:
        """Call every assigned expert once with its rows; file the answers; return the slots left without one."""
        expected = (*x.shape[1:-1], self.out_features)
        inputs = {}
        for uid, held in assignments.items():
            index = torch.tensor([row for row, _ in held], device=x.device)
            inputs[uid] = wire_tensors([x.index_select(0, index)])
        timeout = max(deadline - time.monotonic(), MIN_RETRY_SECONDS)

        async def call_all():
            calls = {
                uid: acall_forward(self.peer, uid, dispatch.experts[uid].address, inputs[uid], timeout, dispatch.fid)
                for uid in assignments
            }
            return await self._gather(calls, dispatch, "forward")

        ok, failed = self.peer.runtime.run(call_all(), timeout + SYNC_SLACK)
        open_slots: list[Slot] = []
        for uid, held in assignments.items():
            error = failed.get(uid)
            if error is None:
                outputs = ok[uid]
                if len(outputs) != 1 or tuple(outputs[0].shape) != (len(held), *expected):
                    error = f"answered shapes {[tuple(o.shape) for o in outputs]}, expected [{(len(held), *expected)}]"
                else:
                    error = self._nonfinite(outputs, dispatch.experts[uid], "output")
            if error is None:
                answered.setdefault(uid, []).append((held, outputs[0]))
            else:
                dispatch.failed[uid] = error
                asked.setdefault(uid, []).extend(held)
                open_slots.extend(held)
        return open_slots

    def _reassign(
        self,
        grid_scores: list[torch.Tensor],
        open_slots: list[Slot],
        tried: list[set[str]],
        dispatch: Dispatch,
        deadline: float,
    ) -> dict[str, list[Slot]]:
        """Give each open slot its row's best live expert that the row was not sent to yet (none that failed)."""
        rows = sorted({row for row, _ in open_slots})
        index = torch.tensor(rows, device=grid_scores[0].device)
        scores = [s.detach().index_select(0, index) for s in grid_scores]
        width = self.k_best + max(len(tried[row]) for row in rows)  # enough to skip every expert tried already
        remaining = deadline - time.monotonic()
        try:
            search = self.beam_search.afind_best_experts(scores, width, self.failed_peers.addresses())
            found = self.peer.runtime.run(asyncio.wait_for(search, remaining), remaining + SYNC_SLACK)
        except Exception as e:
            logger.debug("no retry: the search for other experts failed: %s", _describe(e))
            return {}
        free: dict[int, list[int]] = {}
        for row, slot in sorted(open_slots):
            free.setdefault(row, []).append(slot)
        assignments: dict[str, list[Slot]] = {}
        for row, candidates in zip(rows, found, strict=True):
            for info in candidates:
                if not free[row]:
                    break
                if info.uid in tried[row] or info.uid in dispatch.failed:
                    continue
                tried[row].add(info.uid)
                dispatch.experts.setdefault(info.uid, info)
                assignments.setdefault(info.uid, []).append((row, free[row].pop(0)))
        return assignments

    # ---- remote calls (on the transport loop)

    async def _watched(self, call: Awaitable, address: str):
        """Await an expert call; a transport-level failure marks its server as failed at once."""
        try:
            return await call
        except Exception as e:
            if is_peer_failure(e):
                self.failed_peers.add(address)
            raise

    async def _gather(self, calls: dict[str, Awaitable], dispatch: Dispatch, what: str) -> tuple[dict, dict]:
        watched = [self._watched(call, dispatch.experts[uid].address) for uid, call in calls.items()]
        results = await asyncio.gather(*watched, return_exceptions=True)
        ok, failed = {}, {}
        for uid, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                failed[uid] = _describe(result)
                logger.debug("%s of %s dropped: %s", what, uid, failed[uid])
            else:
                ok[uid] = result
        return ok, failed

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
            return await self._gather(calls, dispatch, "backward")

        ok, dispatch.backward_failed = self.peer.runtime.run(call_all(), self.backward_timeout + SYNC_SLACK)
        for uid in list(ok):
            error = self._nonfinite(ok[uid], dispatch.experts[uid], "input gradient")
            if error is not None:
                dispatch.backward_failed[uid] = error
                del ok[uid]
        dispatch.backward_responded = set(ok)
        return {uid: g[0] for uid, g in ok.items()}

    def _nonfinite(self, tensors: list[torch.Tensor], expert: ExpertInfo, what: str) -> str | None:
        """Why an answer must be dropped, if it holds NaN or Inf (its server is then left out of routing)."""
        try:
            finite_reply(tensors, expert.uid, expert.address, what)
        except NonFiniteReplyError as e:
            self.failed_peers.add(expert.address)
            return _describe(e)
        return None

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
        y = x.new_zeros(x.shape[0], dispatch.k, *x.shape[1:-1], moe.out_features)
        for uid in dispatch.responded:
            rows = torch.tensor(dispatch.rows[uid], device=x.device)
            slots = torch.tensor(dispatch.slots[uid], device=x.device)
            y[rows, slots] = dispatch.outputs[uid].to(device=x.device, dtype=y.dtype)
        dispatch.outputs = {}  # y holds them now
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
