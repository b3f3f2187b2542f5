"""Test setup: Triton runs in its CPU interpreter, UCX uses loopback TCP, GPU tests skip without CUDA."""

import os

# Must be set before any @triton.jit function is defined, i.e. before hiveengine is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def server():
    """A transport test peer in its own process (tests/peers/transport_peer.py): (process, address)."""
    from tests.procs import start_server

    proc, address = start_server()
    yield proc, address
    proc.close()
