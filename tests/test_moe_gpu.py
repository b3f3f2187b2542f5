"""GPU residency of the MoE data path: with CUDA tensors on both sides, a forward+backward moves batch data device
to device over UCX, with no host round trip (checked with the torch profiler; skipped without CUDA). The server is a
`hiveengine serve` process on the GPU, as in a real swarm; bench/residency.py profiles its side too."""

from __future__ import annotations

import pytest
import torch

from bench.common import host_copies
from hiveengine.moe import RemoteExpert, RemoteMixtureOfExperts
from tests.test_moe import servers

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

HIDDEN = 1024
BATCH = 64


@pytest.fixture(scope="module")
def cuda_swarm():
    """A server process with four ffn experts on the GPU, and a DHT that finds them."""
    args = ["--hidden-dim", str(HIDDEN), "--expert-pattern", "ffn.[0:2].[0:2]", "--seed", "0", "--device", "cuda"]
    with servers(args) as (started, dht):
        yield started[0], dht


def test_remote_expert_keeps_batches_on_the_gpu(cuda_swarm):
    server, _ = cuda_swarm
    expert = RemoteExpert("ffn.0.0", server.address)
    x = torch.randn(BATCH, HIDDEN, device="cuda", requires_grad=True)
    expert(x).sum().backward()  # warm up: connection, allocator, kernels
    outputs = []

    def step():
        outputs.append(expert(x))
        outputs[0].backward(torch.ones_like(outputs[0]))

    copies = host_copies(step)
    assert outputs[0].is_cuda and x.grad.is_cuda
    row_bytes = HIDDEN * 4
    assert [b for b in copies if b >= row_bytes] == []


def test_mixture_moves_only_routing_metadata_through_the_host(cuda_swarm):
    _, dht = cuda_swarm
    moe = RemoteMixtureOfExperts(HIDDEN, (2, 2), k_best=2, dht=dht).cuda()
    x = torch.randn(BATCH, HIDDEN, device="cuda", requires_grad=True)
    moe(x).sum().backward()
    outputs = []

    def step():
        outputs.append(moe(x))
        outputs[0].sum().backward()

    # Gating scores go to the host for the beam search, and row indices come back: kilobytes, not activations.
    copies = host_copies(step)
    assert outputs[0].is_cuda and x.grad.is_cuda
    assert sum(copies) < x.numel() * x.element_size() // 10
