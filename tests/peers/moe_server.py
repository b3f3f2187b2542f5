"""A real expert server process for the MoE tests: `hiveengine serve` plus a deliberately slow expert class and a
broken (or hostile) ones that answer NaN outputs or NaN input gradients.

Takes the `hiveengine serve` arguments. Exits cleanly (as on Ctrl-C) when its stdin closes, so tests can stop it
without signals; tests SIGKILL it to simulate a crash.
"""

import os
import signal
import sys
import threading
import time

import torch
from torch import nn

from hiveengine.cli import serve
from hiveengine.moe import TensorSchema, register_expert_class

SLOW_SECONDS_ENV = "TEST_SLOW_EXPERT_SECONDS"


class SlowLinear(nn.Linear):
    """A linear expert that takes TEST_SLOW_EXPERT_SECONDS per call: a straggler for timeout tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get(SLOW_SECONDS_ENV, "5")))
        return super().forward(x)


@register_expert_class("slow", lambda hidden: [TensorSchema((hidden,))])
def make_slow(hidden_dim: int) -> nn.Module:
    return SlowLinear(hidden_dim, hidden_dim)


class PoisonedLinear(nn.Linear):
    """A linear expert whose outputs are all NaN (and so are the input gradients it returns)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


@register_expert_class("poisoned", lambda hidden: [TensorSchema((hidden,))])
def make_poisoned(hidden_dim: int) -> nn.Module:
    return PoisonedLinear(hidden_dim, hidden_dim)


class PoisonedGradientLinear(nn.Linear):
    """A linear expert with finite outputs whose input gradients are all NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = x.clone()
            x.register_hook(lambda grad: grad * float("nan"))
        return super().forward(x)


@register_expert_class("poisoned_grad", lambda hidden: [TensorSchema((hidden,))])
def make_poisoned_grad(hidden_dim: int) -> nn.Module:
    return PoisonedGradientLinear(hidden_dim, hidden_dim)


def exit_when_stdin_closes() -> None:
    sys.stdin.read()
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
