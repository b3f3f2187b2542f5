"""RemoteExpert: an nn.Module whose forward and backward run on an expert server (autograd-correct)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hiveengine.dht import DHT
from hiveengine.moe.client.calls import (
    DEFAULT_BACKWARD_TIMEOUT,
    DEFAULT_FORWARD_TIMEOUT,
    SYNC_SLACK,
    acall_backward,
    acall_forward,
    acall_info,
    client_peer,
    finite_reply,
    new_forward_id,
    wire_tensors,
)
from hiveengine.moe.declarations import get_experts
from hiveengine.moe.protocol import DHT_TIMEOUT
from hiveengine.moe.uids import check_uid
from hiveengine.transport import Peer, PeerAddress


class RemoteExpert(nn.Module):
    """Calls expert `uid` at `address`; gradients flow to the inputs, and the server applies its own update."""

    def __init__(
        self,
        uid: str,
        address: str | PeerAddress,
        *,
        forward_timeout: float = DEFAULT_FORWARD_TIMEOUT,
        backward_timeout: float = DEFAULT_BACKWARD_TIMEOUT,
        peer: Peer | None = None,
    ):
        super().__init__()
        check_uid(uid)
        self.uid, self.address = uid, str(PeerAddress.parse(address))
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self._peer = peer
        # Requires grad, so autograd calls our backward (to train the server) even when no input needs a gradient.
        self._dummy = torch.empty(0, requires_grad=True)

    @property
    def peer(self) -> Peer:
        """The transport peer that calls the expert (this process's shared client peer unless one was given)."""
        if self._peer is None:
            self._peer = client_peer()
        return self._peer

    def extra_repr(self) -> str:
        """uid and address, for `repr(module)`."""
        return f"uid={self.uid!r}, address={self.address!r}"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the expert remotely on `inputs`; differentiable (the backward pass calls the server, which
        updates the expert's weights). Returns one tensor, or a tuple for experts with several outputs."""
        fid = new_forward_id() if torch.is_grad_enabled() else None
        outputs = _RemoteCall.apply(self._dummy, self, fid, *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def info(self) -> dict:
        """The server's description of this expert: input schema, parameters, updates, learning rates ("lr")."""
        coro = acall_info(self.peer, self.uid, self.address, self.forward_timeout)
        return self.peer.runtime.run(coro, self.forward_timeout + SYNC_SLACK)

    def call_forward(self, inputs: Sequence[torch.Tensor], fid: int | None = None) -> list[torch.Tensor]:
        """Blocking forward call without autograd; with `fid`, a backward call with the same id will follow.
        Raises NonFiniteReplyError if the server answers NaN or Inf."""
        coro = acall_forward(self.peer, self.uid, self.address, wire_tensors(inputs), self.forward_timeout, fid)
        outputs = self.peer.runtime.run(coro, self.forward_timeout + SYNC_SLACK)
        return finite_reply(outputs, self.uid, self.address, "output")

    def call_backward(
        self, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], fid: int | None = None
    ) -> list[torch.Tensor]:
        """Blocking backward call: input gradients for `inputs` given the output gradients `grads` (raises
        NonFiniteReplyError if the server answers NaN or Inf)."""
        coro = acall_backward(
            self.peer, self.uid, self.address, wire_tensors(inputs), wire_tensors(grads), self.backward_timeout, fid
        )
        grads = self.peer.runtime.run(coro, self.backward_timeout + SYNC_SLACK)
        return finite_reply(grads, self.uid, self.address, "input gradient")


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dummy: torch.Tensor, expert: RemoteExpert, fid: int | None, *inputs: torch.Tensor):
        ctx.expert, ctx.fid = expert, fid
        ctx.save_for_backward(*inputs)
        outputs = expert.call_forward(inputs, fid)
        return tuple(o.to(inputs[0].device) for o in outputs) if inputs else tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        inputs = ctx.saved_tensors
        grads = ctx.expert.call_backward(inputs, grad_outputs, ctx.fid)
        grads = [g.to(x.device) if x.requires_grad else None for g, x in zip(grads, inputs, strict=True)]
        return (None, None, None, *grads)


def get_remote_experts(
    dht: DHT, uids: Sequence[str], timeout: float = DHT_TIMEOUT, **kwargs
) -> list[RemoteExpert | None]:
    """RemoteExperts for `uids` at the addresses the DHT knows (None for uids nobody serves now)."""
    found = get_experts(dht, uids, timeout)
    return [None if found[uid] is None else RemoteExpert(uid, found[uid], **kwargs) for uid in uids]
