"""CUDA tensors over the transport, device memory to device memory (skipped without a GPU)."""

import pytest
import torch

from hiveengine.transport import Peer
from tests.procs import start_server

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]


def test_cuda_tensors_round_trip_between_processes():
    proc, address = start_server()
    peer = Peer()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        tensors = [
            torch.randn(1000, device="cuda", generator=gen),  # small: sent as a frame, never inlined
            torch.randn(4096, 1024, device="cuda", generator=gen).to(torch.bfloat16),
        ]
        _, reply = peer.call_sync(address, "echo", {}, tensors, timeout=60)
        for sent, got in zip(tensors, reply, strict=True):
            assert got.device.type == "cuda"
            assert torch.equal(got, sent)
    finally:
        peer.shutdown()
        proc.close()


def test_cuda_tensor_streams_into_a_host_buffer():
    proc, address = start_server()
    peer = Peer()
    try:
        x = torch.randn(64 << 20, device="cuda")
        reply = peer.runtime.run(
            peer.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}), timeout=120
        )
        assert reply["numel"] == x.numel()
        assert reply["sum"] == pytest.approx(float(x.double().sum()), rel=1e-9)
    finally:
        peer.shutdown()
        proc.close()
