"""What expert servers and their clients agree on: RPC method names and per-sample tensor schemas (DHT records:
declarations.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hiveengine.errors import ProtocolError
from hiveengine.transport.wire import DTYPE_NAMES, DTYPES

FORWARD = "moe.forward"  # header {"uid"}; tensors: inputs -> outputs
BACKWARD = "moe.backward"  # header {"uid"}; tensors: inputs + output gradients -> input gradients
INFO = "moe.info"  # header {"uid"} -> {"inputs": schema, "parameters", "updates", "lr", "kept_bytes", ...}
FORWARD_ID = "fid"  # optional header key: a forward call's id, repeated by its backward call (saves a recompute)
DHT_TIMEOUT = 10.0  # seconds a declaration or lookup may take


@dataclass(frozen=True)
class TensorSchema:
    """One tensor argument per sample: its dtype and shape without the batch dimension (None: any size)."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype = torch.float32

    def check(self, t: torch.Tensor, what: str) -> None:
        """Raise ProtocolError unless `t` is a batch of samples of this schema."""
        ok_shape = t.dim() == len(self.shape) + 1 and all(
            want is None or want == got for want, got in zip(self.shape, t.shape[1:], strict=True)
        )
        if t.dtype != self.dtype or not ok_shape:
            expected = ", ".join("*" if d is None else str(d) for d in self.shape)
            raise ProtocolError(
                f"{what}: expected a batch of {self.dtype} tensors of shape (batch, {expected}), "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )

    def to_wire(self) -> list:
        """The schema as a msgpack-ready list: [dtype name, shape]."""
        return [DTYPE_NAMES[self.dtype], list(self.shape)]

    @classmethod
    def from_wire(cls, item) -> TensorSchema:
        """Parse `to_wire()`'s list; raises ProtocolError if it is malformed."""
        if not (isinstance(item, list) and len(item) == 2 and item[0] in DTYPES and isinstance(item[1], list)):
            raise ProtocolError(f"malformed tensor schema {item!r:.80}")
        return cls(tuple(item[1]), DTYPES[item[0]])


def check_batch(tensors: Sequence[torch.Tensor], schema: Sequence[TensorSchema], what: str) -> int:
    """Check a request's tensors against a schema; return the batch size they share."""
    if len(tensors) != len(schema):
        raise ProtocolError(f"{what}: expected {len(schema)} tensors, got {len(tensors)}")
    for i, (t, s) in enumerate(zip(tensors, schema, strict=True)):
        s.check(t, f"{what}, tensor {i}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ProtocolError(f"{what}: tensors disagree on the batch size ({sorted(sizes)})")
    return sizes.pop()
