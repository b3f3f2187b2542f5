"""What expert servers and their clients agree on: RPC method names, per-sample tensor schemas, DHT records."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hiveengine.dht import DHT
from hiveengine.errors import ProtocolError
from hiveengine.moe.uids import check_uid, is_grid_uid, uid_prefixes
from hiveengine.transport.wire import DTYPE_NAMES, DTYPES

FORWARD = "moe.forward"  # header {"uid"}; tensors: inputs -> outputs
BACKWARD = "moe.backward"  # header {"uid"}; tensors: inputs + output gradients -> input gradients
INFO = "moe.info"  # header {"uid"} -> {"inputs": schema, "parameters", "updates"}
FORWARD_ID = "fid"  # optional header key: a forward call's id, repeated by its backward call (saves a recompute)
ALIVE = 1  # the value under an intermediate prefix's subkey: some expert below it is declared
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


async def adeclare_experts(dht: DHT, uids: Sequence[str], address: str, expiration_time: float) -> int:
    """Declare that `address` serves `uids` until `expiration_time`: under each uid, and, for grid uids, under every
    uid prefix as a subkey (the next coordinate), so a beam search can walk the grid. Returns how many stores
    succeeded."""
    records: dict[tuple[str, int], object] = {}
    for uid in uids:
        if not is_grid_uid(check_uid(uid)):
            continue  # a plain uid: found by its own key only
        pairs = uid_prefixes(uid)
        for prefix, coord in pairs[:-1]:
            records[prefix, coord] = ALIVE
        records[pairs[-1]] = address
    stores = [dht.astore(uid, address, expiration_time) for uid in uids]
    stores += [dht.astore(prefix, value, expiration_time, subkey=coord) for (prefix, coord), value in records.items()]
    results = await asyncio.gather(*stores, return_exceptions=True)
    return sum(r is True for r in results)


async def aget_experts(dht: DHT, uids: Sequence[str]) -> dict[str, str | None]:
    """The address serving each uid according to the DHT (None for uids nobody declares)."""
    found = await asyncio.gather(*[dht.aget(uid) for uid in uids])
    return {
        uid: item.value if item is not None and isinstance(item.value, str) else None
        for uid, item in zip(uids, found, strict=True)
    }


def get_experts(dht: DHT, uids: Sequence[str], timeout: float = DHT_TIMEOUT) -> dict[str, str | None]:
    """Blocking twin of `aget_experts`."""
    return dht.peer.runtime.run(aget_experts(dht, uids), timeout)
