"""User mistakes on the command line get one line, `hiveengine COMMAND: error: ...`, and exit code 2 (usage) or 1
(a swarm that does not answer); never a traceback."""

from __future__ import annotations

import pytest

from hiveengine.transport import Identity
from tests.test_cli_support import run_cli

pytestmark = pytest.mark.timeout(120)
VALID_ID = str(Identity.generate().peer_id)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["status", "--once", "--initial-peers", "bad"], 2, "'bad' is not a peer address"),
        (["status", "--once"], 2, "give --initial-peers"),
        (["dht", "--initial-peers", "ucx://127.0.0.1:5/abc"], 2, "'abc' is not a peer id"),
        (["dht", "--port", "99999"], 2, "cannot listen on port 99999"),
        (["peer", "send", "bad"], 2, "'bad' is not a peer address"),
        (["serve", "--no-dht", "--expert-pattern", "xx"], 2, "malformed expert pattern 'xx'"),
        (["bench", "kernels", "--out"], 2, "--out needs a directory"),
        (["status", "--once", "--initial-peers", f"ucx://127.0.0.1:1/{VALID_ID}"], 1, "initial peers answered"),
        (["dht", "--relay", "--relay-circuits", "-3"], 2, "relay limits must be positive"),
    ],
    ids=["status-address", "status-no-peers", "dht-peer-id", "dht-port", "peer-send", "serve-pattern", "bench-out",
         "status-unreachable", "relay-circuits-negative"],
)  # fmt: skip
def test_mistakes_print_one_line_without_traceback(args, code, message):
    env = {"HIVEENGINE_INITIAL_PEERS": ""}  # a caller's environment must not fill in the missing option
    out = run_cli(*args, env=env, timeout=90)
    assert out.returncode == code, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr  # one line: no traceback
    assert out.stderr.startswith(f"hiveengine {args[0]}: error: ") and message in out.stderr, out.stderr


def test_debug_log_level_adds_the_traceback():
    out = run_cli("--log-level", "DEBUG", "dht", "--port", "99999")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "hiveengine dht: error: cannot listen on port 99999" in out.stderr
