"""README's examples run as written: the "Using it" snippet, by two processes that join one `hiveengine dht`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hiveengine.cli.dht import READY_PREFIX
from tests.procs import PeerProcess

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER = "ucx://HOST:PORT/PEER_ID"
SNIPPET_TIMEOUT = 150


def python_block_after(heading: str) -> str:
    """The first ```python block of README's section `heading`."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.timeout(SNIPPET_TIMEOUT + 60)
def test_the_using_it_snippet_runs_as_written_by_two_peers():
    snippet = python_block_after("## Using it")
    assert PLACEHOLDER in snippet
    bootstrap = PeerProcess("hiveengine.cli", "dht")
    try:
        address = bootstrap.expect(READY_PREFIX)
        code = snippet.replace(PLACEHOLDER, address)
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash prints its Python stacks
        peers = [
            subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=SNIPPET_TIMEOUT) for p in peers]
    finally:
        bootstrap.close()
    for peer, (out, err) in zip(peers, outputs, strict=True):
        assert peer.returncode == 0, f"{out}\n{err[-8000:]}"
        assert "ValueWithExpiration(value='hello'" in out
        assert out.strip().splitlines()[-1].startswith("tensor(")  # the averaged values were printed
