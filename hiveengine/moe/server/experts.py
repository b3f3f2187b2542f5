"""Expert classes a server can host: built-ins (`ffn`, `transformer`) and custom ones via `register_expert_class`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hiveengine.moe.errors import UnknownExpertClassError
from hiveengine.moe.protocol import TensorSchema

FFN_EXPANSION = 4  # hidden size of the ffn expert's inner layer, as a multiple of hidden_dim
TRANSFORMER_HEAD_DIM = 64  # the transformer expert uses hidden_dim // this many attention heads (at least one)

ModuleFactory = Callable[[int], nn.Module]
SchemaFactory = Callable[[int], Sequence[TensorSchema]]


@dataclass(frozen=True)
class ExpertClass:
    """How to build an expert of a given hidden size and what its inputs look like per sample."""

    name: str
    make: ModuleFactory
    input_schema: SchemaFactory

    def build(self, hidden_dim: int, seed: int | None = None) -> nn.Module:
        """A fresh module; with `seed`, its initial weights are reproducible."""
        if seed is None:
            return self.make(hidden_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make(hidden_dim)


EXPERT_CLASSES: dict[str, ExpertClass] = {}


def register_expert_class(name: str, input_schema: SchemaFactory) -> Callable[[ModuleFactory], ModuleFactory]:
    """Decorator: make `factory(hidden_dim) -> nn.Module` servable as `name`, taking inputs per `input_schema`."""

    def register(factory: ModuleFactory) -> ModuleFactory:
        EXPERT_CLASSES[name] = ExpertClass(name, factory, input_schema)
        return factory

    return register


def get_expert_class(name: str) -> ExpertClass:
    """The registered expert class `name`, or a clear error listing the known ones."""
    try:
        return EXPERT_CLASSES[name]
    except KeyError:
        raise UnknownExpertClassError(
            f"no expert class {name!r}; known: {sorted(EXPERT_CLASSES)} (register one with register_expert_class)"
        ) from None


class TransformerExpert(nn.Module):
    """A pre-norm transformer encoder block on (batch, seq, hidden) inputs."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        heads = max(1, hidden_dim // TRANSFORMER_HEAD_DIM)
        self.block = nn.TransformerEncoderLayer(
            hidden_dim, heads, FFN_EXPANSION * hidden_dim, dropout=0.0, batch_first=True, norm_first=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@register_expert_class("ffn", lambda hidden: [TensorSchema((hidden,))])
def make_ffn(hidden_dim: int) -> nn.Module:
    """LayerNorm, Linear to 4x, GELU, Linear back: the usual transformer feed-forward expert."""
    return nn.Sequential(
        nn.LayerNorm(hidden_dim),
        nn.Linear(hidden_dim, FFN_EXPANSION * hidden_dim),
        nn.GELU(),
        nn.Linear(FFN_EXPANSION * hidden_dim, hidden_dim),
    )


@register_expert_class("transformer", lambda hidden: [TensorSchema((None, hidden))])
def make_transformer(hidden_dim: int) -> nn.Module:
    """A transformer encoder block over sequences of any length."""
    return TransformerExpert(hidden_dim)
