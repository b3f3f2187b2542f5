"""What a hostile (or broken) all-reduce member does, for tests/peers/allreduce_peer.py (`"attack"` in its plan):
each attack is real misbehaviour on the wire, sent by a real process, through the code path an honest peer uses."""

from __future__ import annotations

import torch

from hiveengine.codec import Codec

ATTACKS = ("nan", "nan_data", "scale", "sign", "weight", "silent", "garbage_reducer", "cancel_up", "cancel_down")
SCALE = 1000.0
HUGE_WEIGHT = 1e30
CANCEL_NORM = 1e20  # the colluders' copies: +/- one shared vector of this norm, which cancel in the mean


class _Hostile(Codec):
    """Wraps an honest codec; subclasses change what goes on the wire."""

    def __init__(self, inner: Codec):
        self.inner, self.name, self.frames = inner, inner.name, inner.frames
        self.supports_error_feedback = inner.supports_error_feedback

    @property
    def bytes_per_element(self) -> float:
        """The honest codec's."""
        return self.inner.bytes_per_element

    @property
    def alignment(self) -> int:
        """The honest codec's."""
        return self.inner.alignment

    @property
    def lossless(self) -> bool:
        """The honest codec's."""
        return self.inner.lossless

    def empty_payload(self, numel, device):
        """The honest codec's."""
        return self.inner.empty_payload(numel, device)

    def encode(self, x, residual=None, *, out=None, name="tensor"):
        """The honest codec's."""
        return self.inner.encode(x, residual, out=out, name=name)

    def decode(self, payload, out, *, name="tensor"):
        """The honest codec's."""
        return self.inner.decode(payload, out, name=name)

    def error_bound(self, payload) -> float:
        """The honest codec's."""
        return self.inner.error_bound(payload)

    def finite(self, payload) -> bool:
        """The honest codec's."""
        return self.inner.finite(payload)

    def reduce(self, payloads, weights, out, **options):
        """The honest codec's."""
        return self.inner.reduce(payloads, weights, out, **options)

    def _mean(self, payloads, weights, out, requantize, name):
        return self.inner._mean(payloads, weights, out, requantize, name)


class NaNSender(_Hostile):
    """Sends payloads of the right layout whose values (or scales) are NaN."""

    def encode(self, x, residual=None, *, out=None, name="tensor"):
        """NaN where the values (float codecs) or the scales (blockwise codecs) go."""
        payload = [t.clone() for t in self.inner.empty_payload(x.numel(), x.device)]
        for t in payload:
            if t.is_floating_point():
                t.fill_(float("nan"))
            else:
                t.zero_()
        return payload


class GarbageReducer(_Hostile):
    """Reduces honestly (so the coefficients and projections it reports are the true ones), then returns noise of
    the right layout as the aggregate of its part: what a broken or lazy reducer that pretends does."""

    def reduce(self, payloads, weights, out, **options):
        """Random values (encoded, so the layout is right) instead of the aggregate."""
        self.inner.reduce(payloads, weights, out, **options)
        out.copy_((torch.randn(out.numel(), device=out.device) * 1000).view_as(out))
        return self.inner.encode(out.view(-1).clone(), name="garbage") if options.get("requantize") else None


def apply(attack: str | None, codec: Codec, flat: torch.Tensor, weight: float) -> tuple[Codec, torch.Tensor, float]:
    """The codec, data and weight a peer running `attack` uses (unchanged for None and 'silent')."""
    if attack == "nan":
        return NaNSender(codec), flat, weight
    if attack == "nan_data":  # our own data went bad: the honest codec refuses to encode it, so we withdraw
        return codec, torch.full_like(flat, float("nan")), weight
    if attack == "scale":
        return codec, flat * SCALE, weight
    if attack == "sign":  # a plausible copy (the right norm) that points the other way: only an audit sees it
        return codec, -flat, weight
    if attack == "weight":
        return codec, flat, HUGE_WEIGHT
    if attack in ("cancel_up", "cancel_down"):  # two colluders whose copies cancel, so huge that fp32 loses the rest
        shared = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(4242)).to(flat.device)
        shared *= CANCEL_NORM / float(shared.norm())
        return codec, shared if attack == "cancel_up" else -shared, weight
    if attack == "garbage_reducer":
        return GarbageReducer(codec), flat, weight
    if attack in (None, "silent"):
        return codec, flat, weight
    raise ValueError(f"unknown attack {attack!r}; one of {ATTACKS}")
