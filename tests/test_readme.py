"""README's examples run as written: the "Using it" snippet, by two processes that join one `hiveengine dht`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
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
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash prints its Python stacks
    # stderr to files, not pipes: a peer whose stderr pipe filled while we wait on the other would stall both
    with tempfile.TemporaryFile("w+") as err0, tempfile.TemporaryFile("w+") as err1:
        bootstrap = PeerProcess("hiveengine.cli", "dht")
        try:
            code = snippet.replace(PLACEHOLDER, bootstrap.expect(READY_PREFIX))
            peers = [
                subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                for err in (err0, err1)
            ]
            outputs = [p.communicate(timeout=SNIPPET_TIMEOUT)[0] for p in peers]
        finally:
            bootstrap.close()
        for peer, out, err in zip(peers, outputs, (err0, err1), strict=True):
            err.seek(0)
            assert peer.returncode == 0, f"{out}\n{err.read()[-8000:]}"
            assert "ValueWithExpiration(value='hello'" in out
            assert out.strip().splitlines()[-1].startswith("tensor(")  # the averaged values were printed
