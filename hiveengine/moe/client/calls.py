"""The client's RPCs to expert servers (awaitable, on the transport loop) and the process's shared client Peer."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import torch

from hiveengine.errors import MembershipError
from hiveengine.moe.errors import NonFiniteReplyError
from hiveengine.moe.protocol import BACKWARD, FORWARD, FORWARD_ID, INFO
from hiveengine.transport import Peer, membership
from hiveengine.transport.membership import may_host_experts

DEFAULT_FORWARD_TIMEOUT = 30.0  # seconds an expert's forward call may take
DEFAULT_BACKWARD_TIMEOUT = 60.0  # seconds an expert's backward call may take
SYNC_SLACK = 5.0  # extra seconds a blocking caller waits beyond the calls' own deadlines

_client_peer: Peer | None = None
_client_lock = threading.Lock()


def client_peer() -> Peer:
    """The Peer this process uses to call experts (created on first use; it shares the process's runtime)."""
    global _client_peer
    with _client_lock:
        if _client_peer is None or _client_peer.closed:
            _client_peer = Peer()
        return _client_peer


def wire_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached contiguous tensors, ready for UCX; CUDA work that produced them is waited for (UCX reads device
    memory from the transport thread, outside this thread's stream)."""
    out = [t.detach().contiguous() for t in tensors]
    for device in {t.device for t in out if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return out


def new_forward_id() -> int:
    """An id for a forward call that a backward call will follow (the server keeps its activations)."""
    return random.getrandbits(62)


def finite_reply(tensors: list[torch.Tensor], uid: str, address: str, what: str) -> list[torch.Tensor]:
    """`tensors` if none holds NaN or Inf; otherwise NonFiniteReplyError (never let a server poison the model).
    Called in the caller's thread, not on the transport loop: a CUDA reply's check waits for the device."""
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteReplyError(
                f"the {what} of expert {uid!r:.80} at {address} holds NaN or Inf; the answer was dropped (the "
                "server is broken or hostile: it is left out of routing for a while)"
            )
    return tensors


async def _check_host(peer: Peer, address: str) -> None:
    """MembershipError unless the server at `address` may host experts in this swarm (its certificate's role);
    nothing to look up in an open swarm, where anyone may."""
    if membership.current() is None:
        return
    conn = await peer.connect(address)
    if not may_host_experts(conn.roles):
        raise MembershipError(
            f"{conn.remote} at {address} may not host experts in this swarm: its certificate lacks the host-experts "
            "role"
        )


def _header(uid: str, fid: int | None) -> dict:
    return {"uid": uid} if fid is None else {"uid": uid, FORWARD_ID: fid}


async def acall_forward(
    peer: Peer, uid: str, address: str, inputs: Sequence[torch.Tensor], timeout: float, fid: int | None = None
) -> list[torch.Tensor]:
    """Outputs of expert `uid` at `address` for a batch of `inputs`; with `fid`, a backward call will follow."""
    await _check_host(peer, address)
    _, outputs = await peer.call(address, FORWARD, _header(uid, fid), inputs, timeout=timeout)
    return outputs


async def acall_backward(
    peer: Peer,
    uid: str,
    address: str,
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    timeout: float,
    fid: int | None = None,
) -> list[torch.Tensor]:
    """Input gradients of expert `uid` for `inputs` and the gradients of its outputs (the server updates itself);
    `fid` names the forward call these inputs went through."""
    await _check_host(peer, address)
    _, grads = await peer.call(address, BACKWARD, _header(uid, fid), [*inputs, *grad_outputs], timeout=timeout)
    return grads


async def acall_info(peer: Peer, uid: str, address: str, timeout: float) -> dict:
    """What the server says about expert `uid` (input schema, parameter count, updates so far)."""
    await _check_host(peer, address)
    header, _ = await peer.call(address, INFO, {"uid": uid}, timeout=timeout)
    return header
