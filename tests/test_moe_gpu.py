"""GPU residency of the MoE data path: with CUDA tensors on both sides, a forward+backward moves batch data device
to device over UCX, with no host round trip (checked with the torch profiler; skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hiveengine.dht import DHT
from hiveengine.moe import RemoteExpert, RemoteMixtureOfExperts, Server

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

HIDDEN = 1024
BATCH = 64
HOST_COPY_KINDS = ("HtoD", "DtoH")


def host_copies(prof, tmp_path) -> list[int]:
    """Byte counts of every host<->device memcpy the profiler saw (in this process: client and server)."""
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return [
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and any(kind in e.get("name", "") for kind in HOST_COPY_KINDS)
    ]


@pytest.fixture(scope="module")
def cuda_swarm():
    dht = DHT()
    server = Server.create(
        "ffn",
        [f"ffn.{i}.{j}" for i in range(2) for j in range(2)],
        HIDDEN,
        device="cuda",
        seed=0,
        dht=dht,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
    )
    yield server, dht
    server.shutdown()
    dht.shutdown()


def test_remote_expert_keeps_batches_on_the_gpu(cuda_swarm, tmp_path):
    server, _ = cuda_swarm
    expert = RemoteExpert("ffn.0.0", server.address)
    x = torch.randn(BATCH, HIDDEN, device="cuda", requires_grad=True)
    expert(x).sum().backward()  # warm up: connection, allocator, kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        y = expert(x)
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
    assert y.is_cuda and x.grad.is_cuda
    row_bytes = HIDDEN * 4
    assert [b for b in host_copies(prof, tmp_path) if b >= row_bytes] == []


def test_mixture_moves_only_routing_metadata_through_the_host(cuda_swarm, tmp_path):
    _, dht = cuda_swarm
    moe = RemoteMixtureOfExperts(HIDDEN, (2, 2), k_best=2, dht=dht).cuda()
    x = torch.randn(BATCH, HIDDEN, device="cuda", requires_grad=True)
    moe(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = moe(x)
        out.sum().backward()
        torch.cuda.synchronize()
    assert out.is_cuda and x.grad.is_cuda
    # Gating scores go to the host for the beam search, and row indices come back: kilobytes, not activations.
    copies = host_copies(prof, tmp_path)
    assert sum(copies) < x.numel() * x.element_size() // 10
